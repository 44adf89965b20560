"""Generating rank1 reasoning for many prompts at once, with continuous batching over a paged KV pool.

The engine decodes greedily from token ids until each row closes ``</think>``, emits an end-of-sequence
token or reaches ``max_new_tokens``, and yields each row with its readout, the " true"/" false" logits
right after ``</think>``:

- a row that closed ``</think>`` cleanly reads them from its next decode step (no second pass);
- any other row (unfinished reasoning, or ``</think>`` ending inside a token) is closed by
  :func:`~rank1_hf.readout.closing_ids`, the full token sequence to read after; the engine runs only the part of
  it that is not already in the row's cache (usually ``"\\n</think>"``: the prompt and the reasoning kept
  are reused).

A finished row leaves its slot at once and a waiting request takes it, so no row waits for another.
The engine only steps: :class:`~rank1_hf.worker.EngineWorker` owns it, feeds it the requests of every
caller, and steps it from whichever caller's thread is waiting.
Every forward call is a plain ``model(...)`` with a :class:`~rank1_hf.kv_cache.PagedCache` as ``cache=``
and an explicit mask, so the model code stays transformers'.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .decode_step import StaticDecode, additive_mask, graphable, is_oom, pick, readout_ids
from .devices import input_device, use_device
from .engine_types import DecodeSettings, EngineStats, Generation, Request
from .errors import Rank1Error
from .head import fast_head
from .kv_cache import PAGE_SIZE, PagedCache, Placement
from .readout import closing_ids, forced_readout
from .stopping import ThinkEnd

logger = logging.getLogger(__name__)


# Row states. A READING row closed </think> cleanly: its next decode step's logits are its readout.
# Free pages kept per row in flight when a new row is admitted (see ContinuousEngine._admit): 0.5 took
# the fewest decode steps of 1, 0.5, 0.25 and 0 on benchmarks/kv_pool.py's workloads (fewer admitted rows
# with more headroom, more preemptions and prefills again with less).
HEADROOM = 0.5

# A PREEMPTED row gave its pages back and waits to be prefilled again with its tokens.
DECODING, READING, CLOSING, DONE, PREEMPTED = range(5)


@dataclass
class _Row:
    request: Request
    cached: int = 0  # tokens whose keys/values are in the row's slot (positions 0..cached-1)
    tokens: list[int] = field(default_factory=list)
    think: ThinkEnd | None = None
    readout: tuple[float, float] | None = None
    state: int = DECODING
    age: int = 0  # admission order: the newest row is preempted first
    resumes: int = DECODING  # the state a PREEMPTED row goes back to (DECODING, or READING its readout)

    def sequence(self) -> list[int]:
        """Prompt and generated tokens: what a (re)admitted row prefills."""
        return self.request.ids + self.tokens

    def history(self) -> list[int]:
        """The tokens whose keys/values the slot holds."""
        return self.sequence()[: self.cached]


class ContinuousEngine:
    """Continuous batching over a :class:`PagedCache`: row ``k`` of every decode step lives in slot ``k``.

    The engine lives as long as its ranker: the cache (and, on a GPU, the captured decode steps) are made
    once and serve every call. Each :meth:`step`:

    1. admit waiting requests into the free slots (``len(rows)..``) while rows and pages allow, and
       prefill them (their last logits give their first token);
    2. give every row the page its next token needs, preempting the newest rows while the pool is
       short (a preempted row waits again, and its prompt and tokens are prefilled when it comes back);
    3. one decode step for every row; a READING row takes its readout;
    4. close the rows that need it (one batched pass over only the tokens their cache lacks);
    5. return the finished rows, free their pages and compact: the last row moves into each freed slot.
    """

    name = "continuous"

    def __init__(self, model: PreTrainedModel, settings: DecodeSettings, prefill_tokens: int = 8192):
        self.model = model
        self.device = input_device(model)  # made current around every step: any thread may drive the engine
        self.settings = settings
        self.prefill_tokens = prefill_tokens
        self.stats = EngineStats(rows_limit=settings.batch_size)  # rows_limit shrinks on out-of-memory
        self.rows: list[_Row] = []  # rows[k] lives in slot k
        self.rows_stepped = 0  # rows in the last step's decode
        self.cache: PagedCache | None = None
        self.kv_tokens = settings.kv_tokens  # the pool, in tokens (halved by each out-of-memory retry)
        self._resume: dict[int, _Row] = {}  # preempted rows by request id: their tokens, until readmitted
        self._admitted = 0
        self._sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        # On one GPU with plain weights, decode steps are CUDA graphs (decode_step.py); its boolean mask
        # is taken as is by sdpa attention only.
        self._static_step = graphable(model) and self._sdpa
        self._static: StaticDecode | None = None  # bound to the current cache and mask
        self._head = contextlib.ExitStack()  # the fast output head, in place while rows are in flight

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        """Plain full-attention KV caches with sdpa or eager attention (no sliding window, no hybrid layers)."""
        if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            return False
        try:
            cache = DynamicCache(config=model.config)
        except Exception:
            return False
        return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)

    # ---- the loop ------------------------------------------------------------------------------------

    def wants(self) -> int:
        """How many waiting requests the next step could take (its free slots)."""
        return max(0, self.stats.rows_limit - len(self.rows))

    @torch.inference_mode()
    def step(self, waiting: deque[Request]) -> list[tuple[Request, Generation]]:
        """Admit from the left of ``waiting``, decode one token for every row, and return the rows that
        finished, each with its readout. After out of memory the rows in flight go back to the left of
        ``waiting`` (nothing was returned for them) and the engine continues with half as many slots."""
        use_device(self.device)
        finished: list[_Row] = []
        self.rows_stepped = 0
        try:
            admitted = self._admit(waiting)
            if admitted:
                self._enter_head()
                self.rows.extend(admitted)
                self._prefill(admitted, start=len(self.rows) - len(admitted))
            self._close(self.rows)  # rows whose first token already ended them
            self.rows = self._release(self.rows, finished)
            if self.rows:
                self.rows = self._make_room(self.rows, waiting)
                self._decode(self.rows)
                self._close(self.rows)
                self.rows = self._release(self.rows, finished)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            self.rows = self._restart_smaller(self.rows, waiting, error)
        if not self.rows:
            self._head.close()
        out = []
        for row in finished:
            self.stats.generated_tokens += len(row.tokens)
            out.append((row.request, Generation(row.tokens, row.think, row.readout)))
        return out

    @torch.inference_mode()
    def drop(self, ids: set[int]) -> None:
        """Rows whose requests nobody waits for any more leave their slots now."""
        use_device(self.device)
        for row in self.rows:
            if row.request.id in ids:
                row.state = DONE
        for key in ids & self._resume.keys():
            del self._resume[key]
        self.rows = self._release(self.rows, [])
        if not self.rows:
            self._head.close()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Make the cache now and, on a GPU, capture every decode bucket."""
        use_device(self.device)
        self._cache_now()
        if self._static is not None and not self.rows:  # capturing writes every slot's scratch column
            try:
                self._static.capture_all()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_oom(error):
                    raise
                self._restart_smaller([], deque(), error)  # the next step: a smaller pool, captured again

    def close(self) -> None:
        """Put the model's own output head back (an engine that failed mid-step may still hold it)."""
        self._head.close()

    def _enter_head(self) -> None:
        if not self._head._exit_callbacks:  # type: ignore[attr-defined]
            self._head.enter_context(fast_head(self.model, self.settings.readout))

    def _admit(self, waiting: deque[Request]) -> list[_Row]:
        """Take requests into free slots while rows and pages allow (a prefill batch stays under
        prefill_tokens); a preempted request comes back with its tokens."""
        cache = self._cache_now()
        admitted: list[_Row] = []
        widest, free = 0, len(cache.free)
        while waiting and len(self.rows) + len(admitted) < self.stats.rows_limit:
            request = waiting[0]
            row = self._resume.get(request.id) or _Row(request)
            n = len(row.sequence())
            if admitted and max(widest, n) * (len(admitted) + 1) > self.prefill_tokens:
                break
            pages = -(-(n + 1) // cache.page_size)  # its prompt (and tokens) and its next token
            # Headroom for the rows already in flight to grow, so that a row admitted now is not preempted
            # at the next step to let an older one grow (which would prefill it again and again).
            if pages > free - int(HEADROOM * (len(self.rows) + len(admitted))):
                if not self.rows and not admitted:
                    raise Rank1Error(f"kv_memory holds {free * cache.page_size} tokens, too few for one row of "
                                     f"{n + 1}: give more kv_memory or a shorter context_size")
                break
            free -= pages
            waiting.popleft()
            self._resume.pop(request.id, None)
            widest = max(widest, n)
            row.cached, row.age = 0, self._admitted
            if row.state == PREEMPTED:
                row.state = row.resumes
            self._admitted += 1
            admitted.append(row)
        admitted.sort(key=lambda r: len(r.sequence()))  # prefill groups rows of similar length
        for k, row in enumerate(admitted, len(self.rows)):
            cache.reserve(k, len(row.sequence()) + 1)
        return admitted

    @torch.inference_mode()
    def _cache_now(self) -> PagedCache:
        """The paged cache, made once: ``rows_limit`` slots over a pool of ``kv_tokens`` tokens."""
        if self.cache is None:
            s = self.settings
            row_tokens = s.context_size + _CLOSE_MARGIN
            # Never more pages than every slot could fill: the pool is allocated (zeroed) whole.
            pool = min(self.kv_tokens, self.stats.rows_limit * -(-row_tokens // PAGE_SIZE) * PAGE_SIZE)
            self.cache = PagedCache(self.model, self.stats.rows_limit, pool // PAGE_SIZE + 1, row_tokens)
            self._visible = torch.zeros((self.stats.rows_limit, self.cache.capacity + 1), dtype=torch.bool,
                                        device=input_device(self.model))
            self._bind_static()
        return self.cache

    def _make_room(self, rows: list[_Row], waiting: deque[Request]) -> list[_Row]:
        """Give every row the page its next token goes to, preempting the newest rows while the pool is
        short: a preempted row drops its keys and values and waits at the front with its tokens."""
        cache = self.cache
        while not all(cache.reserve(k, row.cached + 1) for k, row in enumerate(rows)):
            if len(rows) == 1:
                raise Rank1Error(f"kv_memory holds {(cache.pages - 1) * cache.page_size} tokens, too few for one "
                                 f"row of {rows[0].cached + 1}: give more kv_memory")
            newest = max(rows, key=lambda r: r.age)
            newest.resumes, newest.state = newest.state, PREEMPTED
            self._resume[newest.request.id] = newest
            waiting.appendleft(newest.request)
            self.stats.preemptions += 1
            rows = self._release(rows, [])
        return rows

    def _bind_static(self) -> None:
        if self._static_step:
            s = self.settings
            self._static = StaticDecode(self.model, self.cache, self._visible, s.readout, s.pad_id)

    # ---- forward calls -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, slots: list[int], inputs: list[list[int]], offsets: list[int]) -> torch.Tensor:
        """One model call: row r's ``inputs[r]`` go to positions ``offsets[r]..`` of slot ``slots[r]``.

        Rows are left-padded to a common width; padding writes to the cache's scratch page and attends to
        column 0 only. Returns the last position's logits, (rows, vocab) float32.
        """
        cache, device = self.cache, input_device(self.model)
        cache.sync()
        width_in = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width_in), self.settings.pad_id, dtype=torch.long)
        positions = torch.full((len(inputs), width_in), cache.scratch, dtype=torch.long)
        for r, (tokens, offset) in enumerate(zip(inputs, offsets)):
            pad = width_in - len(tokens)
            ids[r, pad:] = torch.tensor(tokens, dtype=torch.long)
            positions[r, pad:] = torch.arange(offset, offset + len(tokens))
        width = max(o + len(x) for x, o in zip(inputs, offsets))
        # Query at position p sees columns 0..p; a padding query sees column 0 only (its output is unused).
        columns = torch.arange(width)
        seen = positions.clamp(max=width - 1)
        seen[positions == cache.scratch] = 0
        mask = columns[None, None, :] <= seen[:, :, None]
        cache.place(Placement(torch.tensor(slots), positions, width))
        self._set_visible(slots, [o + len(x) for x, o in zip(inputs, offsets)])
        return self._logits(ids, positions.clamp(max=cache.capacity - 1), mask[:, None], device)

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, device) -> torch.Tensor:
        if not self._sdpa:  # eager attention adds its mask
            mask = additive_mask(mask, self.model.dtype)
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),  # 4D: transformers uses it as given
            position_ids=positions.to(device),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def _prefill(self, admitted: list[_Row], start: int) -> None:
        """Prefill rows in slots ``start..``, in groups of similar length (``admitted`` is sorted by length)."""
        for group in _similar([len(r.sequence()) for r in admitted]):
            rows = [admitted[k] for k in group]
            first = start + group[0]
            logits = self._forward(list(range(first, first + len(rows))), [r.sequence() for r in rows], [0] * len(rows))
            self.stats.prefill_tokens += len(rows) * max(len(r.sequence()) for r in rows)
            for row in rows:
                row.cached = len(row.sequence())
            self._apply(rows, self._pick(logits))

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        """One token for every row, over slots 0..n-1: inputs, mask and cache reads are views or O(rows)."""
        n = self.rows_stepped = len(rows)
        last = [r.tokens[-1] if r.tokens else self.settings.pad_id for r in rows]
        cached = [r.cached for r in rows]
        self.cache.sync()
        if self._static is not None:
            picked = self._static.run(last, cached)
        else:
            positions = torch.tensor(cached, dtype=torch.long)[:, None]
            width = max(cached) + 1
            self.cache.place(Placement(torch.arange(n), positions, width))
            self._visible[torch.arange(n), positions[:, 0]] = True
            mask = self._visible[:n, None, None, :width]
            ids = torch.tensor(last, dtype=torch.long)[:, None]
            picked = self._pick(self._logits(ids, positions, mask, input_device(self.model)))
        for row in rows:
            row.cached += 1
        self.stats.steps += 1
        self.stats.decode_slots += n
        self.stats.peak_rows = max(self.stats.peak_rows, n)
        self._apply(rows, picked)

    def _pick(self, logits: torch.Tensor) -> list[tuple[float, float, float]]:
        """(greedy token, true logit, false logit) per row of (rows, vocab) logits: one device-to-host copy."""
        picked = torch.empty((len(logits), 3), dtype=torch.float64, device=logits.device)
        pick(logits, readout_ids(self.settings.readout, logits.device), picked)
        return picked.tolist()

    def _apply(self, rows: list[_Row], picked: list[tuple[float, float, float]]) -> None:
        """One step's (token, true, false) per row applied to the rows."""
        s = self.settings
        for row, (token, t, f) in zip(rows, picked):
            if row.state == READING:  # this step ran on the token that closed </think>
                row.readout = (t, f)
                row.state = DONE
                self.stats.readout_tokens += 1
                continue
            if row.state != DECODING:
                continue
            token = int(token)
            if token in s.eos_ids:
                row.state = CLOSING
                continue
            row.tokens.append(token)
            row.think = s.detector.check(row.tokens)
            if row.think is not None:
                row.state = READING if row.think.clean else CLOSING
            elif len(row.tokens) >= s.max_new_tokens:
                row.state = CLOSING

    @torch.inference_mode()
    def _close(self, rows: list[_Row]) -> None:
        """Read the CLOSING rows' closing sequences, running only the tokens their cache lacks."""
        closing = [r for r in rows if r.state == CLOSING]
        if not closing:
            return
        s, capacity = self.settings, self.cache.capacity
        slot = {id(r): k for k, r in enumerate(rows)}
        runs, too_long = [], []
        for row in closing:
            sequence = closing_ids(s.tokenizer, row.request, row.tokens, row.think)
            if len(sequence) > capacity or not self.cache.reserve(slot[id(row)], len(sequence)):
                too_long.append((row, sequence))
                continue
            history = row.history()
            shared = 0
            limit = min(len(history), len(sequence) - 1)  # at least one token runs, for the logits
            while shared < limit and history[shared] == sequence[shared]:
                shared += 1
            runs.append((row, sequence, shared))
        runs.sort(key=lambda run: len(run[1]) - run[2])
        for group in _similar([len(seq) - shared for _, seq, shared in runs]):
            batch = [runs[k] for k in group]
            logits = self._forward([slot[id(r)] for r, _, _ in batch], [seq[k:] for _, seq, k in batch],
                                   [k for _, _, k in batch])
            pairs = logits[:, list(s.readout)].tolist()
            for (row, seq, shared), pair in zip(batch, pairs):
                row.readout = (pair[0], pair[1])
                row.cached = len(seq)
                row.state = DONE
                self.stats.readout_tokens += len(seq) - shared
                self.stats.reused_tokens += shared
        if too_long:  # longer than a row (re-tokenized text can grow) or than the free pages: a full pass
            sequences = [seq for _, seq in too_long]
            for (row, seq), pair in zip(too_long, forced_readout(self.model, sequences, s.pad_id, s.readout)):
                row.readout = pair
                row.state = DONE
                self.stats.readout_tokens += len(seq)

    # ---- slots ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _release(self, rows: list[_Row], finished: list[_Row]) -> list[_Row]:
        """Move DONE rows to ``finished`` and let PREEMPTED rows go, freeing their pages; the rows left stay
        in slots 0..n-1 (rows past n fill the holes, taking their pages along: no keys or values move)."""
        gone = [r.state in (DONE, PREEMPTED) for r in rows]
        n = len(rows) - sum(gone)
        if n == len(rows):
            return rows
        finished.extend(r for r in rows if r.state == DONE)
        for k in range(len(rows)):
            if gone[k]:
                self.cache.release(k)
        holes = [k for k in range(n) if gone[k]]
        movers = [k for k in range(n, len(rows)) if not gone[k]]
        kept = rows[:n]
        for hole, source in zip(holes, movers):
            self.cache.move(source, hole)
            self._visible[hole] = self._visible[source]
            kept[hole] = rows[source]
        self._visible[n : len(rows)] = False
        return kept

    def _set_visible(self, slots: list[int], lengths: list[int]) -> None:
        for slot, length in zip(slots, lengths):
            self._visible[slot, :length] = True
            self._visible[slot, length:] = False

    def _restart_smaller(self, rows: list[_Row], waiting: deque[Request], error: BaseException) -> list[_Row]:
        """After an out-of-memory error: restart every row in flight with half as many slots and half the pool.

        Nothing was yielded for them, so no row is lost or judged twice; only their partial work is redone.
        """
        in_flight = [r.request for r in rows]
        tried = len(in_flight) or self.stats.rows_limit  # no rows yet: allocating the cache failed
        if tried <= 1:
            raise Rank1Error("out of memory on a single pair: lower kv_memory, max_new_tokens or context_size") from error
        self.stats.oom_retries += 1
        self.stats.rows_limit = max(1, tried // 2)
        self.kv_tokens = max(1, self.kv_tokens // 2)
        logger.warning("out of memory: retrying with at most %d rows in flight and a KV pool of %d tokens",
                       self.stats.rows_limit, self.kv_tokens)
        waiting.extendleft(reversed(in_flight))
        self.cache = self._static = None
        return []


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


# Room in a slot beyond prompt + max_new_tokens for the closing tokens ("\n</think>" and re-tokenization).
_CLOSE_MARGIN = 64
