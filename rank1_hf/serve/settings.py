"""What the server enforces besides the ranker's own options."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Rank1Error


@dataclass(frozen=True)
class ServeSettings:
    """What the server enforces besides the ranker's own options.

    api_key: every route but /health and the API description needs ``Authorization: Bearer <api_key>``
        (None: no key).
    model_name: the name the responses give for the model.
    max_documents: most documents (or score pairs) in one request (more: 413).
    max_queued_pairs: most pairs accepted and not yet answered, all requests together (more: 503).
    max_body_bytes: largest request body accepted (more: 413); 16 MiB by default.
    """

    api_key: str | None = None
    model_name: str = "rank1"
    max_documents: int = 1000
    max_queued_pairs: int = 8192
    max_body_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_documents", "max_queued_pairs", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Rank1Error(f"{name} must be a whole number >= 1, got {value!r}")
        if self.max_queued_pairs < self.max_documents:
            raise Rank1Error(f"max_queued_pairs ({self.max_queued_pairs}) must be at least max_documents "
                             f"({self.max_documents}), or a full request could never be accepted")
