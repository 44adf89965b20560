"""Score runs against qrels with ir_measures, and print input-vs-reranked tables.

ir_measures is a dependency of rank1-hf; it is imported on first use only, to keep the CLI quick to start.

Each query is ranked by :func:`rank1_hf.io.formats.ranked` (trec_eval's own order: score descending, ties by
docid descending) and handed to ir_measures as rank-derived scores, so every ir_measures backend scores
exactly that ranking: the figures equal ir_measures' (and trec_eval's) on the same run file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rank1_hf.errors import Rank1Error
from rank1_hf.io.formats import ranked

# nDCG@10 is the rank1 paper's headline measure (BRIGHT, BEIR, TREC DL) and uses graded labels.
# RR@10 shows whether a relevant passage reaches the very top, which is what a user reads first.
# R@100 measures the candidate pool: reranking can only reorder it, so it bounds what nDCG can gain
# and should be equal for the input and the reranked run (a quick sanity check).
DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "RR@10", "R@100")

_INSTALL_HINT = "ir_measures is missing (a dependency of rank1-hf): pip install 'ir_measures>=0.3'"


def _ir_measures() -> Any:
    """Import ir_measures on first use (it is slow to import; most commands never need it)."""
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


def check_measures(measures: Iterable[str] | None = None) -> None:
    """Fail now, with a one-line :class:`Rank1Error`, if ir_measures is missing or a measure name is unknown
    (a job checks this before judging, not after)."""
    _parse(_ir_measures(), measures or ())


def _as_scored(run: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, dict[str, float]]:
    """Rank each query by :func:`ranked` and score it by rank, so no backend's tie rule comes into play."""
    scored: dict[str, dict[str, float]] = {}
    for qid, docs in run.items():
        order = ranked(docs)
        scored[qid] = {docid: float(len(order) - i) for i, (docid, _) in enumerate(order)}
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
