"""``rank1-hf compare``: statistics checked by brute force, and whole reports on tiny models checked
against the judgements in the store (float vs bnb-8bit, AWQ vs its dequantized twin, a model vs itself).

Scores of tiny random models mean nothing; the tests check that every number of the report is the one
the stored judgements give.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from rank1_hf import comparison, pipeline
from rank1_hf.io import formats
from rank1_hf.cli import compare as compare_command
from rank1_hf.errors import Rank1Error
from rank1_hf.io.store import JudgementStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# matplotlib is the optional extra rank1-hf[plot]: without it the reports must still be complete, minus PNGs.
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

QUERIES = {"q1": "how do cats purr", "q2": "best oven for bread", "q3": "who created the python language"}
CORPUS = {
    "d1": "Cats purr by vibrating the muscles of the larynx while breathing.",
    "d2": "A stone deck oven bakes bread with an even crust.",
    "d3": "Guido van Rossum created Python and released it in 1991.",
    "d4": "Dogs bark when they are excited or afraid.",
    "d5": "Steam in the first minutes of baking helps bread rise.",
    "d6": "The python is a large snake that kills by constriction.",
}
RUN = {
    "q1": ["d1", "d4", "d5", "d6"],
    "q2": ["d2", "d5", "d1", "d3"],
    "q3": ["d6", "d3", "d4", "d2"],
}
QRELS = {"q1": {"d1": 2, "d4": 0}, "q2": {"d2": 1, "d5": 2}, "q3": {"d3": 2, "d6": 0}}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    """A hand-made 3-query collection (4 candidates each, 12 distinct pairs) as files."""
    root = tmp_path_factory.mktemp("collection")
    paths = {name: root / f"{name}.tsv" for name in ("queries", "corpus")}
    paths["queries"].write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items()))
    paths["corpus"].write_text("".join(f"{d}\t{t}\n" for d, t in CORPUS.items()))
    paths["run"] = root / "run.trec"
    paths["run"].write_text("".join(f"{q} Q0 {d} {i + 1} {10 - i} bm25\n" for q, docs in RUN.items()
                                    for i, d in enumerate(docs)))
    paths["qrels"] = root / "qrels.txt"
    paths["qrels"].write_text("".join(f"{q} 0 {d} {g}\n" for q, docs in QRELS.items() for d, g in docs.items()))
    return paths


@pytest.fixture(scope="module")
def tokenizer():
    from rank1_hf.testing import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A float tiny Qwen2, an AWQ checkpoint and its dequantized float twin, as model directories."""
    sys.path.insert(0, str(Path(__file__).parent))
    from awq_fixture import build_awq_checkpoint, save_float_checkpoint, tiny_qwen2

    root = tmp_path_factory.mktemp("models")
    twin = build_awq_checkpoint(tokenizer, root / "awq", seed=0)
    return {
        "float": save_float_checkpoint(tiny_qwen2(tokenizer, seed=1), tokenizer, root / "float"),
        "awq": root / "awq",
        "twin": save_float_checkpoint(twin, tokenizer, root / "twin"),
    }


def _main(argv: list[str]) -> int:
    """Run ``compare`` through its own parser (independent of how the cli package wires it)."""
    parser = argparse.ArgumentParser()
    compare_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", *argv])
    return args.func(args)


def _compare_args(collection: dict[str, Path], report: Path, *extra: str) -> list[str]:
    return ["--run", str(collection["run"]), "--queries", str(collection["queries"]),
            "--corpus", str(collection["corpus"]), "--qrels", str(collection["qrels"]),
            "--max-new-tokens", "8", "--context-size", "512", "--threads", "1", "--no-progress",
            "--report", str(report), *extra]


# ---------------------------------------------------------------------------------------------- independent checks


