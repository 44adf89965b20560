"""Generating rank1 reasoning for many prompts at once, with continuous batching over a paged KV pool.

The engine decodes greedily from token ids until each row closes ``</think>``, emits an end-of-sequence
token or reaches ``max_new_tokens``, and yields each row with its readout, the " true"/" false" logits
right after ``</think>``:

- a row that closed ``</think>`` cleanly reads them from its next decode step (no second pass);
- any other row (unfinished reasoning, or ``</think>`` ending inside a token) is closed by
  :func:`~rank1_hf.engine.readout.closing_ids`, the full token sequence to read after; the engine runs only the part of
  it that is not already in the row's cache (usually ``"\\n</think>"``: the prompt and the reasoning kept
  are reused).

A finished row leaves its slot at once and a waiting request takes it, so no row waits for another.
The engine only steps, for whichever caller drives it (worker.py). It joins two parts: the
:class:`~rank1_hf.engine.scheduler.Scheduler` (which rows run where, admission, preemption; no torch) and the
:class:`~rank1_hf.engine.runner.ModelRunner` (the pool, the forward calls, the captured step, the head); the
out-of-memory policy is here.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
from transformers import PreTrainedModel

from .decode_step import is_oom
from ..model.devices import input_device, use_device
from .types import DecodeSettings, EngineStats, Generation, Request
from .readout import closing_ids, forced_readout
from .runner import ModelRunner, supports
from .scheduler import Prefill, Row, RowState, Scheduler
from .speculation import Lookup, draft_cap, plan_drafts

logger = logging.getLogger(__name__)


class ContinuousEngine:
    """Continuous batching over a paged pool: row ``k`` of every decode step lives in slot ``k``.

    The engine lives as long as its ranker: the pool (and, on a GPU, the captured decode steps) are made
    once and serve every call. Each :meth:`step`:

    1. admit waiting requests into the free slots while rows and pages allow, and prefill them (only the
       part of a prompt no row in the pool holds; their last logits give their first token);
    2. give every row the page its next token needs, preempting the newest rows while the pool is
       short (a preempted row waits again, and its prompt and tokens are prefilled when it comes back);
    3. one decode step for every row (a READING row takes its readout); with speculation, a verification
       step when any row has drafts (the row's last token and its drafts, kept as far as they are greedy);
    4. close the rows that need it (one batched pass over only the tokens their cache lacks);
    5. return the finished rows, free their pages and compact: the last row moves into each freed slot.
    """

    name = "continuous"

    def __init__(self, model: PreTrainedModel, settings: DecodeSettings, share_prompts: bool = True):
        self.model = model
        self.device = input_device(model)  # made current around every step: any thread may drive the engine
        self.settings = settings
        self.stats = EngineStats()
        self.scheduler = Scheduler(settings, self.stats, share_prompts=share_prompts)
        self.runner = ModelRunner(model, settings)
        self.rows_stepped = 0  # rows in the last step's decode
        self.kv_tokens = settings.kv_tokens  # the pool, in tokens (halved by each out-of-memory retry)
        # "auto" verifies drafts only where plain steps run eager: a verification step always does, and
        # against a captured step it is unmeasured (benchmarks/RESULTS.md, the GPU plan).
        self.speculates = settings.speculate == "prompt-lookup" or (
            settings.speculate == "auto" and not self.runner.captures)

    supports = staticmethod(supports)

    @property
    def rows(self) -> list[Row]:
        return self.scheduler.rows

    # ---- the loop ------------------------------------------------------------------------------------

    def wants(self) -> int:
        """How many waiting requests the next step could take (its free slots)."""
        return self.scheduler.wants()

    @torch.inference_mode()
    def step(self, waiting: deque[Request]) -> list[tuple[Request, Generation]]:
        """Admit from the left of ``waiting``, decode one token for every row, and return the rows that
        finished, each with its readout. After out of memory the rows in flight go back to the left of
        ``waiting`` (nothing was returned for them) and the engine continues with half as many slots."""
        use_device(self.device)
        finished: list[Row] = []
        scheduler, runner = self.scheduler, self.runner
        self.rows_stepped = 0
        try:
            self._pool()
            admitted = scheduler.admit(waiting)
            if admitted:
                runner.head_on()
                self._prefill(admitted)
            self._close()  # rows whose first token already ended them
            runner.compact(scheduler.release(finished))
            if self.rows:
                moved = scheduler.make_room(waiting)
                if moved is not None:
                    runner.compact(moved)
                self._decode()
                self._close()
                runner.compact(scheduler.release(finished))
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            self._restart_smaller(waiting, error)
        if not self.rows:
            runner.head_off()
        out = []
        for row in finished:
            self.stats.generated_tokens += len(row.tokens)
            out.append((row.request, Generation(row.tokens, row.think, row.readout)))
        return out

    @torch.inference_mode()
    def drop(self, ids: set[int]) -> None:
        """Rows whose requests nobody waits for any more leave their slots now."""
        use_device(self.device)
        compaction = self.scheduler.drop(ids)
        if self.runner.cache is not None:
            self.runner.compact(compaction)
        if not self.rows:
            self.runner.head_off()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Make the pool now and, on a GPU, capture every decode bucket."""
        use_device(self.device)
        self._pool()
        if not self.rows:  # capturing writes every slot's scratch column
            try:
                self.runner.capture()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_oom(error):
                    raise
                self._restart_smaller(deque(), error)  # the next step: a smaller pool, captured again

    def close(self) -> None:
        """Put the model's own output head back (an engine that failed mid-step may still hold it)."""
        self.runner.head_off()

    def _pool(self) -> None:
        if self.runner.cache is None:
            self.scheduler.bind(self.runner.pool(self.scheduler.rows_limit, self.kv_tokens))

    # ---- running what the scheduler decided ----------------------------------------------------------

    def _prefill(self, admitted: list[Prefill]) -> None:
        """Prefill admitted rows from their first unshared position, wave by wave (a wave reads shared pages
        the waves before it write), in groups of similar length."""
        for wave in sorted({p.wave for p in admitted}):
            batch = sorted((p for p in admitted if p.wave == wave), key=lambda p: len(p.row.sequence()) - p.start)
            for group in _similar([len(p.row.sequence()) - p.start for p in batch]):
                part = [batch[k] for k in group]
                inputs = [p.row.sequence()[p.start :] for p in part]
                logits = self.runner.forward([p.slot for p in part], inputs, [p.start for p in part])
                self.stats.prefill_tokens += len(part) * max(len(x) for x in inputs)
                for p, (token, t, f) in zip(part, self.runner.pick(logits)):
                    p.row.cached = len(p.row.sequence())
                    self.scheduler.advance(p.row, int(token), t, f)

    def _decode(self) -> None:
        """One decode step for every row: a verification step when any row has drafts, else a plain one."""
        rows = self.rows
        n = self.rows_stepped = len(rows)
        drafts = self._drafts() if self.speculates else None
        if drafts is not None and any(drafts):
            self._verify(drafts)
        else:
            last = [r.tokens[-1] if r.tokens else self.settings.pad_id for r in rows]
            picked = self.runner.decode(last, [r.cached for r in rows])
            for row, (token, t, f) in zip(rows, picked):
                row.cached += 1
                self.scheduler.advance(row, int(token), t, f)
        self.stats.steps += 1
        self.stats.decode_slots += n
        self.stats.peak_rows = max(self.stats.peak_rows, n)

    def _drafts(self) -> list[list[int]] | None:
        """Each DECODING row's drafts, in the pages it holds or can take now (never preempting for them),
        and short of ``max_new_tokens`` (the run's last pick is a token of its own); None when this step has
        too many rows to verify drafts (speculation.draft_cap)."""
        s, pages = self.settings, self.scheduler.pages
        if draft_cap(len(self.rows)) == 0:
            return None
        lookups, rooms = [], []
        for row in self.rows:
            if row.state is not RowState.DECODING:
                lookups.append(None)
                rooms.append(0)
                continue
            if row.lookup is None:
                row.lookup = Lookup(row.request.ids)
            row.lookup.sync(row.tokens)
            lookups.append(row.lookup)
            rooms.append(s.max_new_tokens - len(row.tokens) - 1)
        drafts = plan_drafts(lookups, rooms)
        for slot, (row, draft) in enumerate(zip(self.rows, drafts)):
            if draft and not pages.grow(slot, row.cached + 1 + len(draft)):
                del draft[max(0, pages.held(slot) * pages.page_size - row.cached - 1) :]  # what its pages hold
        return drafts

    def _verify(self, drafts: list[list[int]]) -> None:
        """Every row's last token and its drafts in one call; each row keeps the drafts the model agrees with
        (scheduler.accept) and the rest leave no trace: hidden from attention, their extra pages given back."""
        rows, pages = self.rows, self.scheduler.pages
        inputs = [[r.tokens[-1]] + d for r, d in zip(rows, drafts)]
        picked = self.runner.verify(inputs, [r.cached for r in rows])
        for slot, (row, run, draft) in enumerate(zip(rows, picked, drafts)):
            kept = self.scheduler.accept(row, inputs[slot], run)
            if draft:
                row.lookup.record(len(draft), kept)
                self.stats.draft_tokens += len(draft)
                self.stats.accepted_tokens += kept
                self.runner.forget(slot, row.cached)
                pages.shrink(slot, row.cached + 1)

    def _close(self) -> None:
        """Read the CLOSING rows' closing sequences, running only the tokens their cache lacks."""
        rows, pages = self.rows, self.scheduler.pages
        closing = [k for k, r in enumerate(rows) if r.state is RowState.CLOSING]
        if not closing:
            return
        s, capacity = self.settings, self.runner.cache.capacity
        runs, too_long = [], []
        for slot in closing:
            row = rows[slot]
            sequence = closing_ids(s.tokenizer, row.request, row.tokens, row.think)
            history = row.history()
            kept = 0
            limit = min(len(history), len(sequence) - 1)  # at least one token runs, for the logits
            while kept < limit and history[kept] == sequence[kept]:
                kept += 1
            # A closing sequence that parts from the cache inside pages other rows hold too (shared with it, or
            # published by it) would write them: such a row, and one longer than a row or than the free
            # pages, gets a full pass instead.
            if not pages.writable_from(slot, kept) or len(sequence) > capacity or not pages.grow(slot, len(sequence)):
                too_long.append((row, sequence))
                continue
            runs.append((slot, sequence, kept))
        runs.sort(key=lambda run: len(run[1]) - run[2])
        for group in _similar([len(seq) - kept for _, seq, kept in runs]):
            batch = [runs[k] for k in group]
            logits = self.runner.forward([slot for slot, _, _ in batch], [seq[k:] for _, seq, k in batch],
                                         [k for _, _, k in batch])
            for (slot, seq, kept), pair in zip(batch, self.runner.readouts(logits)):
                row = rows[slot]
                row.readout, row.cached, row.state = pair, len(seq), RowState.DONE
                self.stats.readout_tokens += len(seq) - kept
                self.stats.reused_tokens += kept
        if too_long:
            sequences = [seq for _, seq in too_long]
            for (row, seq), pair in zip(too_long, forced_readout(self.model, sequences, s.pad_id, s.readout)):
                row.readout, row.state = pair, RowState.DONE
                self.stats.readout_tokens += len(seq)

    def _restart_smaller(self, waiting: deque[Request], error: BaseException) -> None:
        """After an out-of-memory error: restart every row in flight with half as many slots and half the pool.

        Nothing was yielded for them, so no row is lost or judged twice; only their partial work is redone.
        """
        try:
            self.scheduler.after_oom(waiting)
        except Exception as single:
            raise single from error
        self.stats.oom_retries += 1
        self.kv_tokens = max(1, self.kv_tokens // 2)
        logger.warning("out of memory: retrying with at most %d rows in flight and a KV pool of %d tokens",
                       self.scheduler.rows_limit, self.kv_tokens)
        self.runner.drop_pool()


def _similar(lengths: list[int], waste: float = 0.2) -> list[list[int]]:
    """Indices of ascending ``lengths`` cut into consecutive groups whose padding stays under ``waste``."""
    groups: list[list[int]] = []
    total = 0
    for k, n in enumerate(lengths):
        if groups and n * (len(groups[-1]) + 1) <= (1 + waste) * (total + n):
            groups[-1].append(k)
            total += n
        else:
            groups.append([k])
            total = n
    return groups
