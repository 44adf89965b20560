"""Compare two variants of a rank1 model (e.g. float vs bnb-8bit, bfloat16 vs AWQ) on the same pairs.

Both variants judge the same first-stage pairs through the rerank pipeline (:mod:`rank1_hf.pipeline`)
and the same resumable :class:`~rank1_hf.store.JudgementStore`, each under its own settings key. So a
comparison reuses the judgements of an earlier ``rank1-hf rerank`` with the same store and settings,
and an interrupted comparison resumes where it stopped.

The report (:func:`build_report`, written by :func:`write_report`) holds:

* per pair: score difference B - A, outcome agreement, reasoning-length difference, identical chains;
* per query: Kendall tau-b and Spearman correlation of A's and B's scores of the query's candidates,
  and the overlap of their top 10;
* with qrels: the measures of the first-stage top-k, A and B, and a paired randomization test of A vs B
  on nDCG@10 over queries (:func:`paired_randomization_test`);
* cost of each variant: pairs/s and generated tokens/s while judging, load time, peak memory;
* figures (with matplotlib, ``pip install 'rank1-hf[plot]'``): score scatter, histogram of score
  differences, per-query nDCG@10 bars. ``report.json`` holds every number and the data of every figure.

From Python::

    from rank1_hf import Rank1, compare, pipeline, formats
    from rank1_hf.store import JudgementStore

    items = pipeline.load_items("run.trec", "queries.jsonl", "corpus.jsonl", top_k=20)
    with JudgementStore("judgements.sqlite") as store:
        a = compare.judge_variant("A", lambda: Rank1("jhu-clsp/rank1-7b"), items, store)
        b = compare.judge_variant("B", lambda: Rank1("jhu-clsp/rank1-7b", quantization="bnb-4bit"), items, store)
    report = compare.build_report(items, a, b, qrels=formats.read_qrels("qrels.txt"))
    compare.write_report(report, "report/")
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from . import pipeline, formats
from .errors import Rank1Error
from .evaluate import DEFAULT_MEASURES

if TYPE_CHECKING:  # the ranker pulls in torch; the statistics do not need it
    from .ranker import Rank1
    from .store import JudgementStore

PERMUTATIONS = 10_000
SEED = 0
TEST_MEASURE = "nDCG@10"
TOP_N = 10  # depth of the top-N overlap
REPORT_VERSION = 1
FIGURE_FILES = {
    "score_scatter": "score_scatter.png",
    "score_diff_histogram": "score_diff_histogram.png",
    "per_query_ndcg": "per_query_ndcg.png",
}
_PLOT_HINT = "matplotlib is not installed: pip install 'rank1-hf[plot]'"


# ---------------------------------------------------------------------------------------------- rank statistics


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


# ---------------------------------------------------------------------------------------------- paired test


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


# ---------------------------------------------------------------------------------------------- judging + cost


class PeakMemory:
    """Peak memory over a span: ``torch.cuda.max_memory_allocated`` (summed over GPUs) when CUDA is in
    use, and the peak resident set size (RSS) above the RSS at the start, sampled every 10 ms.

    The RSS delta misses memory the allocator keeps from before the span (freed by the previous
    variant but not returned to the OS), so it can read low; the GPU figure is exact.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.gpu_peak_bytes: int | None = None
        self.rss_delta_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_rss = self._peak_rss = 0
        self._cuda = False

    @staticmethod
    def _rss() -> int | None:
        try:  # Linux: resident pages are the second field
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak_rss = max(self._peak_rss, self._rss() or 0)

    def __enter__(self) -> "PeakMemory":
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        start = self._rss()
        if start is not None:
            self._start_rss = self._peak_rss = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak_rss = max(self._peak_rss, self._rss() or 0)
            self.rss_delta_bytes = self._peak_rss - self._start_rss
        if self._cuda:
            self.gpu_peak_bytes = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))

    @property
    def peak_bytes(self) -> int | None:
        """The headline number: the GPU peak when the GPUs were used, else the RSS delta."""
        return self.gpu_peak_bytes if self.gpu_peak_bytes else self.rss_delta_bytes

    @property
    def measure(self) -> str:
        return ("torch.cuda.max_memory_allocated (all GPUs)" if self.gpu_peak_bytes
                else "peak RSS minus RSS at the start (sampled every 10 ms)")


