"""A reranked run as one self-contained HTML page (``rank1-hf report``): per query the documents in their
new order beside their first-stage rank, each judgement's score and outcome, the reasoning folded under
each (``<details>``), the qrels grade when qrels are given, and the metrics table. The page holds its CSS
inline and loads nothing, so it opens offline and can be mailed as one file.

It reads the traces a rerank writes (:data:`rank1_hf.pipeline.TRACE_FIELDS`: they carry the query and
passage texts, so no corpus is needed).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import formats
from ..errors import Rank1Error

_NEEDED = ("qid", "docid", "rank", "score", "outcome", "reasoning", "first_stage_rank", "query", "passage")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#fff}
header{background:#1f3a5f;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}header p{margin:0;opacity:.85}
main{padding:8px 28px 40px;max-width:1200px}
table{border-collapse:collapse;width:100%;margin:8px 0 20px}
th,td{border-bottom:1px solid #d8dee8;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7;font-weight:600}
table.metrics{width:auto}table.metrics td.num{text-align:right;font-variant-numeric:tabular-nums}
table.metrics tr.reranked td{background:#e3f1e6}
section.query{border-top:3px solid #1f3a5f;margin-top:22px;padding-top:6px}
section.query h2{font-size:17px;margin:6px 0}.instruction{color:#555;font-style:italic}
td.score{white-space:nowrap}td.rank{width:3.5em;text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37;font-weight:600}.down{color:#b42318;font-weight:600}.same{color:#888}
.bar{display:inline-block;height:10px;background:#2b6cb0;vertical-align:middle;margin-right:6px}
.outcome{font-size:12px;padding:1px 6px;border-radius:8px;color:#fff}
.answered{background:#1a7f37}.forced{background:#b7791f}.fallback{background:#b42318}
.rel{font-weight:600}.rel0{color:#888}.relpos{color:#1a7f37}
details summary{cursor:pointer}
details pre{white-space:pre-wrap;background:#f6f8fa;border:1px solid #d8dee8;padding:8px;margin:6px 0;font:13px/1.4 ui-monospace,monospace}
.label{font-size:12px;color:#555;margin-top:6px}
"""


def read_traces(path: formats.PathLike) -> list[dict[str, Any]]:
    """The trace records of a rerank, checked to hold what the page shows."""
    rows = formats.read_jsonl(path)
    if not rows:
        raise Rank1Error(f"{path}: no traces in the file")
    missing = [name for name in _NEEDED if name not in rows[0]]
    if missing:
        raise Rank1Error(f"{path} line 1: a trace without {', '.join(missing)}: not a rank1-hf rerank traces "
                         "file, or one written before traces carried texts (rerun rerank: the store reuses "
                         "every judgement)")
    return rows


def _runs(rows: Iterable[Mapping[str, Any]]) -> tuple[formats.Run, formats.Run]:
    """The first-stage and the reranked order of the judged documents, as runs."""
    before: dict[str, list[tuple[str, float]]] = {}
    after: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        # Ranks as scores: both orders exactly as the rerank saw them, whatever the tie rule.
        before.setdefault(r["qid"], []).append((r["docid"], -float(r["first_stage_rank"])))
        after.setdefault(r["qid"], []).append((r["docid"], -float(r["rank"])))
    return before, after


def metrics(rows: Sequence[Mapping[str, Any]], qrels: formats.Qrels,
            measures: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """The measures of the judged top-k before and after reranking, over the queries with qrels."""
    from .evaluate import DEFAULT_MEASURES, evaluate

    before, after = _runs(rows)
    judged = {qid: docs for qid, docs in qrels.items() if qid in after}
    if not judged:
        return {}
    measures = list(measures or DEFAULT_MEASURES)
    return {"first stage (top-k)": evaluate(before, judged, measures),
            "reranked": evaluate(after, judged, measures)}


def render(rows: Sequence[Mapping[str, Any]], *, title: str = "rank1 reranking",
           qrels: formats.Qrels | None = None, measures: Sequence[str] | None = None,
           note: str | None = None) -> str:
    """The HTML page for ``rows`` (trace records), with qrels grades and metrics when ``qrels`` is given."""
    e = html.escape
    by_query: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_query.setdefault(r["qid"], []).append(r)
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    summary = f"{len(by_query)} queries, {len(rows)} judged pairs; outcomes: " + ", ".join(
        f"{k} {v}" for k, v in sorted(outcomes.items()))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<header><h1>{e(title)}</h1><p>{e(summary)}</p>" + (f"<p>{e(note)}</p>" if note else "") + "</header>",
           "<main>"]
    table = metrics(rows, qrels, measures) if qrels else {}
    if table:
        names = list(next(iter(table.values())))
        judged = sum(1 for qid in by_query if qid in qrels)
        out.append(f"<h2>Metrics over the {judged} queries with qrels (the judged top-k)</h2>")
        out.append('<table class="metrics"><tr><th>run</th>' + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for label, values in table.items():
            css = ' class="reranked"' if label == "reranked" else ""
            out.append(f"<tr{css}><td>{e(label)}</td>" + "".join(f'<td class="num">{values[n]:.4f}</td>'
                                                                 for n in names) + "</tr>")
        out.append("</table>")
    for qid in sorted(by_query):
        docs = sorted(by_query[qid], key=lambda r: r["rank"])
        first = docs[0]
        out.append(f'<section class="query" id="q-{e(qid)}"><h2>{e(qid)}: {e(first["query"])}</h2>')
        if first.get("instruction"):
            out.append(f'<p class="instruction">instruction: {e(first["instruction"])}</p>')
        grades = (qrels or {}).get(qid)
        out.append("<table><tr><th>after</th><th>before</th><th>moved</th><th>score</th><th>outcome</th>"
                   + ("<th>qrels</th>" if grades is not None else "") + "<th>document and reasoning</th></tr>")
        for r in docs:
            out.append(_row(r, grades))
        out.append("</table></section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _row(r: Mapping[str, Any], grades: Mapping[str, int] | None) -> str:
    e = html.escape
    moved = int(r["first_stage_rank"]) - int(r["rank"])
    arrow = (f'<span class="up">&#9650; {moved}</span>' if moved > 0 else
             f'<span class="down">&#9660; {-moved}</span>' if moved < 0 else '<span class="same">=</span>')
    score = float(r["score"])
    cells = [f'<td class="rank">{r["rank"]}</td>', f'<td class="rank">{r["first_stage_rank"]}</td>', f"<td>{arrow}</td>",
             f'<td class="score"><span class="bar" style="width:{round(score * 60)}px"></span>{score:.3f}</td>',
             f'<td><span class="outcome {e(r["outcome"])}">{e(r["outcome"])}</span></td>']
    if grades is not None:
        grade = grades.get(r["docid"])
        cells.append('<td class="rel">&ndash;</td>' if grade is None else
                     f'<td class="rel {"relpos" if grade > 0 else "rel0"}">{grade}</td>')
    reasoning = f'<div class="label">reasoning the score was read after</div><pre>{e(r["reasoning"])}</pre>'
    full = r.get("full_reasoning")
    if full and full.strip() != r["reasoning"].strip():
        reasoning += f'<div class="label">full reasoning generated (cut above before the readout)</div><pre>{e(full)}</pre>'
    cells.append(f'<td><details><summary>{e(r["docid"])}: {e(_preview(r["passage"]))}</summary>'
                 f'<div class="label">passage</div><pre>{e(r["passage"])}</pre>{reasoning}</details></td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _preview(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
