"""The scheduler of the continuous engine: which rows run, where they live, and what happens when the
pool is short. No torch here: it decides with a :class:`~rank1_hf.engine.pages.PageAllocator` alone, and the
engine (continuous.py) runs what it returns.

- Admission takes waiting requests into free slots while rows (``rows_limit``), the prefill budget
  (:data:`PREFILL_TOKENS`, padding counted) and pages allow, keeping :data:`HEADROOM` free pages per row in
  flight (rows admitted in the same step included); a prompt whose first full pages another row holds
  shares them (pages.py) and prefills only the rest.
- Before each decode step every row gets the page its next token goes to; while the pool is short the
  newest row is preempted: it gives its pages back and waits at the front with its tokens, and comes back
  in the state it left (a READING row still reads its readout).
- Finished and preempted rows leave their slots and the last rows move into the holes (compaction).
- After out of memory the rows in flight wait again and ``rows_limit`` halves.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .types import DecodeSettings, EngineStats, Request
from ..errors import Rank1Error
from ..model.kv_budget import pages_for

if TYPE_CHECKING:
    from .pages import PageAllocator
    from .speculation import Lookup
    from .stopping import ThinkEnd

# Free pages kept per row in flight when a new row is admitted: 0.5 took the fewest decode steps of 1,
# 0.5, 0.25 and 0 on benchmarks/kv_pool.py's workloads (fewer admitted rows with more headroom, more
# preemptions and prefills again with less).
HEADROOM = 0.5
# Most tokens one admission prefills, padding counted (rows x the longest part to run).
PREFILL_TOKENS = 8192


class RowState(enum.Enum):
    DECODING = "decoding"  # its next decode step gives its next token
    READING = "reading"  # it closed </think> cleanly: its next decode step's logits are its readout
    CLOSING = "closing"  # it needs a closing pass (unfinished, EOS, or </think> inside a token)
    DONE = "done"  # it has its readout (or nobody waits for it any more)
    PREEMPTED = "preempted"  # it gave its pages back and waits to be prefilled again with its tokens


@dataclass
class Row:
    request: Request
    cached: int = 0  # tokens whose keys/values are in the row's slot (positions 0..cached-1)
    tokens: list[int] = field(default_factory=list)
    think: ThinkEnd | None = None
    readout: tuple[float, float] | None = None
    state: RowState = RowState.DECODING
    age: int = 0  # admission order: the newest row is preempted first
    resumes: RowState = RowState.DECODING  # the state a PREEMPTED row goes back to
    lookup: Lookup | None = None  # its draft proposer, when the engine speculates (speculation.py)

    def sequence(self) -> list[int]:
        """Prompt and generated tokens: what a (re)admitted row prefills."""
        return self.request.ids + self.tokens

    def history(self) -> list[int]:
        """The tokens whose keys/values the slot holds."""
        return self.sequence()[: self.cached]


@dataclass(frozen=True)
class Prefill:
    """One admitted row to prefill: ``row.sequence()[start:]`` into slot ``slot``. A row of wave w reads
    shared pages that rows of waves < w write in the same step, so waves run in order."""

    slot: int
    row: Row
    start: int
    wave: int


@dataclass(frozen=True)
class Compaction:
    """Slots after rows left: ``moves`` (source, target) moved pages, ``before`` rows were in slots, ``left`` stay."""

    moves: list[tuple[int, int]]
    before: int
    left: int


class Scheduler:
    """Rows in slots 0..n-1 over the pages of one pool (``bind`` a new pool after out of memory)."""

    def __init__(self, settings: DecodeSettings, stats: EngineStats, share_prompts: bool = True):
        self.settings = settings
        self.stats = stats
        self.share_prompts = share_prompts
        self.rows_limit = settings.batch_size  # most rows in flight: halved by each out-of-memory retry
        self.rows: list[Row] = []  # rows[k] lives in slot k
        self.pages: PageAllocator | None = None
        self.preempted: dict[int, Row] = {}  # preempted rows by request id, until readmitted
        self._admitted = 0

    def bind(self, pages: PageAllocator) -> None:
        self.pages = pages

    def wants(self) -> int:
        """How many waiting requests the next step could take (its free slots)."""
        return max(0, self.rows_limit - len(self.rows))

    # ---- admission -----------------------------------------------------------------------------------

    def admit(self, waiting: deque[Request]) -> list[Prefill]:
        """Take requests from the left of ``waiting`` into slots len(rows).. while rows, the prefill budget
        and pages allow; a preempted request comes back with its tokens and its state."""
        pages, size = self.pages, self.pages.page_size
        admitted: list[Prefill] = []
        widest = 0
        writes: dict[int, int] = {}  # page -> wave of the prefill that writes it in this step
        while waiting and len(self.rows) < self.rows_limit:
            request = waiting[0]
            row = self.preempted.get(request.id) or Row(request)
            n = len(row.sequence())
            # The last prompt page is never shared: the row's own first position starts a fresh page.
            shared = pages.shareable(request.ids, (min(len(request.ids), n) - 1) // size) if self.share_prompts else []
            start = len(shared) * size
            if admitted and max(widest, n - start) * (len(admitted) + 1) > PREFILL_TOKENS:
                break
            need = pages_for(n + 1, size) - len(shared)  # its prompt (and tokens) and its next token
            # Headroom for the rows in flight to grow, so that a row admitted now is not preempted at the
            # next step to let an older one grow (which would prefill it again and again).
            if need > pages.free_pages - int(HEADROOM * len(self.rows)):
                if not self.rows:
                    raise Rank1Error(f"kv_memory holds {pages.free_pages * size} tokens, too few for one row of "
                                     f"{n + 1}: give more kv_memory or a shorter context_size")
                break
            waiting.popleft()
            self.preempted.pop(request.id, None)
            slot = len(self.rows)
            pages.share(slot, shared)
            pages.grow(slot, n + 1)
            pages.publish(slot, request.ids)
            wave = max((writes[p] + 1 for p in shared if p in writes), default=0)
            writes.update((p, wave) for p in pages.tables[slot][len(shared):])
            if row.state is RowState.PREEMPTED:
                row.state = row.resumes
            row.cached, row.age = 0, self._admitted
            self._admitted += 1
            self.rows.append(row)
            admitted.append(Prefill(slot, row, start, wave))
            self.stats.prefill_tokens_shared += start
            widest = max(widest, n - start)
        return admitted

    # ---- decoding ------------------------------------------------------------------------------------

    def make_room(self, waiting: deque[Request]) -> Compaction | None:
        """Give every row the page its next token goes to, preempting the newest rows while the pool is
        short; a preempted row waits at the front of ``waiting``. The compaction, if any row left."""
        pages, moved = self.pages, None
        while not all(pages.grow(k, row.cached + 1) for k, row in enumerate(self.rows)):
            if len(self.rows) == 1:
                raise Rank1Error(f"kv_memory holds {(pages.pages - 1) * pages.page_size} tokens, too few for one "
                                 f"row of {self.rows[0].cached + 1}: give more kv_memory")
            newest = max(self.rows, key=lambda r: r.age)
            newest.resumes, newest.state = newest.state, RowState.PREEMPTED
            self.preempted[newest.request.id] = newest
            waiting.appendleft(newest.request)
            self.stats.preemptions += 1
            moved = _merge(moved, self.release([]))
        return moved

    def advance(self, row: Row, token: int, true: float, false: float) -> None:
        """One step's greedy token and (true, false) logits applied to a row."""
        s = self.settings
        if row.state is RowState.READING:  # this step ran on the token that closed </think>
            row.readout = (true, false)
            row.state = RowState.DONE
            self.stats.readout_tokens += 1
            return
        if row.state is not RowState.DECODING:
            return
        if token in s.eos_ids:
            row.state = RowState.CLOSING
            return
        row.tokens.append(token)
        row.think = s.detector.check(row.tokens)
        if row.think is not None:
            row.state = RowState.READING if row.think.clean else RowState.CLOSING
        elif len(row.tokens) >= s.max_new_tokens:
            row.state = RowState.CLOSING

    def accept(self, row: Row, inputs: list[int], picked: list[tuple[float, float, float]]) -> int:
        """A verified run applied to a row: ``inputs`` (its last token, then drafts) ran from position
        ``row.cached``, and ``picked[j]`` is the (greedy token, true, false) after ``inputs[j]``.

        Position by position, as plain decoding would take them: each pick goes through :meth:`advance`
        (one home for the stop rules), and the next input counts only while the row still runs and that
        input is the token just picked. ``row.cached`` grows by the inputs kept; returns the drafts kept.
        """
        for j, (token, true, false) in enumerate(picked):
            row.cached += 1
            self.advance(row, int(token), true, false)
            if row.state not in (RowState.DECODING, RowState.READING) or j + 1 == len(inputs) or inputs[j + 1] != int(token):
                return j
        return len(picked) - 1

    # ---- leaving -------------------------------------------------------------------------------------

    def release(self, finished: list[Row]) -> Compaction:
        """Move DONE rows to ``finished`` and let PREEMPTED rows go, releasing their pages; the rows left
        stay in slots 0..n-1 (rows past n fill the holes, taking their pages along)."""
        rows = self.rows
        gone = [r.state in (RowState.DONE, RowState.PREEMPTED) for r in rows]
        n = len(rows) - sum(gone)
        if n == len(rows):
            return Compaction([], n, n)
        finished.extend(r for r in rows if r.state is RowState.DONE)
        for k in range(len(rows)):
            if gone[k]:
                self.pages.release(k)
        holes = [k for k in range(n) if gone[k]]
        movers = [k for k in range(n, len(rows)) if not gone[k]]
        kept = rows[:n]
        for hole, source in zip(holes, movers):
            self.pages.move(source, hole)
            kept[hole] = rows[source]
        self.rows = kept
        return Compaction(list(zip(movers, holes)), len(rows), n)

    def drop(self, ids: set[int]) -> Compaction:
        """Rows whose requests nobody waits for any more leave their slots (or the preempted set) now."""
        for row in self.rows:
            if row.request.id in ids:
                row.state = RowState.DONE
        for key in ids & self.preempted.keys():
            del self.preempted[key]
        return self.release([])

    def after_oom(self, waiting: deque[Request]) -> None:
        """Out of memory: every row in flight waits again (nothing was returned for them) and ``rows_limit``
        halves; the caller makes a new pool and binds it. A single row has nowhere smaller to go."""
        in_flight = [r.request for r in self.rows]
        tried = len(in_flight) or self.rows_limit  # no rows yet: allocating the pool failed
        if tried <= 1:
            raise Rank1Error("out of memory on a single pair: lower kv_memory, max_new_tokens or context_size")
        self.rows_limit = max(1, tried // 2)
        waiting.extendleft(reversed(in_flight))
        self.rows, self.pages = [], None


def _merge(first: Compaction | None, then: Compaction) -> Compaction:
    """Two compactions in a row, as one (moves applied in order)."""
    if first is None:
        return then
    return Compaction(first.moves + then.moves, first.before, then.left)
