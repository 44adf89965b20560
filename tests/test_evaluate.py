"""Evaluation via ir_measures, checked against nDCG computed by hand (rank1_hf.io.evaluate)."""

from __future__ import annotations

import builtins
import math

import pytest

from rank1_hf.errors import Rank1Error
from rank1_hf.io.evaluate import DEFAULT_MEASURES, evaluate, format_table, per_query
from rank1_hf.io.formats import read_qrels, read_run, sample_paths

import ir_measures  # noqa: E402,F401  (a core dependency of rank1-hf: missing it is a failure, not a skip)

QRELS = {
    "q1": {"a": 2, "b": 1, "c": 0, "x": 1},  # x is relevant but never retrieved
    "q2": {"e": 1, "f": 2},
}
RUN = {
    "q1": [("c", 0.9), ("a", 0.8), ("b", 0.3), ("d", 0.1)],
    "q2": [("e", 5.0), ("g", 4.0), ("f", 1.0)],
}


def _dcg(gains: list[int]) -> float:
    """trec_eval's DCG: linear gain, log2(rank + 1) discount."""
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, 1))


def test_ndcg_at_10_matches_hand_computation() -> None:
    q1 = _dcg([0, 2, 1, 0]) / _dcg([2, 1, 1])
    q2 = _dcg([1, 0, 2]) / _dcg([2, 1])
    assert per_query(RUN, QRELS, "nDCG@10") == pytest.approx({"q1": q1, "q2": q2}, abs=1e-9)
    assert evaluate(RUN, QRELS, ["nDCG@10"])["nDCG@10"] == pytest.approx((q1 + q2) / 2, abs=1e-9)


def test_rr_and_recall() -> None:
    result = evaluate(RUN, QRELS)
    assert list(result) == list(DEFAULT_MEASURES)
    assert result["RR@10"] == pytest.approx((1 / 2 + 1) / 2, abs=1e-9)
    assert result["R@100"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-9)


def test_ties_follow_trec_eval() -> None:
    # Equal scores: trec_eval ranks "b" before "a" (docid descending), whatever order they come in.
    qrels = {"q": {"a": 1}}
    for run in ({"q": [("b", 1.0), ("a", 1.0)]}, {"q": [("a", 1.0), ("b", 1.0)]}):
        assert evaluate(run, qrels, ["RR@10"])["RR@10"] == pytest.approx(0.5, abs=1e-12)


def test_evaluate_equals_ir_measures_on_the_written_file(tmp_path) -> None:
    # A tied run (every score 0.5, as from a model whose true/false logits are always equal), written,
    # then scored by ir_measures straight from the file and by evaluate() from memory and from the file.
    import ir_measures

    from rank1_hf.io.formats import write_run

    qrels = {"q1": {"d1": 1, "d3": 2}, "q2": {"d2": 1}}
    run = {"q1": [("d1", 0.5), ("d2", 0.5), ("d3", 0.5), ("d4", 0.9)], "q2": [("d1", 0.5), ("d2", 0.5), ("d3", 0.5)]}
    path = tmp_path / "run.trec"
    write_run(path, run, tag="t")
    measures = ["nDCG@10", "RR@10", "P@2"]
    qrels_path = tmp_path / "qrels.txt"
    qrels_path.write_text("".join(f"{q} 0 {d} {g}\n" for q, docs in qrels.items() for d, g in docs.items()))
    theirs = ir_measures.calc_aggregate(
        [ir_measures.parse_measure(m) for m in measures],
        ir_measures.read_trec_qrels(str(qrels_path)),
        ir_measures.read_trec_run(str(path)),
    )
    theirs = {str(m): v for m, v in theirs.items()}
    assert evaluate(run, qrels, measures) == pytest.approx(theirs, abs=1e-12)
    assert evaluate(read_run(path), read_qrels(qrels_path), measures) == pytest.approx(theirs, abs=1e-12)
    # By hand: q1 ranks d4, d3, d2, d1 (RR 1/2), q2 ranks d3, d2, d1 (RR 1/2).
    assert theirs["RR@10"] == pytest.approx(0.5, abs=1e-12)


def test_missing_query_counts_as_zero() -> None:
    only_q2 = {"q2": RUN["q2"]}
    full = per_query(RUN, QRELS, "nDCG@10")
    assert per_query(only_q2, QRELS, "nDCG@10")["q1"] == 0.0
    assert evaluate(only_q2, QRELS, ["nDCG@10"])["nDCG@10"] == pytest.approx(full["q2"] / 2, abs=1e-9)


def test_unknown_measure() -> None:
    with pytest.raises(Rank1Error, match="unknown measure 'nDGC@10'"):
        evaluate(RUN, QRELS, ["nDGC@10"])


def test_missing_ir_measures_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ir_measures":
            raise ImportError("no ir_measures")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(Rank1Error, match=r"ir_measures is missing \(a dependency of rank1-hf\)"):
        evaluate(RUN, QRELS)


def test_format_table() -> None:
    table = format_table({"bm25": {"nDCG@10": 0.5, "RR@10": 0.25}, "rank1-7b": {"nDCG@10": 0.61234}})
    lines = table.splitlines()
    assert lines[0].split() == ["run", "nDCG@10", "RR@10"]
    assert lines[2].split() == ["bm25", "0.5000", "0.2500"]
    assert lines[3].split() == ["rank1-7b", "0.6123", "-"]
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_sample_bm25_leaves_room_for_reranking() -> None:
    paths = sample_paths()
    run, qrels = read_run(paths["run"]), read_qrels(paths["qrels"])
    bm25 = evaluate(run, qrels)["nDCG@10"]
    # A perfect reordering of the same candidates (what a reranker could reach at best).
    oracle = {qid: [(d, float(qrels[qid].get(d, 0))) for d, _ in docs] for qid, docs in run.items()}
    best = evaluate(oracle, qrels)["nDCG@10"]
    assert 0.3 < bm25 < 0.75 and best - bm25 > 0.15


def test_cli_evaluate_reads_beir_qrels_and_json_runs(tmp_path, capsys) -> None:
    # BEIR qrels/test.tsv (with its header) and a rank1 run-file JSON, scored by the CLI as by ir_measures.
    import json

    import ir_measures

    from rank1_hf.cli import main

    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td3\t2\nq2\td2\t1\n")
    run = tmp_path / "bm25_predictions.json"
    run.write_text(json.dumps({"q1": {"d1": 0.5, "d2": 0.5, "d3": 0.5}, "q2": {"d1": 2.0, "d2": 1.0}}))
    assert main(["evaluate", "--run", str(run), "--qrels", str(qrels), "--measures", "nDCG@10", "RR@10"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    trec = {"q1": {"d3": 0.5, "d2": 0.5, "d1": 0.5}, "q2": {"d1": 2.0, "d2": 1.0}}
    truth = {"q1": {"d1": 1, "d3": 2}, "q2": {"d2": 1}}
    theirs = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.RR @ 10], truth, trec)
    assert [float(x) for x in row[1:]] == pytest.approx(
        [theirs[ir_measures.nDCG @ 10], theirs[ir_measures.RR @ 10]], abs=1e-4)
    assert theirs[ir_measures.RR @ 10] == pytest.approx((1 + 1 / 2) / 2)  # q1: d3 first (docid descending)
