"""Score runs against qrels with ir_measures, and print input-vs-reranked tables.

ir_measures is an optional dependency (``pip install 'rank1-hf[eval]'``), imported only when used.

Runs are handed to ir_measures as rank-derived scores, not raw scores: trec_eval breaks score ties by
docid *descending*, while this project ranks ties by docid ascending (see :mod:`rank1_hf.runs`).
Converting to ranks first makes the evaluated ranking exactly the one written to disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rank1_hf.errors import Rank1Error

# nDCG@10 is the rank1 paper's headline measure (BRIGHT, BEIR, TREC DL) and uses graded labels.
# RR@10 shows whether a relevant passage reaches the very top, which is what a user reads first.
# R@100 measures the candidate pool: reranking can only reorder it, so it bounds what nDCG can gain
# and should be equal for the input and the reranked run (a quick sanity check).
DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "RR@10", "R@100")

_INSTALL_HINT = "ir_measures is not installed: pip install 'rank1-hf[eval]'"


def _ir_measures() -> Any:
    """Import ir_measures on first use so the core package does not depend on it."""
    try:
        import ir_measures
    except ImportError:
        raise Rank1Error(_INSTALL_HINT) from None
    return ir_measures


def _parse(ir_measures: Any, measures: Iterable[str]) -> list[Any]:
    """Turn measure names like "nDCG@10" into ir_measures objects, with a one-line error on a typo."""
    parsed = []
    for name in measures:
        try:
            parsed.append(ir_measures.parse_measure(name))
        except Exception:  # ir_measures raises several types for bad names
            raise Rank1Error(f"unknown measure {name!r} (examples: nDCG@10, RR@10, R@100, P@5, AP)") from None
    return parsed


def _as_scored(run: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, dict[str, float]]:
    """Rank each query (score desc, docid asc) and score by rank, so trec_eval keeps that order."""
    scored: dict[str, dict[str, float]] = {}
    for qid, docs in run.items():
        ranked = sorted(docs, key=lambda pair: (-pair[1], pair[0]))
        scored[qid] = {docid: float(len(ranked) - i) for i, (docid, _) in enumerate(ranked)}
    return scored


def evaluate(
    run: Mapping[str, Sequence[tuple[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Iterable[str] = DEFAULT_MEASURES,
) -> dict[str, float]:
    """Mean of each measure, as {measure name: value}.

    Averaged over every query in the qrels: a judged query the run leaves out counts as zero (like
    ``trec_eval -c``), so dropping a query can never raise the score. Run queries without qrels are
    ignored.
    """
    irm = _ir_measures()
    parsed = _parse(irm, measures)
    qrels_dict = {qid: dict(docs) for qid, docs in qrels.items()}
    result = irm.calc_aggregate(parsed, qrels_dict, _as_scored(run))
    return {str(m): float(result[m]) for m in parsed}


def per_query(
    run: Mapping[str, Sequence[tuple[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    measure: str,
) -> dict[str, float]:
    """One measure for each query in the qrels, {qid: value}; a query missing from the run scores 0."""
    irm = _ir_measures()
    (parsed,) = _parse(irm, [measure])
    qrels_dict = {qid: dict(docs) for qid, docs in qrels.items()}
    return {m.query_id: float(m.value) for m in irm.iter_calc([parsed], qrels_dict, _as_scored(run))}


def format_table(rows: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A plain-text table: one row per run name, one column per measure (union, in first-seen order).

    Example: ``format_table({"bm25": evaluate(bm25, qrels), "rank1": evaluate(reranked, qrels)})``.
    A measure missing from a row is shown as "-".
    """
    columns: list[str] = []
    for values in rows.values():
        columns += [m for m in values if m not in columns]
    header = ["run", *columns]
    body = [
        [name, *(f"{values[m]:.{digits}f}" if m in values else "-" for m in columns)]
        for name, values in rows.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # Left-align the run name, right-align numbers so decimals line up.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])