def _brute_tau_b(x, y) -> float:
    """Kendall tau-b straight from its definition, pair by pair."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        tied_x += dx == 0
        tied_y += dy == 0
        if dx * dy > 0:
            concordant += 1
        elif dx * dy < 0:
            discordant += 1
    n0 = len(x) * (len(x) - 1) / 2
    return (concordant - discordant) / math.sqrt((n0 - tied_x) * (n0 - tied_y))


def _ndcg10(ranked: list[str], grades: dict[str, int]) -> float:
    """trec_eval's nDCG@10: gain = grade, discount log2(rank + 1), ideal over all judged documents."""
    dcg = sum(grades.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(grades.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def _stored(store: Path, key: str) -> dict[tuple[str, str], dict]:
    with sqlite3.connect(store) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM judgements WHERE settings_key = ?", (key,)).fetchall()
    return {(r["qid"], r["docid"]): dict(r) for r in rows}


def _check_figures(report_dir: Path, report: dict) -> None:
    """Valid PNGs that matplotlib reads back, or (without matplotlib) none and the reason said."""
    for name in comparison.FIGURE_FILES.values():
        if HAVE_MATPLOTLIB:
            _check_png(report_dir / name)
        else:
            assert not (report_dir / name).exists() and "rank1-hf[plot]" in report["figures_skipped"]


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _check_against_store(report_dir: Path) -> dict:
    """Recompute the report's numbers from the store rows and the qrels; returns the report."""
    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "report.md").read_text().startswith("# rank1 variant comparison")
    store = Path(report["inputs"]["store"])
    a = _stored(store, report["variants"]["A"]["settings_key"])
    b = _stored(store, report["variants"]["B"]["settings_key"])
    pairs = [(q, d) for q in sorted(RUN) for d in RUN[q]]
    assert set(a) == set(b) == set(pairs)  # the 12 pairs are distinct texts: one store row each

    diffs = [b[p]["score"] - a[p]["score"] for p in pairs]
    s = report["pairs"]["score"]
    assert s["mean_abs_diff"] == pytest.approx(np.mean(np.abs(diffs)), abs=1e-12)
    assert s["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert s["max_abs_diff"] == pytest.approx(np.max(np.abs(diffs)), abs=1e-12)
    identical = sum(a[p]["reasoning"] == b[p]["reasoning"] for p in pairs)
    assert report["pairs"]["identical_reasoning"]["count"] == identical
    agree = sum(a[p]["outcome"] == b[p]["outcome"] for p in pairs)
    assert report["pairs"]["outcome"]["agree"] == agree
    lengths = [b[p]["reasoning_tokens"] - a[p]["reasoning_tokens"] for p in pairs]
    assert report["pairs"]["reasoning_tokens"]["mean_diff"] == pytest.approx(np.mean(lengths))

    # The figures draw exactly the stored scores.
    scatter = report["figures"]["score_scatter"]
    assert [tuple(p) for p in scatter["pairs"]] == pairs
    assert scatter["x"] == [a[p]["score"] for p in pairs] and scatter["y"] == [b[p]["score"] for p in pairs]
    hist = report["figures"]["score_diff_histogram"]
    assert sum(hist["counts"]) == len(pairs)
    assert hist["counts"] == np.histogram(diffs, bins=hist["bin_edges"])[0].tolist()

    # One query's Kendall tau by brute force over its pairs of candidates.
    q1 = next(q for q in report["queries"]["per_query"] if q["qid"] == "q1")
    xa, xb = [a[("q1", d)]["score"] for d in RUN["q1"]], [b[("q1", d)]["score"] for d in RUN["q1"]]
    assert q1["kendall_tau_b"] == pytest.approx(_brute_tau_b(xa, xb), abs=1e-12)

    # nDCG@10 by hand from the stored scores (score descending, ties by docid).
    ev = report["evaluation"]
    for name, rows in (("A", a), ("B", b)):
        by_hand = []
        for qid in sorted(RUN):
            ranked = sorted(RUN[qid], key=lambda d: (-rows[(qid, d)]["score"], d))
            by_hand.append(_ndcg10(ranked, QRELS[qid]))
        assert ev["per_query"][name] == pytest.approx(by_hand, abs=1e-9)
        assert ev["measures"][name]["nDCG@10"] == pytest.approx(np.mean(by_hand), abs=1e-9)
        assert report["figures"]["per_query_ndcg"][name] == ev["per_query"][name]
    assert ev["per_query"]["first_stage"] == pytest.approx([_ndcg10(RUN[q], QRELS[q]) for q in sorted(RUN)])
    want = np.mean(ev["per_query"]["B"]) - np.mean(ev["per_query"]["A"])
    assert ev["paired_test"]["mean_diff"] == pytest.approx(want)

    _check_figures(report_dir, report)
    return report


# ---------------------------------------------------------------------------------------------- statistics


def test_kendall_and_spearman_match_brute_force_and_scipy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        # Few distinct values, so there are ties in both lists.
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
        tau = comparison.kendall_tau_b(x, y)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert tau == pytest.approx(_brute_tau_b(x, y), abs=1e-12)
        else:
            assert tau is None
    x = [0.1, 0.5, 0.5, 0.9, 0.3]
    assert comparison.kendall_tau_b(x, x) == pytest.approx(1.0) and comparison.spearman_rho(x, x) == pytest.approx(1.0)
    assert comparison.kendall_tau_b(x, [-v for v in x]) == pytest.approx(-1.0)
    assert comparison.kendall_tau_b([0.2], [0.3]) is None and comparison.spearman_rho([0.4, 0.4], [0.1, 0.2]) is None
    assert comparison.average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    stats = pytest.importorskip("scipy.stats", reason="the cross-check against scipy needs scipy")
    for _ in range(10):
        x, y = rng.integers(0, 5, 9).astype(float), rng.normal(size=9)
        assert comparison.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        assert comparison.spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_top_overlap():
    assert comparison.top_overlap(list("abcdefghijkl"), list("lkjihgfedcba")) == pytest.approx(0.8)
    assert comparison.top_overlap(["a", "b"], ["b", "a"]) == 1.0
    assert comparison.top_overlap(["a", "b"], ["b", "c"], n=1) == 0.0


def test_paired_test_exact_monte_carlo_and_degenerate():
    a = [0.2, 0.5, 0.4, 0.9, 0.3, 0.6]
    b = [0.3, 0.7, 0.4, 0.8, 0.6, 0.9]
    exact = comparison.paired_randomization_test(a, b)
    d = np.subtract(b, a)
    hits = sum(abs(np.mean(np.multiply(s, d))) >= abs(d.mean()) - 1e-12
               for s in itertools.product((1, -1), repeat=len(d)))
    assert exact["p_value"] == pytest.approx(hits / 2 ** len(d)) and exact["method"].startswith("exact")
    assert exact["mean_diff"] == pytest.approx(d.mean())

    rng = np.random.default_rng(1)
    a16, b16 = rng.random(16), rng.random(16)
    sampled = comparison.paired_randomization_test(a16, b16, permutations=10_000, seed=5)
    assert sampled["method"] == "Monte Carlo: 10000 random sign assignments, seed 5"
    assert comparison.paired_randomization_test(a16, b16, permutations=10_000, seed=5) == sampled  # seeded
    full = comparison.paired_randomization_test(a16, b16, permutations=2**16)  # exact over 65536
    assert abs(sampled["p_value"] - full["p_value"]) < 0.02

    same = comparison.paired_randomization_test(a, a)
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0 and same["method"].startswith("degenerate")


# ---------------------------------------------------------------------------------------------- whole reports


def test_float_vs_bnb8_report_agrees_with_store(checkpoints, collection, tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the [bnb] extra)")
    report_dir = tmp_path / "bnb8"
    assert _main(["--a", str(checkpoints["float"]), "--b", str(checkpoints["float"]), "--b-quantization", "bnb-8bit",
                  *_compare_args(collection, report_dir)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "pairs: 12 over 3 queries" in out and "paired randomization test, nDCG@10" in out
    report = _check_against_store(report_dir)
    va, vb = report["variants"]["A"], report["variants"]["B"]
    assert va["settings_key"] != vb["settings_key"] and vb["settings"]["quantization"] == "bnb-8bit"
    assert "[quantization=bnb-8bit]" in vb["label"]
    for v in (va, vb):
        c = v["cost"]
        assert c["judged_now"] == 12 and c["pairs_per_s"] > 0 and c["tokens_per_s"] > 0
        assert c["generated_tokens"] > 0 and c["peak_memory_bytes"] is not None and c["load_s"] > 0

    # Again with the same store: everything is reused, the numbers do not move, no cost is claimed.
    again = tmp_path / "again"
    assert _main(["--a", str(checkpoints["float"]), "--b", str(checkpoints["float"]), "--b-quantization", "bnb-8bit",
                  "--store", report["inputs"]["store"], *_compare_args(collection, again)]) == 0
    second = json.loads((again / "report.json").read_text())
    assert second["pairs"] == report["pairs"] and second["queries"] == report["queries"]
    for name in ("A", "B"):
        c = second["variants"][name]["cost"]
        assert c["judged_now"] == 0 and c["reused"] == 12 and c["pairs_per_s"] is None
        assert "reused from the store" in c["note"]


def test_awq_vs_dequantized_twin_report_agrees_with_store(checkpoints, collection, tmp_path, capsys):
    report_dir = tmp_path / "awq"
    assert _main(["--a", str(checkpoints["twin"]), "--b", str(checkpoints["awq"]),
                  *_compare_args(collection, report_dir)]) == 0
    print(capsys.readouterr().out)
    report = _check_against_store(report_dir)
    # AWQ is detected from the checkpoint (no flag): it loads in bfloat16, under its own settings key.
    assert report["variants"]["B"]["settings"]["dtype"] == "torch.bfloat16"
    assert report["variants"]["A"]["settings_key"] != report["variants"]["B"]["settings_key"]
    # The twin holds the very weights AWQ stands for: scores stay close (bfloat16 kernel arithmetic aside).
    assert report["pairs"]["score"]["mean_abs_diff"] < 0.1


@pytest.fixture(scope="module")
def self_compare(tokenizer, collection, tmp_path_factory):
    """A tiny in-memory model compared with itself: B finds all of A's judgements in the store."""
    from rank1_hf.testing import tiny_model
    from rank1_hf.ranker import Rank1

    ranker = Rank1.from_model(tiny_model(tokenizer), tokenizer, max_new_tokens=8, context_size=512)
    items = pipeline.load_items(collection["run"], collection["queries"], collection["corpus"])
    store_path = tmp_path_factory.mktemp("self") / "s.sqlite"
    with JudgementStore(store_path) as store:
        a = comparison.judge_variant("A", ranker, items, store, label="tiny")
        b = comparison.judge_variant("B", lambda: ranker, items, store, label="tiny again")
    return items, a, b, formats.read_qrels(collection["qrels"])


def test_model_against_itself_gives_zero_differences(self_compare, tmp_path):
    items, a, b, qrels = self_compare
    report = comparison.write_report(comparison.build_report(items, a, b, qrels, inputs={"top_k": 4}), tmp_path)
    assert report.same_settings and b.cost["judged_now"] == 0 and a.cost["judged_now"] == 12
    s = report.pairs["score"]
    assert s["mean_diff"] == s["mean_abs_diff"] == s["max_abs_diff"] == 0.0
    assert report.pairs["identical_reasoning"]["fraction"] == 1.0
    assert report.pairs["outcome"]["agree_fraction"] == 1.0
    assert report.pairs["reasoning_tokens"]["mean_diff"] == 0.0
    q = report.queries
    assert [row["kendall_tau_b"] for row in q["per_query"]] == [pytest.approx(1.0)] * 3
    assert q["kendall_tau_b"]["mean"] == pytest.approx(1.0) and q["spearman"]["mean"] == pytest.approx(1.0)
    assert q["top10_overlap"]["mean"] == 1.0
    test = report.evaluation["paired_test"]
    assert test["p_value"] == 1.0 and test["mean_diff"] == 0.0
    assert report.figures["score_diff_histogram"]["counts"][10] == 12  # all in the middle bin, at 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["pairs"] == report.pairs
    _check_figures(tmp_path, on_disk)  # the report as written
    assert "B reuses A's judgements" in "\n".join(comparison.summary_lines(report))


def test_without_matplotlib_the_text_report_still_works(self_compare, tmp_path, monkeypatch):
    # None in sys.modules makes "import matplotlib..." raise ImportError, as if it were not installed.
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    items, a, b, qrels = self_compare
    report = comparison.write_report(comparison.build_report(items, a, b, qrels), tmp_path)
    assert "rank1-hf[plot]" in report.figures_skipped
    assert not list(tmp_path.glob("*.png"))
    md = (tmp_path / "report.md").read_text()
    assert "Figures were skipped" in md and "rank1-hf[plot]" in md
    data = json.loads((tmp_path / "report.json").read_text())["figures"]
    assert all(d["file"] is None for d in data.values())
    assert len(data["score_scatter"]["x"]) == 12 and data["per_query_ndcg"]["qids"] == ["q1", "q2", "q3"]


def test_input_errors_come_before_any_model_load(collection, tmp_path):
    with pytest.raises(Rank1Error, match="--run"):
        _main(["--a", "x", "--b", "y", "--queries", str(collection["queries"]), "--corpus", str(collection["corpus"]),
               "--report", str(tmp_path / "r")])
    with pytest.raises(Rank1Error, match="top-k"):
        _main(["--a", "x", "--b", "y", *_compare_args(collection, tmp_path / "r"), "--top-k", "0"])
    with pytest.raises(Rank1Error, match="unknown measure"):
        _main(["--a", "x", "--b", "y", *_compare_args(collection, tmp_path / "r"), "--test-measure", "nDCG@"])


def test_pairs_judged_earlier_are_reused_and_left_out_of_the_cost(tokenizer, collection, tmp_path):
    """A rerank that stopped part-way (or judged a subset) leaves judgements the comparison picks up."""
    from rank1_hf.testing import tiny_model
    from rank1_hf.ranker import Rank1

    ranker = Rank1.from_model(tiny_model(tokenizer, seed=2), tokenizer, max_new_tokens=8, context_size=512)
    items = pipeline.load_items(collection["run"], collection["queries"], collection["corpus"])
    with JudgementStore(tmp_path / "s.sqlite") as store:
        earlier = pipeline.judge_items(ranker, items[:5], store, shard=pipeline.Shard())
        variant = comparison.judge_variant("A", ranker, items, store)
    assert variant.cost["reused"] == 5 and variant.cost["judged_now"] == 7
    assert "7 pairs judged now; 5 were reused" in variant.cost["note"]
    assert variant.cost["pairs_per_s"] > 0 and variant.cost["load_s"] is None  # a loaded ranker: no load time
    assert all(variant.result.judgements[k] == j for k, j in earlier.judgements.items())
