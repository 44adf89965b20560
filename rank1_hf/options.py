"""The options of a ranker, as data: how to load the model, and how to judge with it.

Both are frozen and checked when made, so a bad value fails at the input boundary (a call, the command
line) and everything below trusts them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import Rank1Error

ENGINES = ("auto", "continuous", "generate")
#: The quantization names ``load_model(quantization=...)`` accepts (besides a BitsAndBytesConfig).
QUANTIZATIONS = ("bnb-4bit", "bnb-8bit")


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`rank1_hf.loading.load_model` loads a checkpoint.

    dtype: "auto" / None (the checkpoint's), "float16", "bfloat16", "float32" or a torch dtype.
    device_map: None (one device), "auto", "balanced", "balanced_low_0", "sequential", a device, or a dict.
    max_memory: per-device budget for a device map, e.g. ``{0: "40GiB", "cpu": "64GiB"}``.
    offload_folder: where weights offloaded to disk go.
    quantization: None, "bnb-4bit", "bnb-8bit" or a ``BitsAndBytesConfig`` (AWQ is read from the checkpoint).
    trust_remote_code: run code shipped with the checkpoint.
    revision: hub branch, tag or commit.
    """

    dtype: Any = None
    device_map: Any = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    quantization: Any = None
    trust_remote_code: bool = False
    revision: str | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`~rank1_hf.loading.load_model`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class JudgeOptions:
    """How a ranker judges: what determines a judgement besides the model and the pair, and batching.

    max_new_tokens: reasoning cap, 8192 as the reference.
    context_size: prompt + max_new_tokens must fit in it (16000 as the reference); longer passages are cut
        (only the passage) and flagged ``truncated``.
    batch_size: most pairs decoded together (None: 32 on GPU, 16 on CPU).
    token_budget: most (prompt + max_new_tokens) tokens reserved by the pairs in flight.
    dataset_prompt: a template with ``FILL_QUERY_HERE`` applied to every query.
    engine: "continuous", "generate" or "auto" (continuous where the model's cache allows it).
    """

    max_new_tokens: int = 8192
    context_size: int = 16000
    batch_size: int | None = None
    token_budget: int | None = None
    dataset_prompt: str | None = None
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise Rank1Error(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        for name in ("max_new_tokens", "context_size", "batch_size", "token_budget"):
            check_count(name, getattr(self, name))
        check_dataset_prompt(self.dataset_prompt)
        if self.context_size <= self.max_new_tokens:
            raise Rank1Error(
                f"need max_new_tokens < context_size, got {self.max_new_tokens} and {self.context_size}"
            )


def check_count(name: str, value: Any) -> None:
    """A count option (None allowed): a whole number >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise Rank1Error(f"{name} must be a whole number >= 1, got {value!r}")


def check_dataset_prompt(value: Any) -> None:
    """A dataset prompt (None allowed): a string."""
    if value is not None and not isinstance(value, str):
        raise Rank1Error(f"dataset_prompt must be a string with FILL_QUERY_HERE, got {type(value).__name__}")
