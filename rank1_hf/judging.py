"""The judging core: pairs in, :class:`~rank1_hf.judgement.Judgement` out, through one long-lived engine.

:class:`Judge` holds what turns a pair into a judgement: the prompt (cut to fit the context), the engine
that reasons (chosen once, kept in its :class:`~rank1_hf.engine.worker.EngineWorker` and shared by every
caller, stepped by whichever caller waits), and the judgement built from what the engine returns. Callers
in any thread use :meth:`Judge.iterate`; asyncio tasks use :meth:`Judge.aiterate`. Each gets exactly its
own judgements, equal to judging its pairs alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .engine.continuous import ContinuousEngine
from .engine.generate import GenerateEngine
from .engine.lockstep import LeaderEngine, follow
from .engine.readout import readout_ids, score
from .engine.stopping import ThinkDetector, split_reasoning
from .engine.types import DecodeSettings, EngineStats, Generation
from .engine.worker import EngineWorker, Ticket
from .errors import Rank1Error
from .judgement import Judgement
from .model.kv_budget import pool_tokens
from .model.tensor_parallel import STOP, followed, is_followed, layout, send, tp_size
from .options import JudgeOptions
from .prompt import Pair, build_prompt, unpack_pair

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One pair ready for the model: its prompt string, token ids, and whether the passage was cut."""

    prompt: str
    ids: list[int]
    truncated: bool


def engine_kind(model: PreTrainedModel, asked: str) -> str:
    """The engine that judges with ``model``: "continuous" where its cache allows, else "generate"
    (tensor parallel: continuous only, since only its calls are kept in lockstep)."""
    if tp_size(model) > 1:
        if asked == "generate" or not ContinuousEngine.supports(model):
            raise Rank1Error("tensor parallel runs the continuous engine only (engine='continuous' or 'auto', "
                             "on a model with a plain full-attention KV cache)")
        return "continuous"
    if asked == "generate":
        return "generate"
    if ContinuousEngine.supports(model):
        return "continuous"
    if asked == "continuous":
        raise Rank1Error("the continuous engine needs a plain full-attention KV cache; use engine='generate'")
    return "generate"


class Judging:
    """What :meth:`Judge.iterate` returns: (input index, :class:`Judgement`) pairs in the order they
    finish, and ``stats``, the :class:`~rank1_hf.engine.types.EngineStats` of the engine's work while this
    call had pairs in it (complete once the iterator is exhausted; all zero when it judged nothing).
    Closing it early (or dropping it) frees its pairs that have not started."""

    def __init__(self, run: Callable[["Judging"], Iterator[tuple[int, Judgement]]]):
        self.stats = EngineStats()
        self._pairs = run(self)

    def __iter__(self) -> "Judging":
        return self

    def __next__(self) -> tuple[int, Judgement]:
        return next(self._pairs)

    def close(self) -> None:
        self._pairs.close()


class AsyncJudging:
    """What :meth:`Judge.aiterate` returns: :class:`Judging` for ``async for``."""

    def __init__(self, run: Callable[["AsyncJudging"], AsyncIterator[tuple[int, Judgement]]]):
        self.stats = EngineStats()
        self._pairs = run(self)

    def __aiter__(self) -> "AsyncJudging":
        return self

    async def __anext__(self) -> tuple[int, Judgement]:
        return await self._pairs.__anext__()

    async def aclose(self) -> None:
        await self._pairs.aclose()


