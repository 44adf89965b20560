"""Draft tokens by prompt lookup, for the continuous engine's exact speculative decoding (no torch here).

rank1's reasoning quotes its query and passage, so the tokens that followed a row's last few tokens
where they occurred before (in its prompt or its reasoning so far) are good guesses of what comes next.
A :class:`Lookup` per row proposes them: its last ``n`` tokens (n from :data:`MAX_NGRAM` down to 1,
longest first) are looked up at their most recent earlier occurrence, and the tokens after it are the
drafts. The engine verifies them in one forward call and keeps those that equal the model's greedy
choice (continuous.py), so the reasoning is the one plain decoding gives.

Drafts cost compute when they fail, so a row whose last :data:`MISSES` proposals kept nothing waits before
it proposes again (twice as long each time, up to :data:`MAX_WAIT` steps), and its draft length follows
what it recently had accepted. A verification call pads every row to the longest run, so its cost is rows x
(1 + the longest draft): a step lets each row propose at most ``budget // rows`` drafts
(:func:`draft_cap`), which keeps a step within ``rows + budget`` positions and turns speculation off
where many rows decode together and extra positions cost as much as they save (on a CPU).
"""

from __future__ import annotations

from typing import Sequence

# Longest n-gram looked up (prompt-lookup decoding's usual 3).
MAX_NGRAM = 3
# Defaults chosen on benchmarks/speculation.py (benchmarks/RESULTS.md): most drafts one row verifies per
# step, and the extra positions (padding included) one verification step may run over all its rows.
MAX_DRAFTS = 8
STEP_BUDGET = 16
# A row whose last MISSES proposals all failed waits before it proposes again: 1, 2, 4 ... MAX_WAIT steps.
MISSES = 6
MAX_WAIT = 32


class Lookup:
    """One row's n-gram index over its prompt and tokens, and its record of accepted drafts.

    ``index`` maps each n-gram (n <= :data:`MAX_NGRAM`) to the position right after its most recent
    occurrence, for occurrences ending before the last token (the last n-gram must match an earlier one).
    """

    def __init__(self, prompt: Sequence[int], max_drafts: int | None = None):
        self.sequence = list(prompt)
        self.prompt_length = len(prompt)
        self.max_drafts = max_drafts = max_drafts or MAX_DRAFTS
        self.length = max_drafts  # drafts to propose next, adapted to what was accepted
        self.wait = 0  # steps left before proposing again
        self.backoff = 0  # the wait after the next failure
        self.misses = 0  # proposals in a row that kept nothing
        self.index: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions < this are in the index

    def sync(self, tokens: Sequence[int]) -> None:
        """Take the row's generated ``tokens`` (the whole list so far; only new ones are added)."""
        have = len(self.sequence) - self.prompt_length
        if len(tokens) > have:
            self.sequence.extend(tokens[have:])

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest matching tail."""
        seq = self.sequence
        end = len(seq) - 1  # n-grams ending before the last token are looked up against the tail
        for stop in range(self._indexed + 1, end + 1):  # end positions (exclusive) not yet indexed
            for n in range(1, MAX_NGRAM + 1):
                if stop - n >= 0:
                    self.index[tuple(seq[stop - n : stop])] = stop
        self._indexed = max(self._indexed, end)
        if k <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(seq) - 1), 0, -1):
            after = self.index.get(tuple(seq[-n:]))
            if after is not None:
                return seq[after : after + k]
        return []

    def record(self, proposed: int, accepted: int) -> None:
        """What the last verification kept of this row's ``proposed`` drafts."""
        if proposed == 0:
            return
        if accepted == 0:
            self.misses += 1
            self.length = max(1, self.length // 2)
            if self.misses >= MISSES:
                self.backoff = min(MAX_WAIT, max(1, 2 * self.backoff))
                self.wait = self.backoff
        else:
            self.backoff = self.misses = 0
            self.length = min(self.max_drafts, 2 * self.length if accepted == proposed else accepted + 1)

    def ready(self) -> bool:
        """Whether this row proposes at this step (a waiting row counts one step down)."""
        if self.wait > 0:
            self.wait -= 1
            return False
        return True


def draft_cap(rows: int, budget: int | None = None) -> int:
    """Most drafts one row may propose in a step of ``rows`` rows (0: this step runs plain)."""
    return min(MAX_DRAFTS, (budget or STEP_BUDGET) // max(1, rows))


def plan_drafts(lookups: Sequence[Lookup | None], rooms: Sequence[int], budget: int | None = None) -> list[list[int]]:
    """Drafts for one step's rows: row r proposes at most ``rooms[r]`` tokens (None: it does not propose)
    and at most :func:`draft_cap` of the step's rows."""
    cap = draft_cap(len(lookups), budget)
    drafts: list[list[int]] = []
    for lookup, room in zip(lookups, rooms):
        if lookup is None or cap <= 0 or room <= 0 or not lookup.ready():
            drafts.append([])
            continue
        drafts.append(lookup.propose(min(room, lookup.length, cap)))
    return drafts