@dataclass
class VariantRun:
    """One variant's judgements of the items, with what they cost."""

    name: str  # "A" or "B"
    label: str
    settings: dict[str, Any]
    settings_key: str
    result: pipeline.Result
    cost: dict[str, Any] = field(default_factory=dict)


def judge_variant(
    name: str,
    ranker: "Rank1 | Callable[[], Rank1]",
    items: Sequence[pipeline.Item],
    store: "JudgementStore",
    *,
    label: str | None = None,
    batch_size: int | None = None,
    flush_every: int | None = None,
    progress: Callable[[int], Any] | None = None,
    on_start: Callable[[int, int], Any] | None = None,
) -> VariantRun:
    """Judge ``items`` with one variant through :func:`rank1_hf.pipeline.judge_items` and measure it.

    ``ranker`` is a loaded :class:`~rank1_hf.ranker.Rank1` or a function that loads one: with a function,
    loading is timed and inside the memory measurement (so quantized weights show up as less memory),
    and the model is released on return. Pairs already in the store are reused and not measured: the
    cost covers only the pairs judged now (None rates when there are none).
    """
    from .store import settings_key

    with PeakMemory() as memory:
        started = time.monotonic()
        loaded = ranker if hasattr(ranker, "judge_iter") else ranker()
        load_s = None if loaded is ranker else time.monotonic() - started
        result = pipeline.judge_items(loaded, items, store, batch_size=batch_size, flush_every=flush_every,
                                      shard=pipeline.Shard(), progress=progress, on_start=on_start)
    summary = result.summary
    judged = summary.judged_now
    # judge_items calls judge_iter once when it judges anything, and judge_iter replaces last_stats
    # with that call's counts; with nothing judged, last_stats is from an older call and is ignored.
    tokens = loaded.last_stats.generated_tokens if judged else 0
    seconds = summary.judging_s
    settings = loaded.settings()
    try:
        weights = int(loaded.model.get_memory_footprint())
    except Exception:  # not every model type reports it; it is a nicety
        weights = None
    device = str(getattr(loaded.model, "device", "?"))
    cost = {
        "judged_now": judged,
        "reused": summary.reused,
        "judging_s": seconds,
        "pairs_per_s": judged / seconds if judged and seconds > 0 else None,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds if judged and seconds > 0 else None,
        "load_s": load_s,
        "peak_memory_bytes": memory.peak_bytes,
        "gpu_peak_bytes": memory.gpu_peak_bytes,
        "rss_delta_bytes": memory.rss_delta_bytes,
        "memory_measure": f"{memory.measure}, over {_span(load_s is not None, judged > 0)}",
        "weights_bytes": weights,
        "device": device,
        "note": _cost_note(judged, summary.reused),
    }
    del loaded
    return VariantRun(name, label or settings.get("model", name), settings, settings_key(settings), result, cost)


def _span(loaded: bool, judged: bool) -> str:
    if loaded:
        return "model load + judging" if judged else "model load only (nothing judged)"
    return "judging" if judged else "nothing (nothing loaded or judged)"


def _cost_note(judged: int, reused: int) -> str:
    if not judged:
        return f"all {reused} distinct pairs were reused from the store: no judging cost measured"
    if reused:
        return f"cost over the {judged} pairs judged now; {reused} were reused from the store"
    return f"cost over all {judged} pairs, judged now"


def release_memory() -> None:
    """Give back a dropped model's memory before loading the next one (peak figures stay per variant)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------- statistics


def _describe(values: Sequence[float | None]) -> dict[str, Any]:
    """mean / median / min / max over the defined values, and how many were undefined (None)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "median": None, "min": None, "max": None, "defined": 0, "undefined": len(values)}
    return {"mean": statistics.fmean(defined), "median": float(statistics.median(defined)),
            "min": min(defined), "max": max(defined), "defined": len(defined),
            "undefined": len(values) - len(defined)}


def pair_rows(items: Sequence[pipeline.Item], a: VariantRun, b: VariantRun) -> list[dict[str, Any]]:
    """One record per item (job order): both judgements' numbers side by side."""
    rows = []
    for it in items:
        ja, jb = a.result.judgements[(it.qid, it.docid)], b.result.judgements[(it.qid, it.docid)]
        rows.append({
            "qid": it.qid, "docid": it.docid,
            "score_a": ja.score, "score_b": jb.score, "score_diff": jb.score - ja.score,
            "outcome_a": ja.outcome, "outcome_b": jb.outcome,
            "reasoning_tokens_a": ja.reasoning_tokens, "reasoning_tokens_b": jb.reasoning_tokens,
            "identical_reasoning": ja.reasoning == jb.reasoning,
        })
    return rows


