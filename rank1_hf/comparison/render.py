"""The report rendered: the printed summary, report.md and the figures (with matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from .report import Report

FIGURE_FILES = {
    "score_scatter": "score_scatter.png",
    "score_diff_histogram": "score_diff_histogram.png",
    "per_query_ndcg": "per_query_ndcg.png",
}


def figure_data(report: Report) -> dict[str, dict[str, Any]]:
    """The exact data each figure draws (also stored in report.json)."""
    rows = report.per_pair
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
    ev = report.evaluation
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


def draw_figures(data: Mapping[str, Mapping[str, Any]], report: Report, directory: Path) -> list[str]:
    """Write one PNG per figure in ``data``; returns the file names. Raises ImportError without matplotlib."""
    from matplotlib.ticker import MaxNLocator

    Figure = _import_matplotlib()
    label_a, label_b = (_short(report.variants[k]["label"]) for k in ("A", "B"))
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


def _worst_pair(score: Mapping[str, Any]) -> str:
    """The pair with the largest score difference, as qid/docid ("" without pairs)."""
    return "/".join(score["max_abs_diff_pair"]) if score["max_abs_diff_pair"] else ""


def _run_names(report: Report) -> dict[str, str]:
    """The evaluated runs' names as shown in the summary and report.md."""
    top_k = report.inputs.get("top_k")
    return {"first_stage": f"first stage (top {top_k})" if top_k else "first stage", "A": "A", "B": "B"}


def summary_lines(report: Report) -> list[str]:
    """The printed summary: the headline numbers of the report."""
    va, vb = report.variants["A"], report.variants["B"]
    p, q = report.pairs, report.queries
    s, o, r = p["score"], p["outcome"], p["reasoning_tokens"]
    worst = _worst_pair(s)
    top = f"top{q['top_n']}_overlap"
    lines = [
        f"A: {va['label']}  (settings {va['settings_key']})",
        f"B: {vb['label']}  (settings {vb['settings_key']})",
    ]
    if report.same_settings:
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
    ev = report.evaluation
    if ev is not None:
        lines.append("")
        if not ev.get("queries"):
            lines.append(f"evaluation: {ev['note']}")
        else:
            from ..io.evaluate import format_table

            names = _run_names(report)
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


def markdown(report: Report) -> str:
    """report.md: the summary as tables, the figures, and how each number was computed."""
    va, vb = report.variants["A"], report.variants["B"]
    p, q = report.pairs, report.queries
    s, r = p["score"], p["reasoning_tokens"]
    out = ["# rank1 variant comparison", "", f"Created {report.created}.", ""]
    out += ["| | model | settings key | pairs judged now | reused from store |", "|---|---|---|---:|---:|"]
    for name, v in (("A", va), ("B", vb)):
        out.append(f"| {name} | {v['label']} | `{v['settings_key']}` | {v['judged_now']} | {v['reused']} |")
    if report.same_settings:
        out += ["", "A and B have the same settings: B reuses A's judgements, so every difference is 0."]
    worst = _worst_pair(s)
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

    ev = report.evaluation
    if ev is not None:
        out += ["", "## Evaluation", ""]
        if not ev.get("queries"):
            out.append(ev["note"] + ".")
        else:
            names = list(next(iter(ev["measures"].values())))
            rows = _run_names(report)
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
    figures = report.figures or {}
    if report.figures_skipped:
        out.append(f"Figures were skipped: {report.figures_skipped}. Their data is in report.json.")
    else:
        for name, d in figures.items():
            if d.get("file"):
                out += [f"![{name}]({d['file']})", ""]
    return "\n".join(out) + "\n"
