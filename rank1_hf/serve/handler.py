"""The judging handler: a request's (query, document) pairs in, the ranker's judgements out.

It enforces the request limits (documents per request, the queue), applies the request's dataset prompt
and cuts (``max_tokens_per_doc``, ``truncate_prompt_tokens``, TEI's ``truncate: false``), feeds the
ranker's one long-lived engine through :meth:`Rank1.ajudge_with_stats` (so concurrent requests share
decode steps and identical pairs in flight are judged once), cancels the work of a client that
disconnects, and counts what it judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Iterator, Sequence

from fastapi import Request

from ..dataset_prompts import resolve_dataset_prompt
from ..errors import Rank1Error
from ..prompt import PROMPT_HEAD, PROMPT_PASSAGE, PROMPT_TAIL, query_text
from ..ranker import Judged, Rank1
from .errors import HTTPError
from .fields import Rank1Fields
from .metrics import Metrics
from .settings import ServeSettings

logger = logging.getLogger(__name__)

#: Seconds a client told "queue full" (503) is asked to wait before trying again.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Cuts:
    """How a request asks its documents to be cut before judging (None: not asked).

    max_tokens_per_doc: each document cut to its first N tokens (Cohere).
    prompt_tokens: each whole prompt cut to N tokens, the passage only; -1 the server's limit (vLLM's
        ``truncate_prompt_tokens``).
    refuse_cut: a pair whose passage would have to be cut is refused with 413 (TEI's ``truncate: false``).
    field: the request's name for its documents, in error messages.
    """

    max_tokens_per_doc: int | None = None
    prompt_tokens: int | None = None
    refuse_cut: bool = False
    field: str = "documents"


class Admission:
    """The queue limit: pairs accepted and not yet answered, all requests together."""

    def __init__(self, limit: int):
        self.limit, self.queued = limit, 0

    @contextlib.contextmanager
    def admit(self, pairs: int) -> Iterator[None]:
        if self.queued + pairs > self.limit:
            raise HTTPError(503, f"queue full: {self.queued} pairs waiting (--max-queued-pairs {self.limit}); "
                                 f"retry later", {"Retry-After": str(RETRY_AFTER_S)})
        self.queued += pairs
        try:
            yield
        finally:
            self.queued -= pairs


class Judger:
    """Turns a request's pairs into judgements on the ranker (see the module's docstring)."""

    def __init__(self, ranker: Rank1, settings: ServeSettings, admission: Admission, metrics: Metrics,
                 health: dict[str, Any]):
        self.ranker, self.settings, self.admission, self.metrics = ranker, settings, admission, metrics
        self.health = health  # the app's status: a failed warm-up refuses judging with 503

    async def __call__(self, request: Request, body: Rank1Fields, pairs: Sequence[tuple[str, str]],
                       cuts: Cuts = Cuts()) -> Judged:
        if self.health["status"] == "failed":
            raise HTTPError(503, self.health["message"])
        if len(pairs) > self.settings.max_documents:
            raise HTTPError(413, f"{len(pairs)} documents: at most {self.settings.max_documents} per request "
                                 f"(--max-documents)")
        try:
            dataset_prompt = resolve_dataset_prompt(body.dataset_prompt)  # None: the ranker's own
            applied = self.ranker.dataset_prompt if dataset_prompt is None else dataset_prompt
            with self.admission.admit(len(pairs)):
                pairs = await asyncio.to_thread(self._cut, pairs, body.instruction, applied, cuts)
                timing = getattr(request.state, "timing", None)
                if timing is not None:
                    timing.judging = time.monotonic()
                judged = await _unless_disconnected(request, self.ranker.ajudge_with_stats(
                    [(query, text, body.instruction) for query, text in pairs], dataset_prompt=dataset_prompt))
                if timing is not None:
                    timing.judged = time.monotonic()
        except Rank1Error as error:  # e.g. an empty passage, a query too long for the context
            raise HTTPError(422, str(error)) from None
        self.metrics.pairs_requested.inc(len(pairs))
        self.metrics.stored += judged.reused
        return judged

    def _cut(self, pairs: Sequence[tuple[str, str]], instruction: str | None, dataset_prompt: str | None,
             cuts: Cuts) -> list[tuple[str, str]]:
        """The pairs with their documents cut as ``cuts`` asks (in a thread: it tokenizes)."""
        tokenizer, core = self.ranker.tokenizer, self.ranker.core
        out = []
        for i, (query, text) in enumerate(pairs):
            if cuts.max_tokens_per_doc is not None:
                ends = [end for _, end in tokenizer(text, add_special_tokens=False,
                                                    return_offsets_mapping=True)["offset_mapping"]]
                text = text if len(ends) <= cuts.max_tokens_per_doc else text[: ends[cuts.max_tokens_per_doc - 1]]
            budget = cuts.prompt_tokens if cuts.prompt_tokens is not None and cuts.prompt_tokens > 0 else None
            if cuts.refuse_cut or budget is not None:
                joined = query_text(query, instruction, dataset_prompt)
                try:
                    prepared = core.prepare(joined, text, budget=budget)
                except Rank1Error as error:
                    if budget is None:
                        raise
                    raise HTTPError(422, f"truncate_prompt_tokens={budget} is shorter than the prompt without its "
                                         f"passage") from error
                if prepared.truncated and cuts.refuse_cut:
                    raise HTTPError(413, f"{cuts.field}.{i}: the prompt is longer than the server's limit of "
                                         f"{core.options.context_size - core.options.max_new_tokens} tokens "
                                         f"and truncate is false")
                if prepared.truncated:  # the passage as the cut prompt holds it
                    text = prepared.prompt[len(PROMPT_HEAD + joined + PROMPT_PASSAGE): -len(PROMPT_TAIL)]
            out.append((query, text))
        return out


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Judged]) -> Judged:
    """``work``'s result, or cancel it (freeing its waiting pairs) when the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
    if not task.done() or task.cancelled():
        logger.info("client disconnected: its request was cancelled")
        raise HTTPError(499, "client disconnected")
    return task.result()