def pair_statistics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Score, outcome and reasoning differences over the pairs (B minus A)."""
    n = len(rows)
    diffs = [r["score_diff"] for r in rows]
    absolute = [abs(d) for d in diffs]
    worst = max(range(n), key=lambda i: absolute[i]) if n else None
    outcome_table: dict[str, int] = {}
    for r in rows:
        key = f"{r['outcome_a']}/{r['outcome_b']}"
        outcome_table[key] = outcome_table.get(key, 0) + 1
    outcome_agree = sum(r["outcome_a"] == r["outcome_b"] for r in rows)
    # The relevance call a user would make at 0.5: flips here matter more than small score moves.
    decision_agree = sum((r["score_a"] >= 0.5) == (r["score_b"] >= 0.5) for r in rows)
    length = [r["reasoning_tokens_b"] - r["reasoning_tokens_a"] for r in rows]
    identical = sum(bool(r["identical_reasoning"]) for r in rows)

    def share(k: int) -> float | None:
        return k / n if n else None

    return {
        "pairs": n,
        "score": {
            "mean_a": statistics.fmean(r["score_a"] for r in rows) if n else None,
            "mean_b": statistics.fmean(r["score_b"] for r in rows) if n else None,
            "mean_diff": statistics.fmean(diffs) if n else None,
            "median_diff": float(statistics.median(diffs)) if n else None,
            "mean_abs_diff": statistics.fmean(absolute) if n else None,
            "median_abs_diff": float(statistics.median(absolute)) if n else None,
            "max_abs_diff": absolute[worst] if worst is not None else None,
            "max_abs_diff_pair": [rows[worst]["qid"], rows[worst]["docid"]] if worst is not None else None,
        },
        "outcome": {
            "agree": outcome_agree, "agree_fraction": share(outcome_agree),
            "a": _count(r["outcome_a"] for r in rows), "b": _count(r["outcome_b"] for r in rows),
            "table": dict(sorted(outcome_table.items())),  # "A outcome/B outcome": pairs
        },
        "decision_at_0.5": {"agree": decision_agree, "agree_fraction": share(decision_agree)},
        "reasoning_tokens": {
            "mean_a": statistics.fmean(r["reasoning_tokens_a"] for r in rows) if n else None,
            "mean_b": statistics.fmean(r["reasoning_tokens_b"] for r in rows) if n else None,
            "mean_diff": statistics.fmean(length) if n else None,
            "median_diff": float(statistics.median(length)) if n else None,
            "mean_abs_diff": statistics.fmean(abs(x) for x in length) if n else None,
        },
        "identical_reasoning": {"count": identical, "fraction": share(identical)},
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def query_statistics(
    items: Sequence[pipeline.Item], a: VariantRun, b: VariantRun, top_n: int = TOP_N
) -> dict[str, Any]:
    """Per query: rank correlations of A's and B's candidate scores and their top-``top_n`` overlap.

    The correlations use the scores (tau-b handles tied scores); the overlap uses the reranked runs
    (ties by docid, as written to disk). A correlation is None for a query with one candidate or whose
    scores are all equal in A or in B; such queries are left out of the means and counted as undefined.
    """
    run_a = pipeline.reranked_run(items, a.result.judgements)
    run_b = pipeline.reranked_run(items, b.result.judgements)
    candidates: dict[str, list[str]] = {}
    for it in items:
        candidates.setdefault(it.qid, []).append(it.docid)
    per_query = []
    for qid in run_a:
        docids = candidates[qid]
        xa = [a.result.judgements[(qid, d)].score for d in docids]
        xb = [b.result.judgements[(qid, d)].score for d in docids]
        per_query.append({
            "qid": qid,
            "candidates": len(docids),
            "kendall_tau_b": kendall_tau_b(xa, xb),
            "spearman": spearman_rho(xa, xb),
            f"top{top_n}_overlap": top_overlap([d for d, _ in run_a[qid]], [d for d, _ in run_b[qid]], top_n),
        })
    return {
        "queries": len(per_query),
        "kendall_tau_b": _describe([q["kendall_tau_b"] for q in per_query]),
        "spearman": _describe([q["spearman"] for q in per_query]),
        f"top{top_n}_overlap": _describe([q[f"top{top_n}_overlap"] for q in per_query]),
        "top_n": top_n,
        "per_query": per_query,
    }


def evaluation(
    items: Sequence[pipeline.Item],
    a: VariantRun,
    b: VariantRun,
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    test_measure: str = TEST_MEASURE,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
) -> dict[str, Any]:
    """Measures of the first-stage top-k, A and B over the job's queries that have qrels, per-query
    ``test_measure`` values and the paired randomization test of B vs A on it."""
    from .evaluate import evaluate, per_query

    job_qids = {it.qid for it in items}
    # As in rerank: only the job's queries, since a query the job left out would score 0 for both.
    judged = {qid: docs for qid, docs in qrels.items() if qid in job_qids}
    if not judged:
        return {"queries": 0, "note": "none of the run's queries is in the qrels"}
    rows = {
        "first_stage": pipeline.first_stage_run(items),
        "A": pipeline.reranked_run(items, a.result.judgements),
        "B": pipeline.reranked_run(items, b.result.judgements),
    }
    qids = sorted(judged)
    values = {name: per_query(run, judged, test_measure) for name, run in rows.items()}
    per_q = {name: [values[name][q] for q in qids] for name in rows}
    return {
        "queries": len(qids),
        "measures": {name: evaluate(run, judged, measures) for name, run in rows.items()},
        "test_measure": test_measure,
        "per_query": {"qids": qids, **per_q},
        "paired_test": {"measure": test_measure, "compared": "B - A",
                        **paired_randomization_test(per_q["A"], per_q["B"], permutations, seed)},
    }


def _variant_info(v: VariantRun) -> dict[str, Any]:
    s = v.result.summary
    return {
        "label": v.label,
        "settings_key": v.settings_key,
        "settings": v.settings,
        "pairs": s.pairs,
        "distinct": s.distinct,
        "reused": s.reused,
        "judged_now": s.judged_now,
        "outcomes": dict(s.outcomes),
        "truncated": len(s.truncated),
        "cost": v.cost,
    }


def build_report(
    items: Sequence[pipeline.Item],
    a: VariantRun,
    b: VariantRun,
    qrels: Mapping[str, Mapping[str, int]] | None = None,
    *,
    measures: Sequence[str] = DEFAULT_MEASURES,
    test_measure: str = TEST_MEASURE,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every number of the comparison as plain JSON values (figure data is added by :func:`write_report`).

    Pairs are the job's items (a pair repeated under another id counts each time, as in the run).
    """
    if not items:
        raise Rank1Error("nothing to compare: no pairs")
    rows = pair_rows(items, a, b)
    return {
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": dict(inputs or {}),
        "same_settings": a.settings_key == b.settings_key,
        "variants": {"A": _variant_info(a), "B": _variant_info(b)},
        "pairs": pair_statistics(rows),
        "queries": query_statistics(items, a, b),
        "evaluation": evaluation(items, a, b, qrels, measures, test_measure, permutations, seed) if qrels else None,
        "per_pair": rows,
    }