class Judge:
    """The judging core of one model: prepare, reason on the shared engine, read, build judgements."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, options: JudgeOptions):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options = dataclasses.replace(options, batch_size=options.batch_size or default_batch_size())
        self.readout = readout_ids(tokenizer)
        self.detector = ThinkDetector(tokenizer)
        config = model.generation_config
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        configured = config.eos_token_id if config is not None else None
        eos |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
        self.settings = DecodeSettings(
            max_new_tokens=options.max_new_tokens,
            eos_ids=frozenset(eos),
            pad_id=pad,
            readout=self.readout,
            detector=self.detector,
            tokenizer=tokenizer,
            context_size=options.context_size,
            kv_tokens=pool_tokens(model, options.kv_memory),
            batch_size=options.batch_size,
            speculate=options.speculate,
        )
        self.kind = engine_kind(model, options.engine)
        if self.settings.kv_tokens < options.max_new_tokens + _SHORT_PROMPT:
            logger.warning("the KV pool holds %d tokens, fewer than a %d-token prompt and max_new_tokens=%d: a "
                           "pair that reasons that long stops with an error; give more kv_memory or lower "
                           "max_new_tokens", self.settings.kv_tokens, _SHORT_PROMPT, options.max_new_tokens)
        self._worker: EngineWorker | None = None
        self._lock = threading.Lock()
        if tp_size(model) > 1 and layout().is_leader:
            followed(True)  # the followers made this Judge too, and follow it until close()

    # ---- prompts -------------------------------------------------------------------------------------

    def prepare(self, query: str, passage: str, budget: int | None = None) -> Prepared:
        """Prompt and token ids for one (joined query, passage text), cutting the passage if it must.

        The prompt may use at most ``context_size - max_new_tokens`` tokens (or ``budget``, when smaller).
        Only the passage is cut, at a token boundary, and the template around it stays whole.
        """
        limit = self.options.context_size - self.options.max_new_tokens
        budget = limit if budget is None else min(budget, limit)
        prompt = build_prompt(query, passage)
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) <= budget:
            return Prepared(prompt, ids, False)
        keep = len(self.tokenizer(passage, add_special_tokens=False)["input_ids"]) - (len(ids) - budget)
        while keep > 0:
            prompt = build_prompt(query, cut_at_tokens(self.tokenizer, passage, keep).rstrip())
            ids = self.tokenizer(prompt)["input_ids"]
            if len(ids) <= budget:
                return Prepared(prompt, ids, True)
            keep -= max(1, len(ids) - budget)
        raise Rank1Error(
            f"query too long: the prompt without its passage exceeds context_size - max_new_tokens "
            f"= {budget} tokens (query starts {query[:60]!r})"
        )

    def prepare_all(self, pairs: Sequence[Pair], dataset_prompt: str | None) -> list[Prepared]:
        """Every pair prepared, so that bad input fails before anything is judged."""
        return [self.prepare(*unpack_pair(pair, dataset_prompt)) for pair in pairs]

    # ---- the engine ----------------------------------------------------------------------------------

    @property
    def worker(self) -> EngineWorker:
        """The shared engine and its queue, made on first use and kept until :meth:`close`."""
        if self.is_follower:
            raise Rank1Error("a tensor-parallel follower judges nothing itself: the leader (RANK 0) judges and this "
                             "process calls follow()")
        if tp_size(self.model) > 1 and not is_followed():
            raise Rank1Error("this tensor-parallel ranker is closed: its followers no longer run its engine")
        with self._lock:
            if self._worker is None:
                engine = ContinuousEngine if self.kind == "continuous" else GenerateEngine
                model, settings, asked = self.model, self.settings, self.options.engine

                def make() -> ContinuousEngine | GenerateEngine | LeaderEngine:  # holds no reference to this Judge
                    logger.info("engine: %s (asked for %r)", engine.name, asked)
                    made = engine(model, settings)
                    return LeaderEngine(made) if tp_size(model) > 1 else made

                self._worker = EngineWorker(make)
                # A ranker nobody holds any more closes its engine, which frees the cache.
                weakref.finalize(self, self._worker.close)
            return self._worker

    def warmup(self) -> None:
        """Make the engine now: its cache and, on a GPU, its captured decode steps."""
        self.worker.call(lambda engine: engine.warmup())

    def close(self) -> None:
        """Free the engine and its cache; a later call starts a new one. Under tensor parallel the leader
        also ends the followers' :meth:`follow`."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        if tp_size(self.model) > 1 and layout().is_leader and is_followed():
            send(STOP)
            followed(False)

    @property
    def is_follower(self) -> bool:
        """A tensor-parallel process other than the leader: it judges nothing itself (see :meth:`follow`)."""
        return tp_size(self.model) > 1 and not layout().is_leader

    def follow(self) -> tuple[str, ...]:
        """Follower: run the leader's engine calls until the leader closes its ranker (or its job ends, or
        it loads another model); returns the leader's last message (engine/lockstep.py)."""
        if not self.is_follower:
            raise Rank1Error("follow() is for the tensor-parallel processes other than the leader (RANK > 0)")
        return follow(lambda: ContinuousEngine(self.model, self.settings))

    # ---- judging -------------------------------------------------------------------------------------

    def iterate(self, pairs: Iterable[Pair], dataset_prompt: str | None, show_progress_bar: bool | None,
                rows: int | None = None) -> Judging:
        """(input index, judgement) as each pair finishes, from any thread.

        A sized sequence is prepared up front (bad input fails before any judging) and queued shortest
        prompt first; any other iterable is read as the engine frees room, a few batches ahead, so memory
        follows the pairs in flight. ``rows``: at most that many of this call's pairs are in the engine at
        once (its share; the engine's own ``batch_size`` bounds every caller together).
        """
        return Judging(lambda judging: self._iterate(judging, pairs, dataset_prompt, show_progress_bar, rows))

    def _iterate(self, judging: Judging, pairs: Iterable[Pair], dataset_prompt: str | None,
                 show_progress_bar: bool | None, rows: int | None) -> Iterator[tuple[int, Judgement]]:
        sized = isinstance(pairs, Sequence)
        total = len(pairs) if sized else None
        show = show_progress_bar if show_progress_bar is not None else sys.stderr.isatty() and total != 1
        prepared: dict[int, Prepared] = {}
        if sized:
            prepared = dict(enumerate(self.prepare_all(pairs, dataset_prompt)))
            source: Iterator[tuple[int, Pair]] = iter(())
        else:
            source = enumerate(pairs)
        if sized and not prepared:
            return
        results: queue.SimpleQueue = queue.SimpleQueue()
        ticket = Ticket(results.put)
        judging.stats = ticket.stats  # the worker adds to it as it runs
        worker = self.worker
        window = 2 * self.settings.batch_size if rows is None else rows  # a stream's pairs queued ahead
        waiting = 0  # submitted, not yet returned
        log = _CallLog(self.options)
        bar = tqdm(total=total, unit="pair", disable=not show, desc="rank1", dynamic_ncols=True)
        order: list[int] = []
        try:
            if sized:
                order = sorted(prepared, key=lambda i: (len(prepared[i].ids), i), reverse=True)  # popped from the end
            while True:
                room = (rows or len(order)) - waiting  # this call's share of the engine left
                if order and room > 0:
                    taken = [order.pop() for _ in range(min(len(order), room))]
                    worker.submit(ticket, [(i, prepared[i].ids, prepared[i].prompt) for i in taken])
                    waiting += len(taken)
                if not sized:
                    more = []
                    while waiting + len(more) < window:
                        nxt = next(source, None)
                        if nxt is None:
                            break
                        i, pair = nxt
                        prepared[i] = self.prepare(*unpack_pair(pair, dataset_prompt))
                        more.append((i, prepared[i].ids, prepared[i].prompt))
                    if more:
                        worker.submit(ticket, more)
                        waiting += len(more)
                if not waiting:
                    break
                worker.drive(lambda: not results.empty())  # steps the engine here unless another caller does
                item = results.get()
                if isinstance(item, BaseException):
                    waiting = 0
                    raise item
                i, generation = item
                waiting -= 1
                judgement = self.judgement(prepared.pop(i), generation)
                log.add(i, judgement)
                bar.update(1)
                yield i, judgement
        finally:
            if waiting:
                worker.cancel(ticket)
            bar.close()
            log.close(ticket.stats)

    def aiterate(self, pairs: Sequence[Pair], dataset_prompt: str | None, rows: int | None = None) -> "AsyncJudging":
        """:meth:`iterate` for asyncio: ``async for i, judgement in ...``. Cancelling the task that
        iterates (or closing the iterator) frees its pairs that have not started."""
        return AsyncJudging(lambda judging: self._aiterate(judging, pairs, dataset_prompt, rows))

    async def _aiterate(self, judging: "AsyncJudging", pairs: Sequence[Pair], dataset_prompt: str | None,
                        rows: int | None) -> AsyncIterator[tuple[int, Judgement]]:
        if not pairs:
            return
        ready = await asyncio.to_thread(self.prepare_all, pairs, dataset_prompt)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        ticket = Ticket(lambda item: loop.call_soon_threadsafe(results.put_nowait, item))
        judging.stats = ticket.stats
        order = sorted(range(len(ready)), key=lambda i: (len(ready[i].ids), i), reverse=True)  # popped from the end
        worker = self.worker
        log = _CallLog(self.options)
        waiting = 0
        try:
            while True:
                room = (rows or len(order)) - waiting  # this call's share of the engine left
                if order and room > 0:
                    taken = [order.pop() for _ in range(min(len(order), room))]
                    worker.submit(ticket, [(i, ready[i].ids, ready[i].prompt) for i in taken], background=True)
                    waiting += len(taken)
                if not waiting:
                    break
                item = await results.get()
                if isinstance(item, BaseException):
                    waiting = 0
                    raise item
                i, generation = item
                waiting -= 1
                judgement = self.judgement(ready[i], generation)
                log.add(i, judgement)
                yield i, judgement
        finally:
            if waiting:
                worker.cancel(ticket)
            log.close(ticket.stats)

    def judgement(self, prepared: Prepared, generation: Generation) -> Judgement:
        """The judgement of one finished row: its reasoning, outcome and score (0.5 without finite logits)."""
        reasoning, n = split_reasoning(self.tokenizer, generation.tokens, generation.think)
        outcome = "answered" if generation.think is not None else "forced"
        t, f = generation.readout
        if not (math.isfinite(t) and math.isfinite(f)):
            return Judgement(0.5, "fallback", reasoning, n, len(prepared.ids), None, None, prepared.truncated)
        return Judgement(score(t, f), outcome, reasoning, n, len(prepared.ids), t, f, prepared.truncated)


