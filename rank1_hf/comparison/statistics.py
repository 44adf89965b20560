"""Rank statistics of two variants' scores: Kendall tau-b, Spearman, top-N overlap, and the paired
randomization test."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

PERMUTATIONS = 10_000
SEED = 0
TOP_N = 10  # depth of the top-N overlap


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two paired score lists (ties allowed); None where it is undefined.

    tau-b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y)), with n0 = n(n-1)/2 pairs and
    ties_x / ties_y the pairs tied in x / in y. Undefined for fewer than 2 items or when every item is
    tied in x or in y (a zero denominator). O(n^2) with numpy, fine for the few hundred candidates of a query.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError("x and y must have the same length")
    n = len(a)
    if n < 2:
        return None
    upper = np.triu_indices(n, k=1)
    sx = np.sign(a[:, None] - a[None, :])[upper]
    sy = np.sign(b[:, None] - b[None, :])[upper]
    n0 = n * (n - 1) / 2
    denominator = math.sqrt((n0 - np.count_nonzero(sx == 0)) * (n0 - np.count_nonzero(sy == 0)))
    if denominator == 0:
        return None
    return float(np.sum(sx * sy) / denominator)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ascending, tied values sharing the mean of their ranks (the rule Spearman needs)."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    start = 0
    while start < len(v):
        end = start
        while end + 1 < len(v) and v[order[end + 1]] == v[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); None for < 2 items or a constant list."""
    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(np.dot(rx, rx) * np.dot(ry, ry)))
    if denominator == 0:
        return None
    # Clip: rounding can put a perfect correlation a hair above 1.
    return float(max(-1.0, min(1.0, np.dot(rx, ry) / denominator)))


def top_overlap(a: Sequence[str], b: Sequence[str], n: int = TOP_N) -> float:
    """Share of the first ``n`` ids of ranking ``a`` also among the first ``n`` of ``b``.

    Divided by min(n, len) so a query with fewer than ``n`` candidates can still reach 1.0.
    """
    depth = min(n, len(a), len(b))
    if depth == 0:
        return 1.0
    return len(set(a[:depth]) & set(b[:depth])) / depth


def paired_randomization_test(
    a: Sequence[float], b: Sequence[float], permutations: int = PERMUTATIONS, seed: int = SEED
) -> dict[str, Any]:
    """Two-sided paired randomization (sign-flip permutation) test of mean(b - a) = 0.

    Under the null hypothesis A and B are exchangeable for each query, so each per-query difference
    d_i = b_i - a_i is as likely to have either sign. The statistic is |mean(d)|; the p-value is the share
    of sign assignments whose |mean| is at least the observed one:

    * when 2^n <= ``permutations``, all 2^n assignments are enumerated and the p-value is exact;
    * otherwise ``permutations`` random assignments are drawn with numpy's default_rng(``seed``), and
      p = (1 + hits) / (1 + permutations), which never gives 0 for a sampled test.

    Degenerate case: when every d_i is 0 (e.g. identical per-query values) the mean difference is 0 and
    the p-value is 1.0 (every assignment is as extreme as the observation); no sampling is done. Queries
    with a zero difference do not move the statistic, so a single query that differs also gives p = 1.0:
    ``nonzero`` in the result says how many queries differ.
    """
    if len(a) != len(b):
        raise ValueError("a and b must have the same length")
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    observed = float(d.mean()) if n else 0.0
    result: dict[str, Any] = {"n": n, "nonzero": int(np.count_nonzero(d)), "mean_diff": observed,
                              "permutations": permutations, "seed": seed}
    if n == 0 or not np.any(d):
        return {**result, "p_value": 1.0, "method": "degenerate: all per-query differences are 0"}
    # A tolerance, so that sign assignments equal to the observation up to float rounding count as hits.
    threshold = abs(observed) - 1e-12 * max(1.0, float(np.abs(d).max()))
    if 2**n <= permutations:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)
        hits = int(np.count_nonzero(np.abs(signs @ d) / n >= threshold))
        return {**result, "p_value": hits / 2**n, "method": f"exact: all {2**n} sign assignments"}
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 1_000_000 // n)  # bounded memory however many queries there are
    for start in range(0, permutations, chunk):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(chunk, permutations - start), n))
        hits += int(np.count_nonzero(np.abs(signs @ d) / n >= threshold))
    return {**result, "p_value": (1 + hits) / (1 + permutations),
            "method": f"Monte Carlo: {permutations} random sign assignments, seed {seed}"}
