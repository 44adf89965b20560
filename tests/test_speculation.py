"""The prompt-lookup proposer (engine/speculation.py): no model, no torch."""

from rank1_hf.engine.speculation import MAX_DRAFTS, MAX_WAIT, MISSES, Lookup, draft_cap, plan_drafts


def test_longest_tail_first_at_its_most_recent_occurrence():
    # tail (7, 8, 9): the 3-gram occurs once (-> 1, 2); the 1-gram 9 occurs later (-> 5), but longest wins
    lookup = Lookup([7, 8, 9, 1, 2, 9, 5, 6, 7, 8, 9])
    assert lookup.propose(2) == [1, 2]
    # two occurrences of the 3-gram: the most recent one's followers
    lookup = Lookup([7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 7, 8, 9])
    assert lookup.propose(5) == [3, 4, 7, 8, 9]


def test_shorter_tails_when_longer_ones_never_occurred():
    lookup = Lookup([4, 5, 6, 1, 5, 6, 2, 3, 6])
    assert lookup.propose(3) == [2, 3, 6]  # (3, 6) and (2, 3, 6) occur nowhere earlier; 6 last occurred at 5
    assert Lookup([1, 2, 3, 4]).propose(3) == []  # nothing repeats
    assert Lookup([5]).propose(3) == []


def test_generated_tokens_join_the_index_and_drafts_stop_at_the_end():
    lookup = Lookup([10, 11, 12, 13])
    lookup.sync([10, 11])
    assert lookup.propose(5) == [12, 13, 10, 11]  # as far as the sequence goes
    lookup.sync([10, 11, 12, 20])
    assert lookup.propose(3) == []
    lookup.sync([10, 11, 12, 20, 10, 11, 12])
    assert lookup.propose(2) == [20, 10]  # (10, 11, 12) most recently led to 20, not to 13


def test_rows_whose_drafts_fail_wait_longer_each_time_and_recover():
    lookup = Lookup([1, 2, 1, 2], max_drafts=4)
    waits = []
    for _ in range(MISSES + 7):
        lookup.record(proposed=3, accepted=0)
        waits.append(lookup.wait)
        while not lookup.ready():
            pass
    assert waits == [0] * (MISSES - 1) + [1, 2, 4, 8, 16, MAX_WAIT, MAX_WAIT, MAX_WAIT]
    assert lookup.length == 1
    lookup.record(proposed=1, accepted=1)  # all accepted: doubles, and the misses start again
    assert (lookup.length, lookup.backoff, lookup.misses, lookup.ready()) == (2, 0, 0, True)
    lookup.record(proposed=2, accepted=2)
    lookup.record(proposed=4, accepted=2)  # partly accepted: one more than accepted
    assert lookup.length == 3
    lookup.record(proposed=0, accepted=0)  # nothing proposed: nothing learnt
    assert (lookup.length, lookup.wait) == (3, 0)


def test_a_step_keeps_rows_x_longest_draft_within_its_budget():
    rows = [Lookup([1, 2, 3, 1, 2, 3, 1, 2, 3], max_drafts=4) for _ in range(4)]
    rows[1].wait = 2
    drafts = plan_drafts([rows[0], rows[1], None, rows[2], rows[3]], [4, 4, 4, 1, 4], budget=10)
    assert drafts == [[1, 2], [], [], [1], [1, 2]]  # 10 // 5 rows: at most 2 each
    assert rows[1].wait == 1
    assert plan_drafts([rows[0]], [9], budget=100) == [[1, 2, 3]]  # the sequence ends after 3
    assert draft_cap(1, 32) == MAX_DRAFTS and draft_cap(8, 32) == min(MAX_DRAFTS, 4) and draft_cap(33, 32) == 0
    assert plan_drafts(rows, [4] * 4, budget=3) == [[]] * 4