# ---------------------------------------------------------------------------------------------- figures


def figure_data(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The exact data each figure draws (also stored in report.json)."""
    rows = report["per_pair"]
    diffs = np.array([r["score_diff"] for r in rows], dtype=float)
    # Symmetric bins around 0 (an odd count puts 0 in the middle of a bin), wide enough for the largest
    # difference; a fixed [-1, 1] range would squash the small differences quantization usually gives.
    reach = max(float(np.abs(diffs).max()) if len(diffs) else 0.0, 1e-3)
    counts, edges = np.histogram(diffs, bins=21, range=(-reach, reach))
    data: dict[str, dict[str, Any]] = {
        "score_scatter": {
            "x_label": "A score", "y_label": "B score",
            "x": [r["score_a"] for r in rows], "y": [r["score_b"] for r in rows],
            "pairs": [[r["qid"], r["docid"]] for r in rows],
        },
        "score_diff_histogram": {
            "x_label": "score B - A", "bin_edges": edges.tolist(), "counts": counts.astype(int).tolist(),
        },
    }
    ev = report.get("evaluation")
    if ev and ev.get("queries"):
        data["per_query_ndcg"] = {
            "measure": ev["test_measure"], "qids": ev["per_query"]["qids"],
            "first_stage": ev["per_query"]["first_stage"], "A": ev["per_query"]["A"], "B": ev["per_query"]["B"],
        }
    return data


def _short(label: str, width: int = 48) -> str:
    """A label that fits an axis: long local paths keep their informative end."""
    return label if len(label) <= width else "..." + label[-(width - 3):]


def _import_matplotlib() -> Any:
    """matplotlib's object API with the Agg canvas (no pyplot, so no global backend is switched)."""
    from matplotlib.figure import Figure

    return Figure


def draw_figures(data: Mapping[str, Mapping[str, Any]], report: Mapping[str, Any], directory: Path) -> list[str]:
    """Write one PNG per figure in ``data``; returns the file names. Raises ImportError without matplotlib."""
    from matplotlib.ticker import MaxNLocator

    Figure = _import_matplotlib()
    label_a, label_b = (_short(report["variants"][k]["label"]) for k in ("A", "B"))
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / FIGURE_FILES[name], dpi=110, format="png")
        written.append(FIGURE_FILES[name])

    d = data["score_scatter"]
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, zorder=1)
    ax.scatter(d["x"], d["y"], s=12, alpha=0.7, zorder=2)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"A score ({label_a})", ylabel=f"B score ({label_b})",
           title=f"rank1 scores, {len(d['x'])} pairs")
    save(fig, "score_scatter")

    d = data["score_diff_histogram"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.stairs(d["counts"], d["bin_edges"], fill=True, alpha=0.8)
    ax.axvline(0, color="0.4", linewidth=1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of pairs
    ax.set(xlabel="score B - A", ylabel="pairs", title=f"score differences B - A over {sum(d['counts'])} pairs")
    save(fig, "score_diff_histogram")

    if "per_query_ndcg" in data:
        d = data["per_query_ndcg"]
        x = np.arange(len(d["qids"]))
        fig = Figure(figsize=(max(6, 0.45 * len(x) + 2), 4))
        ax = fig.add_subplot()
        width = 0.28
        ax.bar(x - width, d["first_stage"], width, label="first stage", color="0.75")
        ax.bar(x, d["A"], width, label=f"A: {label_a}")
        ax.bar(x + width, d["B"], width, label=f"B: {label_b}")
        ax.set_xticks(x, d["qids"], rotation=90 if len(x) > 12 else 0, fontsize=8)
        ax.set(ylabel=d["measure"], ylim=(0, 1.05), title=f"{d['measure']} per query")
        ax.legend(fontsize=8)
        save(fig, "per_query_ndcg")
    return written


# ---------------------------------------------------------------------------------------------- text


def _num(v: float | None, digits: int = 4, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The printed summary: the headline numbers of the report."""
    va, vb = report["variants"]["A"], report["variants"]["B"]
    p, q = report["pairs"], report["queries"]
    s, o, r = p["score"], p["outcome"], p["reasoning_tokens"]
    worst = "/".join(s["max_abs_diff_pair"]) if s["max_abs_diff_pair"] else ""
    top = f"top{q['top_n']}_overlap"
    lines = [
        f"A: {va['label']}  (settings {va['settings_key']})",
        f"B: {vb['label']}  (settings {vb['settings_key']})",
    ]
    if report["same_settings"]:
        lines.append("note: A and B have the same settings, so B reuses A's judgements (differences are 0)")
    lines += [
        f"pairs: {p['pairs']} over {q['queries']} queries",
        f"score B-A: mean {_num(s['mean_diff'], signed=True)}, median {_num(s['median_diff'], signed=True)}, "
        f"mean |diff| {_num(s['mean_abs_diff'])}, max |diff| {_num(s['max_abs_diff'])} ({worst})",
        f"outcomes agree: {o['agree']}/{p['pairs']} ({_pct(o['agree_fraction'])}); "
        + ", ".join(f"{k} {v}" for k, v in o["table"].items()) + " (A/B)",
        f"relevance call at 0.5 agrees: {_pct(p['decision_at_0.5']['agree_fraction'])}",
        f"reasoning tokens: A mean {_num(r['mean_a'], 1)}, B mean {_num(r['mean_b'], 1)}, "
        f"B-A mean {_num(r['mean_diff'], 1, True)}, median {_num(r['median_diff'], 1, True)}",
        f"identical reasoning chains: {p['identical_reasoning']['count']}/{p['pairs']} "
        f"({_pct(p['identical_reasoning']['fraction'])})",
        f"per query: Kendall tau-b mean {_num(q['kendall_tau_b']['mean'], 3)}, "
        f"Spearman mean {_num(q['spearman']['mean'], 3)} ({q['kendall_tau_b']['undefined']} undefined), "
        f"top-{q['top_n']} overlap mean {_num(q[top]['mean'], 3)}",
    ]
    ev = report.get("evaluation")
    if ev is not None:
        lines.append("")
        if not ev.get("queries"):
            lines.append(f"evaluation: {ev['note']}")
        else:
            from .evaluate import format_table

            top_k = report["inputs"].get("top_k")
            names = {"first_stage": f"first stage (top {top_k})" if top_k else "first stage", "A": "A", "B": "B"}
            lines.append(f"evaluation over the {ev['queries']} queries with qrels:")
            lines += format_table({names[k]: v for k, v in ev["measures"].items()}).splitlines()
            t = ev["paired_test"]
            lines.append(f"paired randomization test, {t['measure']} B - A over {t['n']} queries: "
                         f"mean diff {_num(t['mean_diff'], signed=True)} ({t['nonzero']} queries differ), "
                         f"p = {t['p_value']:.4f} ({t['method']})")
    lines.append("")
    lines.append("cost (judged now): pairs/s, tokens/s, peak memory, weights, load")
    for name, v in (("A", va), ("B", vb)):
        c = v["cost"]
        lines.append(f"  {name}: {_rate(c['pairs_per_s'])} pairs/s, {_rate(c['tokens_per_s'])} tok/s, "
                     f"peak {_bytes(c['peak_memory_bytes'])}, weights {_bytes(c['weights_bytes'])}, "
                     f"load {_num(c['load_s'], 1)} s; {c['note']}")
    return lines


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: the summary as tables, the figures, and how each number was computed."""
    va, vb = report["variants"]["A"], report["variants"]["B"]
    p, q = report["pairs"], report["queries"]
    s, r = p["score"], p["reasoning_tokens"]
    out = ["# rank1 variant comparison", "", f"Created {report['created']}.", ""]
    out += ["| | model | settings key | pairs judged now | reused from store |", "|---|---|---|---:|---:|"]
    for name, v in (("A", va), ("B", vb)):
        out.append(f"| {name} | {v['label']} | `{v['settings_key']}` | {v['judged_now']} | {v['reused']} |")
    if report["same_settings"]:
        out += ["", "A and B have the same settings: B reuses A's judgements, so every difference is 0."]
    worst = "/".join(s["max_abs_diff_pair"]) if s["max_abs_diff_pair"] else ""
    out += [
        "", f"## Pairs ({p['pairs']})", "",
        "| | value |", "|---|---:|",
        f"| mean score A / B | {_num(s['mean_a'])} / {_num(s['mean_b'])} |",
        f"| score B - A: mean | {_num(s['mean_diff'], signed=True)} |",
        f"| score B - A: median | {_num(s['median_diff'], signed=True)} |",
        f"| mean \\|diff\\| | {_num(s['mean_abs_diff'])} |",
        f"| median \\|diff\\| | {_num(s['median_abs_diff'])} |",
        f"| max \\|diff\\| | {_num(s['max_abs_diff'])} ({worst}) |",
        f"| outcome agreement | {_pct(p['outcome']['agree_fraction'])} |",
        f"| relevance call at 0.5 agreement | {_pct(p['decision_at_0.5']['agree_fraction'])} |",
        f"| reasoning tokens mean A / B | {_num(r['mean_a'], 1)} / {_num(r['mean_b'], 1)} |",
        f"| reasoning tokens B - A: mean / median | {_num(r['mean_diff'], 1, True)} / "
        f"{_num(r['median_diff'], 1, True)} |",
        f"| identical reasoning chains | {p['identical_reasoning']['count']} "
        f"({_pct(p['identical_reasoning']['fraction'])}) |",
        "", "Outcomes (A/B): " + ", ".join(f"{k}: {v}" for k, v in p["outcome"]["table"].items()) + ".",
    ]
    top = f"top{q['top_n']}_overlap"
    out += [
        "", f"## Queries ({q['queries']})", "",
        "Rank correlation of A's and B's scores of each query's candidates (Kendall tau-b, which handles "
        "ties, and Spearman on average ranks); undefined for a query with one candidate or all scores tied "
        f"in A or B, and left out of the means. Top-{q['top_n']} overlap: shared documents among the first "
        f"{q['top_n']} of both reranked runs, over min({q['top_n']}, candidates).", "",
        "| | mean | median | min | undefined |", "|---|---:|---:|---:|---:|",
    ]
    for key, name in (("kendall_tau_b", "Kendall tau-b"), ("spearman", "Spearman"), (top, f"top-{q['top_n']} overlap")):
        d = q[key]
        cells = [_num(d["mean"], 3), _num(d["median"], 3), _num(d["min"], 3), str(d["undefined"])]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "| qid | candidates | Kendall tau-b | Spearman | top-10 overlap |", "|---|---:|---:|---:|---:|"]
    for row in q["per_query"]:
        out.append(f"| {row['qid']} | {row['candidates']} | {_num(row['kendall_tau_b'], 3)} | "
                   f"{_num(row['spearman'], 3)} | {_num(row[top], 2)} |")

    ev = report.get("evaluation")
    if ev is not None:
        out += ["", "## Evaluation", ""]
        if not ev.get("queries"):
            out.append(ev["note"] + ".")
        else:
            names = list(next(iter(ev["measures"].values())))
            top_k = report["inputs"].get("top_k")
            rows = {"first_stage": f"first stage (top {top_k})" if top_k else "first stage", "A": "A", "B": "B"}
            out += [f"Over the {ev['queries']} queries of the run that have qrels.", "",
                    "| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            for run_name, values in ev["measures"].items():
                out.append(f"| {rows[run_name]} | " + " | ".join(_num(values[m]) for m in names) + " |")
            t = ev["paired_test"]
            out += [
                "", f"Paired randomization test of {t['measure']}, B - A, over {t['n']} queries: mean difference "
                f"{_num(t['mean_diff'], signed=True)} ({t['nonzero']} queries differ), "
                f"two-sided p = {t['p_value']:.4f} ({t['method']}).",
                "Each query's difference keeps or flips its sign at random; p is the share of sign assignments "
                "whose mean difference is at least as far from 0 as the observed one (exact when 2^n <= the "
                "permutation count, else (1 + hits) / (1 + permutations)). Identical per-query values give a "
                "difference of 0 and p = 1.0.",
            ]
    out += ["", "## Cost", "",
            "Measured while judging, over the pairs judged now (pairs reused from the store cost nothing and "
            "are left out).", "",
            "| | judged now | pairs/s | generated tokens/s | peak memory | weights | load s | memory measure |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in (("A", va), ("B", vb)):
        c = v["cost"]
        out.append(f"| {name} | {c['judged_now']} | {_rate(c['pairs_per_s'])} | {_rate(c['tokens_per_s'])} | "
                   f"{_bytes(c['peak_memory_bytes'])} | {_bytes(c['weights_bytes'])} | {_num(c['load_s'], 1)} | "
                   f"{c['memory_measure']} |")
    out += ["", "## Figures", ""]
    figures = report.get("figures", {})
    if report.get("figures_skipped"):
        out.append(f"Figures were skipped: {report['figures_skipped']}. Their data is in report.json.")
    else:
        for name, d in figures.items():
            if d.get("file"):
                out += [f"![{name}]({d['file']})", ""]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], directory: str | os.PathLike[str], figures: bool = True) -> dict[str, Any]:
    """Write report.json, report.md and the PNG figures into ``directory``; returns ``report`` completed
    with ``figures`` (data and file of each) and ``figures_skipped`` (None, or why there are none)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    data = figure_data(report)
    written: list[str] = []
    skipped: str | None = None if figures else "figures turned off"
    if figures:
        try:
            written = draw_figures(data, report, target)
        except ImportError:
            skipped = _PLOT_HINT
    for name, d in data.items():
        d["file"] = FIGURE_FILES[name] if FIGURE_FILES[name] in written else None
    if "per_query_ndcg" not in data:
        data["per_query_ndcg"] = {"file": None, "note": "no evaluation (needs --qrels)"}
    report["figures"] = data
    report["figures_skipped"] = skipped
    # allow_nan=False: a NaN would make report.json unreadable to strict JSON parsers; None is used instead.
    text = json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    formats._write_atomic(target / "report.json", [text])
    formats._write_atomic(target / "report.md", [markdown(report)])
    return report
