"""The scheduler's rules and the page allocator's counts, with no model: admission, headroom, preemption and
resume, compaction, out of memory, cancelling, and shared prompt pages."""

from collections import deque

import pytest

from rank1_hf.engine import scheduler as scheduler_module
from rank1_hf.engine.types import DecodeSettings, EngineStats, Request
from rank1_hf.errors import Rank1Error
from rank1_hf.engine.pages import PageAllocator
from rank1_hf.engine.scheduler import RowState, Scheduler

SIZE = 4  # tokens per page here, so page arithmetic stays small


class NeverCloses:
    def check(self, tokens):
        return None


def settings(batch_size=8):
    return DecodeSettings(max_new_tokens=50, eos_ids=frozenset({0}), pad_id=0, readout=(1, 2), detector=NeverCloses(),
                          tokenizer=None, context_size=64, kv_tokens=0, batch_size=batch_size)


def scheduler(usable_pages, batch_size=8, share=True):
    s = Scheduler(settings(batch_size), EngineStats(), share_prompts=share)
    s.bind(PageAllocator(batch_size, usable_pages + 1, row_pages=16, page_size=SIZE))
    return s


def requests(n, length=7, first=0):
    """Requests with distinct prompts of ``length`` tokens (no page of one matches another's)."""
    return deque(Request(k, [1000 * (k + 1) + i for i in range(length)], "") for k in range(first, first + n))


def prefilled(s, admitted):
    """What the engine does after a prefill: every admitted row holds its sequence."""
    for p in admitted:
        p.row.cached = len(p.row.sequence())


def assert_all_free(pages):
    assert all(r == 0 for r in pages.refs)
    assert sorted(pages.free) == list(range(1, pages.pages))


