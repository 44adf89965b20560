"""The report of a comparison: per-pair, per-query and evaluation numbers as plain JSON values
(:func:`build_report`), and writing it with its figures (:func:`write_report`)."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import formats
from .. import pipeline
from ..errors import Rank1Error
from ..io.evaluate import DEFAULT_MEASURES
from .render import FIGURE_FILES, draw_figures, figure_data, markdown
from .statistics import (PERMUTATIONS, SEED, TOP_N, kendall_tau_b, paired_randomization_test, spearman_rho,
                         top_overlap)
from .variants import VariantRun

TEST_MEASURE = "nDCG@10"
REPORT_VERSION = 1
_PLOT_HINT = "matplotlib is not installed: pip install 'rank1-hf[plot]'"


@dataclass
class Report:
    """Every number of a comparison as plain JSON values; report.json is :meth:`to_json`.

    ``figures`` (the data and file of each figure) and ``figures_skipped`` (None, or why there are none)
    are filled in by :func:`write_report`.
    """

    version: int
    created: str
    inputs: dict[str, Any]
    same_settings: bool
    variants: dict[str, Any]
    pairs: dict[str, Any]
    queries: dict[str, Any]
    evaluation: dict[str, Any] | None
    per_pair: list[dict[str, Any]]
    figures: dict[str, Any] | None = None
    figures_skipped: str | None = None

    def to_json(self) -> str:
        """report.json's text (the fields in order; figures only once written)."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if self.figures is None:
            del data["figures"], data["figures_skipped"]
        # allow_nan=False: a NaN would make report.json unreadable to strict JSON parsers; None is used instead.
        return json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


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
    from ..io.evaluate import evaluate, per_query

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
) -> Report:
    """Every number of the comparison (figure data is added by :func:`write_report`).

    Pairs are the job's items (a pair repeated under another id counts each time, as in the run).
    """
    if not items:
        raise Rank1Error("nothing to compare: no pairs")
    rows = pair_rows(items, a, b)
    return Report(
        version=REPORT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        inputs=dict(inputs or {}),
        same_settings=a.settings_key == b.settings_key,
        variants={"A": _variant_info(a), "B": _variant_info(b)},
        pairs=pair_statistics(rows),
        queries=query_statistics(items, a, b),
        evaluation=evaluation(items, a, b, qrels, measures, test_measure, permutations, seed) if qrels else None,
        per_pair=rows,
    )


def write_report(report: Report, directory: str | os.PathLike[str], figures: bool = True) -> Report:
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
    report.figures = data
    report.figures_skipped = skipped
    formats._write_atomic(target / "report.json", [report.to_json()])
    formats._write_atomic(target / "report.md", [markdown(report)])
    return report
