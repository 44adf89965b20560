"""CLI guards: Ctrl-C ends every command with status 130 and no traceback, at any moment; every argument
is checked before a model is loaded; ids a TREC line cannot hold and JSON runs' empty queries."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from test_cli import files  # noqa: F401 - the fixture

from rank1_hf import cli
from rank1_hf.io.formats import sample_paths

SAMPLE = sample_paths()




def _rerank_args(d: Path, *extra: str, **override) -> list[str]:
    paths = {"run": d / "run.trec", "queries": d / "q.tsv", "corpus": d / "c.tsv", "output": d / "out.trec"}
    paths.update(override)
    return ["rerank", "--model", str(d / "no-model-here"), "--no-progress",
            *(x for k, v in paths.items() for x in (f"--{k}", str(v))), *extra]


def _compare_args(d: Path, *extra: str) -> list[str]:
    return ["compare", "--a", str(d / "model-a"), "--b", str(d / "model-b"), "--run", str(d / "run.trec"),
            "--queries", str(d / "q.tsv"), "--corpus", str(d / "c.tsv"), "--report", str(d / "report"),
            "--no-progress", *extra]


def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before every argument was checked")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: every check must come before it."""
    from rank1_hf.cli import compare, rerank, score

    for module in (compare, rerank, score):
        monkeypatch.setattr(module, "make_ranker", _never_load)


def _bad(capsys, args: list[str], *expected: str) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rank1-hf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- Ctrl-C


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["score", "rerank-loading", "evaluate", "compare", "compare-loading", "parser"])
def test_ctrl_c_exits_130_without_traceback_in_every_command(files, capsys, monkeypatch, command):
    from rank1_hf.io import evaluate as evaluate_module
    from rank1_hf.cli import compare, rerank, score

    for name in ("m", "no-model-here", "model-a", "model-b"):  # model folders the pre-flight accepts
        (files / name).mkdir()
        (files / name / "config.json").write_text("{}")
    if command == "score":
        monkeypatch.setattr(score, "make_ranker", _interrupt)
        args = ["score", "--model", str(files / "m"), "--query", "cats", "--passage", "Cats purr."]
    elif command == "rerank-loading":
        monkeypatch.setattr(rerank, "make_ranker", _interrupt)
        args = _rerank_args(files)
    elif command == "evaluate":
        monkeypatch.setattr(evaluate_module, "evaluate", _interrupt)
        args = ["evaluate", "--run", str(SAMPLE["run"]), "--qrels", str(SAMPLE["qrels"])]
    elif command == "compare":
        monkeypatch.setattr(compare, "judge_variant", _interrupt)
        args = _compare_args(files)
    elif command == "compare-loading":
        monkeypatch.setattr(compare, "make_ranker", _interrupt)
        args = _compare_args(files)
    else:
        monkeypatch.setattr(cli, "build_parser", _interrupt)
        args = ["evaluate"]
    handler = signal.getsignal(signal.SIGINT)
    try:
        status = cli.main(args)
    except KeyboardInterrupt:  # escaping main() means a traceback (and would stop pytest itself)
        pytest.fail("KeyboardInterrupt escaped cli.main()")
    assert status == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(r"^rank1-hf: interrupted", err, re.M), err
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is not left ignored


# ---------------------------------------------------------------------------------------------- arguments


def test_traces_path_is_checked_before_loading(files, capsys, no_loading):
    (files / "a-file").write_text("x")
    _bad(capsys, _rerank_args(files, "--traces", str(files / "a-file" / "t.jsonl")), "a-file", "cannot write")
    _bad(capsys, _rerank_args(files, "--traces", str(files / "out.trec")), "--traces", "same file as --output")


def test_run_tag_is_checked_before_loading(files, capsys, no_loading):
    _bad(capsys, _rerank_args(files, "--tag", "two words"), "run tag must be one non-empty word")
    _bad(capsys, _rerank_args(files, "--tag", ""), "run tag")


def test_every_store_is_checked_before_loading(files, capsys, no_loading):
    _bad(capsys, _rerank_args(files, "--store", str(files / "s.sqlite"), str(files / "missing.sqlite")),
         "missing.sqlite", "does not exist")
    (files / "a-directory").mkdir()
    _bad(capsys, _rerank_args(files, "--store", str(files / "a-directory")), "a-directory")
    (files / "garbage.sqlite").write_bytes(b"not a database at all" * 100)
    _bad(capsys, _rerank_args(files, "--store", str(files / "garbage.sqlite")), "garbage.sqlite")
    _bad(capsys, _rerank_args(files, "--store", str(files / "out.trec")), "same file as --output")


def test_other_arguments_are_checked_before_loading(files, capsys, no_loading):
    _bad(capsys, _rerank_args(files, "--wait-timeout", "0"), "--wait-timeout must be positive")
    _bad(capsys, _rerank_args(files, "--dtype", "float17"), "unknown dtype")
    _bad(capsys, _rerank_args(files, "--max-memory", "0=lots"), "--max-memory", "bad max_memory size")
    _bad(capsys, ["score", "--model", str(files / "m"), "--query", "q", "--passage", "p", "--dtype", "float17"],
         "unknown dtype")
    _bad(capsys, ["score", "--model", str(files / "m"), "--query", "q", "--passage", "p",
                  "--max-new-tokens", "100", "--context-size", "50"], "--max-new-tokens < --context-size")
    # compare: B's loading flags before A is loaded and judged
    _bad(capsys, _compare_args(files, "--b-dtype", "float17"), "--b-", "unknown dtype")
    _bad(capsys, _compare_args(files, "--a-device-map", "nowhere:7"), "--a-device-map", "bad value")


# ---------------------------------------------------------------------------------------------- inputs


def test_ids_with_whitespace_are_refused_before_loading(files, capsys, no_loading):
    (files / "q.jsonl").write_text('{"_id": "q 1", "text": "how do cats purr"}\n')
    (files / "c.jsonl").write_text('{"_id": "d1", "text": "Cats purr."}\n{"_id": "d 1", "text": "Cats purr."}\n')
    (files / "run.json").write_text('{"q 1": {"d1": 2.0}}')
    _bad(capsys, _rerank_args(files, queries=files / "q.jsonl"), "q.jsonl line 1", "'q 1'", "whitespace")
    _bad(capsys, _rerank_args(files, corpus=files / "c.jsonl"), "c.jsonl line 2", "'d 1'", "whitespace")
    _bad(capsys, _rerank_args(files, run=files / "run.json"), "run.json", "'q 1'", "whitespace")
    (files / "run2.json").write_text('{"q1": {"d1": 1.0, "d1": 2.0}}')
    _bad(capsys, _rerank_args(files, run=files / "run2.json"), "run2.json", "qid 'q1'", "docid 'd1'", "twice")




def test_query_without_documents_is_in_the_summary(model_dir, files, capsys):
    (files / "run.json").write_text('{"q1": {"d1": 2.0, "d2": 1.0}, "q2": {}, "q9": {}}')
    args = _rerank_args(files, "--max-new-tokens", "4", "--threads", "1", run=files / "run.json")
    args[2] = model_dir
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "queries without documents in the run: 2 (q2, q9)" in out.splitlines()
    assert re.search(r"^judged now: 2$", out, re.M)