def test_admit_while_rows_and_pages_allow(monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", 0)
    s = scheduler(10)
    waiting = requests(7)  # 7 tokens + the next one: 2 pages each
    admitted = s.admit(waiting)
    assert [p.row.request.id for p in admitted] == [0, 1, 2, 3, 4]
    assert s.pages.free_pages == 0 and len(waiting) == 2 and waiting[0].id == 5
    s = scheduler(100, batch_size=3)
    waiting = requests(7)
    assert len(s.admit(waiting)) == 3 and s.wants() == 0 and len(waiting) == 4


def test_headroom_counts_the_rows_admitted_in_the_same_step():
    """Pages kept free: half a page per row in flight, the rows admitted earlier in this step included."""
    s = scheduler(10)
    waiting = requests(6)
    # row 0: 2 <= 10; row 1: 2 <= 8 - 0; row 2: 2 <= 6 - 1; row 3: 2 <= 4 - 1; row 4: 2 > 2 - 2
    assert len(s.admit(waiting)) == 4
    assert s.pages.free_pages == 2
    assert s.admit(waiting) == []  # the rows in flight count the same way in a later step


def test_a_pool_too_small_for_one_row_is_a_clear_error():
    s = scheduler(1)
    with pytest.raises(Rank1Error, match="kv_memory holds 4 tokens, too few for one row of 8"):
        s.admit(requests(1))
    s = scheduler(2)
    waiting = requests(1)
    prefilled(s, s.admit(waiting))
    s.rows[0].cached = 8  # its next token needs a third page
    with pytest.raises(Rank1Error, match="too few for one row of 9"):
        s.make_room(waiting)


def test_the_newest_row_is_preempted_first_wherever_its_slot(monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", 0)
    s = scheduler(8)
    waiting = requests(4)
    prefilled(s, s.admit(waiting))  # rows 0..3, two pages each: the pool is full
    s.rows[0].state = RowState.DONE
    finished = []
    compaction = s.release(finished)
    assert compaction.moves == [(3, 0)]  # the newest row moved into the freed slot 0
    assert [r.request.id for r in s.rows] == [3, 1, 2]
    for row in s.rows:
        row.cached = 8  # every row needs a third page; 2 are free
    s.make_room(waiting)
    assert waiting[0].id == 3 and s.stats.preemptions == 1
    assert [r.request.id for r in s.rows] == [2, 1]
    assert set(s.preempted) == {3}
    assert [s.pages.held(k) for k in range(2)] == [3, 3]


def test_a_resumed_row_comes_back_with_its_tokens_and_its_state(monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", 0)
    s = scheduler(6)
    waiting = requests(2, length=5)
    prefilled(s, s.admit(waiting))
    newest = s.rows[1]
    newest.tokens = [7, 8, 9]
    newest.state = RowState.READING  # it closed </think>: its readout is its next step
    for row in s.rows:
        row.cached = 12
    s.make_room(waiting)  # 4 + 4 pages wanted, 6 in the pool
    assert newest.state is RowState.PREEMPTED and waiting[0] is newest.request
    s.rows[0].state = RowState.DONE
    s.release([])
    (again,) = s.admit(waiting)
    assert again.row is newest and again.row.state is RowState.READING
    assert again.row.tokens == [7, 8, 9] and again.row.sequence() == newest.request.ids + [7, 8, 9]
    assert again.start == 0 and s.pages.held(0) == 3  # 8 tokens and the next one
    assert not s.preempted


def test_rows_limit_halves_after_out_of_memory():
    s = scheduler(100, batch_size=8)
    waiting = requests(10)
    s.admit(waiting)
    assert len(s.rows) == 8
    s.after_oom(waiting)
    assert s.rows_limit == 4 and not s.rows and s.pages is None
    assert [r.id for r in waiting] == list(range(10))  # the rows in flight wait again, first in line
    s.bind(PageAllocator(8, 101, 16, SIZE))
    s.admit(waiting)
    assert len(s.rows) == 4
    s.after_oom(waiting)
    assert s.rows_limit == 2
    empty = scheduler(100, batch_size=8)
    empty.after_oom(deque())  # making the pool failed: no rows yet
    assert empty.rows_limit == 4
    one = scheduler(100, batch_size=1)
    one.admit(requests(1))
    with pytest.raises(Rank1Error, match="out of memory on a single pair"):
        one.after_oom(deque())


def test_cancelled_rows_leave_the_slots_and_the_preempted_set(monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", 0)
    s = scheduler(6)
    waiting = requests(3)
    prefilled(s, s.admit(waiting))
    for row in s.rows:
        row.cached = 8
    s.make_room(waiting)
    assert set(s.preempted) == {2}
    s.drop({2, 0})
    assert not s.preempted and [r.request.id for r in s.rows] == [1]
    s.drop({1})
    assert not s.rows
    assert_all_free(s.pages)


# ---- shared prompt pages ---------------------------------------------------------------------------------

QUERY = list(range(1, 11))  # 10 tokens: pages 0 and 1 are the query's alone, page 2 starts the passage


def query_requests(n, first=0, passage=6):
    return deque(Request(k, QUERY + [500 + 10 * k + i for i in range(passage)], "") for k in range(first, first + n))


def test_rows_of_one_query_share_its_full_pages():
    s = scheduler(40)
    waiting = query_requests(3)
    a, b, c = s.admit(waiting)
    pages = s.pages
    assert (a.start, a.wave) == (0, 0)
    # b and c read the query's two pages, written by a's prefill in this same step: they run after it
    assert (b.start, b.wave) == (c.start, c.wave) == (8, 1)
    assert pages.tables[1][:2] == pages.tables[2][:2] == pages.tables[0][:2]
    assert len(set(pages.tables[0][2:] + pages.tables[1][2:] + pages.tables[2][2:])) == 9  # 3 own pages each
    assert [pages.refs[p] for p in pages.tables[0][:2]] == [3, 3]
    # no row may write a page another holds: not the readers, not the row that wrote it first
    assert [pages.writable_from(k, 7) for k in range(3)] == [False] * 3
    assert [pages.writable_from(k, 8) for k in range(3)] == [True] * 3
    assert s.stats.prefill_tokens_shared == 16
    prefilled(s, [a, b, c])
    (d,) = s.admit(query_requests(1, first=3))
    assert (d.start, d.wave) == (8, 0)  # pages written in an earlier step: no wave to wait for
    unshared = scheduler(40, share=False)
    assert [p.start for p in unshared.admit(query_requests(3))] == [0, 0, 0]
    assert unshared.stats.prefill_tokens_shared == 0


def test_the_last_prompt_page_is_never_shared():
    """Two rows with the same whole prompt (3 full pages): the second shares 2, and writes its last
    prompt page itself, so at least one token runs and no write ever lands in a shared page."""
    s = scheduler(40)
    same = [Request(k, list(range(1, 13)), "") for k in range(2)]
    a, b = s.admit(deque(same))
    assert b.start == 8 and s.pages.tables[1][2] != s.pages.tables[0][2]


def test_a_shared_page_survives_a_holder_preempted_and_is_freed_by_its_last(monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", 0)
    s = scheduler(9)
    waiting = query_requests(3, passage=2)
    prefilled(s, s.admit(waiting))  # 12 tokens + the next: 2 shared pages + 2 own each, 8 of 9
    query_pages = list(s.pages.tables[0][:2])
    for row in s.rows:
        row.cached = 16  # each needs a fifth page: 1 free, so the newest goes
    s.make_room(waiting)
    assert set(s.preempted) == {2}
    assert [s.pages.refs[p] for p in query_pages] == [2, 2]
    assert not set(query_pages) & set(s.pages.free)
    s.rows[0].state = RowState.DONE  # the row that wrote the query's pages leaves first
    s.release([])
    assert [s.pages.refs[p] for p in query_pages] == [1, 1] and not set(query_pages) & set(s.pages.free)
    (back,) = s.admit(waiting)  # the preempted row shares them again, from the row still holding them
    assert back.start == 8 and s.pages.tables[1][:2] == query_pages
    s.drop({1, 2})
    assert_all_free(s.pages)
    (fresh,) = s.admit(query_requests(1, first=5))
    assert fresh.start == 0  # a freed page is no longer found


def test_counts_return_to_zero_through_admissions_preemptions_and_compactions(monkeypatch):
    """A bounded random walk of admissions, growth, finishing and preemption over shared pages: every
    table page is counted once per holder, and everything is free at the end."""
    import random

    rng = random.Random(0)
    s = scheduler(30)
    waiting = deque(Request(k, QUERY[: rng.randint(4, 10)] + [900 + k] * rng.randint(1, 9), "") for k in range(60))
    for _ in range(300):
        if not waiting and not s.rows:
            break
        prefilled(s, s.admit(waiting))
        for row in s.rows:
            row.cached += 1
            row.tokens.append(7)
            if rng.random() < 0.1:
                row.state = RowState.DONE
        s.release([])
        s.make_room(waiting)
        held = [p for k in range(s.pages.slots) for p in s.pages.tables[k]]
        assert all(s.pages.refs[p] == held.count(p) for p in set(held))
        assert not set(held) & set(s.pages.free) and len(set(held)) + len(s.pages.free) == s.pages.pages - 1
    assert not waiting and not s.rows and s.stats.prefill_tokens_shared > 0
    assert_all_free(s.pages)


def test_the_scheduler_and_the_allocator_need_no_torch():
    import subprocess
    import sys

    code = "import sys, rank1_hf.engine.scheduler, rank1_hf.engine.pages; print(any(m.startswith('torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
