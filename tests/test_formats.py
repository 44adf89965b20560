"""Readers and writers for reranking inputs and outputs (rank1_hf.io.formats)."""

from __future__ import annotations

import functools
import json
import math
import os
import stat
from pathlib import Path

import pytest

from rank1_hf.errors import Rank1Error
from rank1_hf.io.formats import (
    check_run,
    read_corpus,
    read_instructions,
    read_qrels,
    read_queries,
    read_run,
    sample_paths,
    untied_scores,
    write_jsonl,
    write_run,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- queries / corpus


def test_queries_tsv_and_jsonl(tmp_path: Path) -> None:
    tsv = _write(tmp_path / "q.tsv", "1\tfirst query\n\n2\tsecond\tquery with tab\n")
    assert read_queries(tsv) == {"1": "first query", "2": "second\tquery with tab"}
    jsonl = _write(tmp_path / "q.jsonl", '{"_id": "a", "text": "x"}\n{"query_id": 7, "text": "y", "metadata": {}}\n')
    assert read_queries(jsonl) == {"a": "x", "7": "y"}


def test_format_sniffed_without_extension(tmp_path: Path) -> None:
    assert read_queries(_write(tmp_path / "queries", '{"_id": "a", "text": "x"}\n')) == {"a": "x"}
    assert read_queries(_write(tmp_path / "queries2", "a\tx\n")) == {"a": "x"}


def test_empty_query_text_names_id_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": "  "}\n')
    with pytest.raises(Rank1Error, match=r"q\.jsonl line 2: query id 'b' has empty text"):
        read_queries(path)


def test_tsv_line_without_tab(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match=r"q\.tsv line 1: .*no tab"):
        read_queries(_write(tmp_path / "q.tsv", "just words\n"))


def test_duplicate_query_id(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match=r"line 2: duplicate query id 'a'"):
        read_queries(_write(tmp_path / "q.tsv", "a\tx\na\ty\n"))


def test_instructions_drop_empty(tmp_path: Path) -> None:
    path = _write(tmp_path / "i.jsonl", '{"_id": "a", "text": "Must mention a date."}\n{"_id": "b", "text": ""}\n')
    assert read_instructions(path) == {"a": "Must mention a date."}


def test_corpus_beir_title_text_joining(tmp_path: Path) -> None:
    rows = [
        {"_id": "d1", "title": "Title", "text": "Body text."},
        {"_id": "d2", "title": "", "text": "No title."},
        {"_id": "d3", "text": "Missing title."},
        {"_id": "d4", "title": None, "text": "Null title."},
        {"_id": "d5", "title": " Padded ", "text": "Kept."},
    ]
    path = _write(tmp_path / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # As the official rank1 code joins a record: f"{title} {text}" whenever there is a title field, even an
    # empty one, nothing stripped; text alone without one (and, rank1-hf's choice, for a null title).
    assert read_corpus(path) == {
        "d1": "Title Body text.",
        "d2": " No title.",
        "d3": "Missing title.",
        "d4": "Null title.",
        "d5": " Padded  Kept.",
    }


def test_corpus_tsv(tmp_path: Path) -> None:
    assert read_corpus(_write(tmp_path / "c.tsv", "d1\tsome passage\n")) == {"d1": "some passage"}


def test_empty_passage_names_docid_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "corpus.jsonl", '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "title": "T", "text": ""}\n')
    with pytest.raises(Rank1Error, match=r"corpus\.jsonl line 2: docid 'd2' has empty text"):
        read_corpus(path)


def test_invalid_json_line(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match=r"corpus\.jsonl line 1: invalid JSON"):
        read_corpus(_write(tmp_path / "corpus.jsonl", '{"_id": "d1", "text": \n'))


def test_non_utf8_bytes_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_bytes(b"1\tfine\n2\tcaf\xe9\n")
    with pytest.raises(Rank1Error, match=r"q\.tsv line 2: not valid UTF-8"):
        read_queries(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match="cannot read"):
        read_run(tmp_path / "nope.trec")


# --------------------------------------------------------------------------- runs / qrels


def test_malformed_run_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.trec", "q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2\n")
    with pytest.raises(Rank1Error, match=r"run\.trec line 2: expected 6 fields 'qid Q0 docid rank score tag', got 4"):
        read_run(path)


def test_run_score_not_a_number(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match=r"line 1: score 'high' is not a number"):
        read_run(_write(tmp_path / "run.trec", "q1 Q0 d1 1 high t\n"))


def test_duplicate_pair_in_run(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.trec", "q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\nq1 Q0 d1 3 0.5 t\n")
    with pytest.raises(Rank1Error, match=r"run\.trec line 3: duplicate pair qid 'q1' docid 'd1' \(first on line 1\)"):
        read_run(path)


def test_run_orders_by_score_then_docid_and_keeps_top_k(tmp_path: Path) -> None:
    # The rank column is deliberately wrong: scores decide, ties go to the larger docid (trec_eval's rule).
    path = _write(
        tmp_path / "run.trec",
        "q1 Q0 dA 1 1.0 t\nq1 Q0 dB 2 1.0 t\nq1 Q0 dC 3 3.0 t\nq1 Q0 dD 4 0.5 t\nq2 Q0 x 1 -1 t\n",
    )
    assert read_run(path) == {"q1": [("dC", 3.0), ("dB", 1.0), ("dA", 1.0), ("dD", 0.5)], "q2": [("x", -1.0)]}
    assert read_run(path, top_k=2) == {"q1": [("dC", 3.0), ("dB", 1.0)], "q2": [("x", -1.0)]}


def test_top_k_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match="top_k"):
        read_run(_write(tmp_path / "run.trec", "q1 Q0 d1 1 1 t\n"), top_k=0)


def test_qrels(tmp_path: Path) -> None:
    path = _write(tmp_path / "qrels.txt", "q1 0 d1 2\nq1 0 d2 0\nq2 0 d1 1\n")
    assert read_qrels(path) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d1": 1}}
    with pytest.raises(Rank1Error, match=r"qrels\.txt line 1: expected 4 fields .* or 3 .*got 5"):
        read_qrels(_write(tmp_path / "qrels.txt", "q1 0 d1 2 x\n"))
    with pytest.raises(Rank1Error, match=r"qrels\.txt line 2: .*got 3 after 4 on the first line"):
        read_qrels(_write(tmp_path / "qrels.txt", "q1 0 d1 2\nq1 d2 1\n"))


def test_beir_qrels_tsv_with_and_without_header(tmp_path: Path) -> None:
    # BEIR's qrels/test.tsv: tab-separated query-id, corpus-id, score, with a header line.
    expected = {"q1": {"d1": 2, "d2": 0}, "q2": {"d1": 1}}
    body = "q1\td1\t2\nq1\td2\t0\nq2\td1\t1\n"
    assert read_qrels(_write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\n" + body)) == expected
    assert read_qrels(_write(tmp_path / "noheader.tsv", body)) == expected
    with pytest.raises(Rank1Error, match=r"line 3: duplicate judgement for qid 'q1' docid 'd1'"):
        read_qrels(_write(tmp_path / "dup.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td1\t1\n"))


def test_json_run_files(tmp_path: Path) -> None:
    # The official rank1 run files and BRIGHT's score.json: {qid: {docid: score}}.
    flat = _write(tmp_path / "scifact_default_predictions.json", json.dumps(
        {"q1": {"a": 1.5, "b": 7, "c": 1.5}, "q2": {"x": -2.0}}))
    expected = {"q1": [("b", 7.0), ("c", 1.5), ("a", 1.5)], "q2": [("x", -2.0)]}
    assert read_run(flat) == expected
    assert read_run(flat, top_k=1) == {"q1": [("b", 7.0)], "q2": [("x", -2.0)]}
    # mteb 2.x prediction_folder files: {"mteb_model_meta": ..., subset: {split: {qid: {docid: score}}}}.
    meta = {"model_name": "bm25s", "revision": "1"}
    one = _write(tmp_path / "NFCorpus_predictions.json", json.dumps(
        {"mteb_model_meta": meta, "default": {"test": {"q1": {"a": 1.5, "b": 7, "c": 1.5}, "q2": {"x": -2.0}}}}))
    assert read_run(one) == expected
    two = _write(tmp_path / "Bright_predictions.json", json.dumps(
        {"mteb_model_meta": meta, "biology": {"standard": {"q": {"a": 1}}}, "pony": {"standard": {"q": {"b": 2}}}}))
    assert read_run(two, subset="pony") == {"q": [("b", 2.0)]}
    with pytest.raises(Rank1Error, match=r"choose the mteb subset to read \(subset=...\): 'biology', 'pony'"):
        read_run(two)
    with pytest.raises(Rank1Error, match=r"docid 'a': score 'high' is not a number"):
        read_run(_write(tmp_path / "bad.json", '{"q": {"a": "high"}}'))
    with pytest.raises(Rank1Error, match=r"bad2\.json line 1: invalid JSON"):
        read_run(_write(tmp_path / "bad2.json", '{"q": '))


def test_unknown_qid(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.trec", "q1 Q0 d1 1 1 t\nq9 Q0 d1 1 1 t\n")
    with pytest.raises(Rank1Error, match=r"run\.trec line 2: qid 'q9' is not in the queries"):
        check_run(read_run(path), {"q1": "x"}, {"d1": "p"}, path)


def test_unknown_docid(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.trec", "q1 Q0 d1 1 2 t\nq1 Q0 d7 2 1 t\n")
    with pytest.raises(Rank1Error, match=r"run\.trec line 2: docid 'd7' \(qid 'q1'\) is not in the corpus"):
        check_run(read_run(path), {"q1": "x"}, {"d1": "p"}, path)
    with pytest.raises(Rank1Error, match=r"^run: docid 'd7'"):
        check_run(read_run(path), {"q1": "x"}, {"d1": "p"})


# --------------------------------------------------------------------------- writers


def test_write_run_round_trip_and_tie_break(tmp_path: Path) -> None:
    run = {"q2": [("b", 0.1)], "q1": [("a", 0.5), ("z", 0.5), ("m", 0.9), ("k", 1 / 3)]}
    path = tmp_path / "out.trec"
    write_run(path, run, tag="rank1")
    below_half = 0.49999999999999994  # the double just below 0.5, written for the tied "a"
    assert path.read_text().splitlines()[:4] == [
        "q1 Q0 m 1 0.9 rank1",
        "q1 Q0 z 2 0.5 rank1",
        f"q1 Q0 a 3 {below_half!r} rank1",
        f"q1 Q0 k 4 {1 / 3!r} rank1",
    ]
    # Untied scores survive exactly, and reading gives back the written order.
    assert read_run(path) == {"q1": [("m", 0.9), ("z", 0.5), ("a", below_half), ("k", 1 / 3)], "q2": [("b", 0.1)]}


def test_untied_scores_cascade() -> None:
    # 1.0 three times, then a raw score just below the second adjusted one: every step stays one double.
    step = math.nextafter
    one, below1, below2 = 1.0, step(1.0, 0.0), step(step(1.0, 0.0), 0.0)
    assert untied_scores([1.0, 1.0, 1.0, below1, 0.25, 0.25]) == [
        one, below1, below2, step(below2, 0.0), 0.25, step(0.25, 0.0)]
    assert untied_scores([0.0, 0.0]) == [0.0, -5e-324]


@pytest.mark.parametrize("tie_break", ["trec_eval", "ascending", "file order"])
def test_written_run_reads_the_same_under_any_tie_rule(tmp_path: Path, tie_break: str) -> None:
    # Ties everywhere (a model whose true/false logits are always equal scores every pair 0.5).
    run = {"q": [(d, 0.5) for d in ("d3", "d1", "d10", "d2")]}
    path = tmp_path / "tied.trec"
    write_run(path, run, tag="t")
    rows = [line.split() for line in path.read_text().splitlines()]
    written = [r[2] for r in rows]

    def trec_eval(i: int, j: int) -> int:  # its comparator: score descending, then strcmp(docno) descending
        a, b = (float(rows[i][4]), rows[i][2].encode()), (float(rows[j][4]), rows[j][2].encode())
        return (b > a) - (b < a)

    keys = {
        "trec_eval": functools.cmp_to_key(trec_eval),
        "ascending": lambda i: (-float(rows[i][4]), rows[i][2]),
        "file order": lambda i: (-float(rows[i][4]), i),
    }
    assert [rows[i][2] for i in sorted(range(len(rows)), key=keys[tie_break])] == written
    assert written == ["d3", "d2", "d10", "d1"]  # trec_eval's order of equal scores: docid descending


def test_write_run_rejects_bad_tag(tmp_path: Path) -> None:
    with pytest.raises(Rank1Error, match="tag"):
        write_run(tmp_path / "out.trec", {"q": [("d", 1.0)]}, tag="two words")


def test_unwritable_output_path(tmp_path: Path) -> None:
    blocker = _write(tmp_path / "a_file", "x")
    target = blocker / "run.trec"  # its parent is a file, so no one (not even root) can create it
    with pytest.raises(Rank1Error, match=rf"{target}: cannot write"):
        write_run(target, {"q": [("d", 1.0)]}, tag="t")
    with pytest.raises(Rank1Error, match="cannot write"):
        write_jsonl(target, [{"a": 1}])


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = _write(tmp_path / "out.jsonl", "old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_written_files_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_run(tmp_path / "out.trec", {"q": [("d", 1.0)]}, tag="t")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.trec").stat().st_mode) == 0o644


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"qid": "q1", "docid": "d1", "score": 0.25, "reasoning": "naïve → ok"}, {"qid": "q2"}]
    path = tmp_path / "out.jsonl"
    write_jsonl(path, rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


# --------------------------------------------------------------------------- bundled sample


def test_sample_files_load_and_are_consistent() -> None:
    paths = sample_paths()
    assert all(p.is_file() for p in paths.values()), paths
    queries = read_queries(paths["queries"])
    corpus = read_corpus(paths["corpus"])
    instructions = read_instructions(paths["instructions"])
    qrels = read_qrels(paths["qrels"])
    run = read_run(paths["run"])

    assert 25 <= len(queries) <= 40 and 250 <= len(corpus) <= 350
    assert all(len(text.split()) <= 70 for text in corpus.values())  # title + text stays short
    check_run(run, queries, corpus, paths["run"])
    assert set(run) == set(queries)
    assert all(1 <= len(docs) <= 20 for docs in run.values())
    assert set(instructions) <= set(queries) and instructions
    assert set(qrels) == set(queries)
    assert all(docid in corpus for judged in qrels.values() for docid in judged)
    assert {g for judged in qrels.values() for g in judged.values()} == {0, 1, 2}
    assert all(any(g == 2 for g in judged.values()) for judged in qrels.values())


def test_sample_run_is_reproducible(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "make_sample_run.py"
    spec = importlib.util.spec_from_file_location("make_sample_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = sample_paths()
    run = module.bm25_run(read_queries(paths["queries"]), read_corpus(paths["corpus"]), depth=20)
    write_run(tmp_path / "run.trec", run, tag="bm25")
    assert (tmp_path / "run.trec").read_bytes() == paths["run"].read_bytes()


# --------------------------------------------------------------------------- guards (issue 26)


def test_nan_scores_are_refused_in_trec_and_json_runs(tmp_path: Path) -> None:
    """A NaN score cannot be ranked: both run formats refuse it, naming the file (and the TREC line)."""
    with pytest.raises(Rank1Error, match=r"run\.trec line 2: score is NaN"):
        read_run(_write(tmp_path / "run.trec", "q1 Q0 d1 1 1.0 t\nq1 Q0 d2 2 nan t\n"))
    with pytest.raises(Rank1Error, match=r"run\.json: qid 'q1' docid 'd2': score nan is not a number"):
        read_run(_write(tmp_path / "run.json", '{"q1": {"d1": 1.0, "d2": NaN}}'))


@pytest.mark.parametrize("name, text, reader, message", [
    ("q.jsonl", '{"_id": "q 1", "text": "x"}\n', read_queries, r"q\.jsonl line 1: query id 'q 1' contains whitespace"),
    ("q.tsv", "q1\tx\nq\u00a02\ty\n", read_queries, r"q\.tsv line 2: query id 'q\\xa02' contains whitespace"),
    ("i.jsonl", '{"_id": "q\\t1", "text": "x"}\n', read_instructions, r"i\.jsonl line 1: query id 'q\\t1'"),
    ("c.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d 2", "text": "y"}\n', read_corpus,
     r"c\.jsonl line 2: docid 'd 2' contains whitespace"),
    ("c.tsv", "d 1\tx\n", read_corpus, r"c\.tsv line 1: docid 'd 1' contains whitespace"),
    ("run.json", '{"q 1": {"d1": 1.0}}', read_run, r"run\.json: qid 'q 1' contains whitespace"),
    ("run.json", '{"q1": {"d 1": 1.0}}', read_run, r"run\.json: qid 'q1': docid 'd 1' contains whitespace"),
    ("run.json", '{"": {"d1": 1.0}}', read_run, r"run\.json: empty qid"),
])
def test_ids_a_trec_line_cannot_hold_are_refused(tmp_path: Path, name, text, reader, message) -> None:
    """An id with whitespace would be split into two fields of the run written from it (8 fields a line,
    which ``rank1-hf evaluate`` then refuses): every reader refuses it, naming file, line and id."""
    with pytest.raises(Rank1Error, match=message):
        reader(_write(tmp_path / name, text))


def test_json_run_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """JSON keeps the last of two equal keys silently; a TREC run's repeated pair is an error, and so is
    the JSON one, naming the file, the query and the document."""
    with pytest.raises(Rank1Error, match=r"run\.json: qid 'q1': duplicate pair, docid 'd1' appears twice"):
        read_run(_write(tmp_path / "run.json", '{"q1": {"d1": 1.0, "d2": 0.5, "d1": 3.0}}'))
    with pytest.raises(Rank1Error, match=r"run\.json: qid 'q1' appears twice"):
        read_run(_write(tmp_path / "run.json", '{"q1": {"d1": 1.0}, "q2": {"d1": 1.0}, "q1": {"d2": 1.0}}'))
    predictions = {"mteb_model_meta": {"name": "bm25"}, "default": {"test": {"q1": {"d1": 2.0}}}}
    text = json.dumps(predictions).replace('{"d1": 2.0}', '{"d1": 2.0, "d1": 1.0}')
    with pytest.raises(Rank1Error, match=r"qid 'q1': duplicate pair, docid 'd1'"):
        read_run(_write(tmp_path / "preds.json", text))


def test_json_run_query_without_documents_is_kept_and_reported(tmp_path: Path) -> None:
    from rank1_hf import pipeline
    from rank1_hf.io.formats import empty_queries

    run = _write(tmp_path / "run.json", '{"q1": {"d1": 1.0}, "q2": {}, "q0": {}}')
    assert read_run(run) == {"q1": [("d1", 1.0)], "q2": [], "q0": []}
    assert empty_queries(read_run(run)) == ["q0", "q2"]
    queries = _write(tmp_path / "q.tsv", "q1\tcats\n")  # the empty queries need no text
    corpus = _write(tmp_path / "c.tsv", "d1\tCats purr.\n")
    items, no_documents = pipeline.read_job(run, queries, corpus)
    assert [(it.qid, it.docid) for it in items] == [("q1", "d1")] and no_documents == ["q0", "q2"]
    summary = pipeline.Summary(pairs=1, no_documents=no_documents)
    assert "queries without documents in the run: 2 (q0, q2)" in summary.lines()
    assert not any("without documents" in line for line in pipeline.Summary(pairs=1).lines())