# A short rank1 prompt, for the warning about a KV pool too small for one full-length reasoning.
_SHORT_PROMPT = 512


class _CallLog:
    """What one call's judgements did that a user may want to know: passages cut, reasoning unfinished."""

    def __init__(self, options: JudgeOptions):
        self.options = options
        self.count = self.cut = self.unfinished = self.capped = 0

    def add(self, index: int, judgement: Judgement) -> None:
        self.count += 1
        if judgement.truncated:
            self.cut += 1
            logger.info("pair %d: passage cut to fit context_size=%d", index, self.options.context_size)
        if judgement.outcome != "answered":
            self.unfinished += 1
            self.capped += judgement.reasoning_tokens >= self.options.max_new_tokens
            logger.debug("pair %d: %s (reasoning unfinished after %d tokens)", index, judgement.outcome,
                         judgement.reasoning_tokens)

    def close(self, stats: EngineStats) -> None:
        if self.cut:
            logger.warning("%d of %d passages were cut to fit context_size=%d (the passage only; the template "
                           "stays whole)", self.cut, self.count, self.options.context_size)
        if self.unfinished:
            # A row that ran out of tokens generated exactly the cap; fewer means the model's own end-of-sequence.
            logger.info("%d of %d pairs did not close </think> and were forced to an answer: %d reached "
                        "max_new_tokens=%d, %d ended their sequence (EOS) before it", self.unfinished, self.count,
                        self.capped, self.options.max_new_tokens, self.unfinished - self.capped)
        if stats.oom_retries:
            logger.warning("%d out-of-memory retries (the batch was split and run again)", stats.oom_retries)


def cut_at_tokens(tokenizer: PreTrainedTokenizerBase, text: str, limit: int) -> str:
    """``text`` cut to its first ``limit`` tokens, at a token boundary (the whole text when shorter)."""
    ends = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    return text if len(ends) <= limit else text[: ends[limit - 1]]


def default_batch_size() -> int:
    """Rows in flight when none is asked for: 32 on a GPU, 16 on a CPU."""
    return 32 if torch.cuda.is_available() else 16

