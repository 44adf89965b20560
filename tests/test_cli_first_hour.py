"""A new user's first hour: bad input answered in about a second (a real subprocess, timed), in one line
that names the file, the line and the likely cause, and the flag rather than the Python parameter; unknown
options point to the nearest one and the subcommand's help; --version; every option has help text;
output folders are made."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank1_hf import cli
from rank1_hf.io.formats import sample_paths

SAMPLE = sample_paths()
ROOT = Path(__file__).resolve().parent.parent
FAST_S = 2.0  # "answered in about a second", with room for a busy shared CPU


def _timed_cli(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rank1_hf", *args], capture_output=True, text=True, env=environ,
                          timeout=60, cwd=ROOT)
    return proc, time.monotonic() - started


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rank1-hf: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _rerank(tmp_path: Path, *extra: str, **paths: str) -> list[str]:
    files = {"run": str(SAMPLE["run"]), "queries": str(SAMPLE["queries"]), "corpus": str(SAMPLE["corpus"]),
             "output": str(tmp_path / "out.trec"), **paths}
    return ["rerank", "--model", "demo", "--no-progress", *(x for k, v in files.items() for x in (f"--{k}", v)),
            *extra]


def _fast_error(args: list[str], *expected: str, **env: str) -> str:
    proc, seconds = _timed_cli(*args, **env)
    line = _error_line(proc)
    for text in expected:
        assert text in line, line
    assert seconds < FAST_S, f"{seconds:.1f} s to answer: {line}"
    return line


def test_jsonl_corpus_given_as_run_is_named_as_such_in_a_second(tmp_path):
    _fast_error(_rerank(tmp_path, run=str(SAMPLE["corpus"])), "corpus.jsonl line 2", "JSONL corpus or queries",
                "not a run")


def test_empty_queries_file_is_blamed_not_the_run(tmp_path):
    (tmp_path / "queries.jsonl").write_text("")
    line = _fast_error(_rerank(tmp_path, queries=str(tmp_path / "queries.jsonl")), "queries.jsonl", "empty")
    assert "run.trec" not in line


def test_queries_of_another_dataset_are_named_as_the_likely_cause(tmp_path):
    (tmp_path / "q.tsv").write_text("x1\tsomething else\n")
    _fast_error(_rerank(tmp_path, queries=str(tmp_path / "q.tsv")), "run.trec line 1", "none of the run's qids")


def test_run_given_as_queries_is_recognised(tmp_path):
    _fast_error(_rerank(tmp_path, queries=str(SAMPLE["run"])), "run.trec line 1", "looks like a TREC run")


def test_judging_flag_errors_name_the_flag_in_a_second(tmp_path):
    line = _fast_error(_rerank(tmp_path, "--kv-memory", "2G"), "--kv-memory", "'2G'")
    assert "kv_memory" not in line
    _fast_error(_rerank(tmp_path, "--max-new-tokens", "100", "--context-size", "50"), "--max-new-tokens",
                "--context-size")


def test_loading_flag_errors_fail_before_torch(tmp_path):
    _fast_error(_rerank(tmp_path, "--dtype", "float8"), "--dtype", "float8")
    _fast_error(_rerank(tmp_path, "--max-memory", "0=40XB"), "--max-memory")


def test_unknown_option_suggests_the_nearest_and_the_subcommands_help(tmp_path):
    line = _fast_error(_rerank(tmp_path, "--topk", "2"), "--topk", "did you mean --top-k?",
                       "see rank1-hf rerank --help")
    assert "rank1-hf --help" not in line


def test_model_neither_local_nor_reachable_fails_fast_naming_hf_hub_offline(tmp_path):
    # A closed local port stands in for an unreachable hub: refused at once, no 30 s of retries.
    _fast_error(_rerank(tmp_path, "--model", "nosuch-org/nosuch-model"), "--model nosuch-org/nosuch-model",
                "cannot be reached", "HF_HUB_OFFLINE", HF_ENDPOINT="http://127.0.0.1:9",
                HF_HUB_CACHE=str(tmp_path / "hub"))
    _fast_error(_rerank(tmp_path, "--model", str(tmp_path / "no-such-dir")), "no such folder")
    (tmp_path / "empty-model").mkdir()
    _fast_error(_rerank(tmp_path, "--model", str(tmp_path / "empty-model")), "without config.json")


def test_model_in_the_hub_cache_is_not_refused_offline(tmp_path, monkeypatch):
    from rank1_hf.cli.preflight import check_model

    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model("org/cached")  # no error: transformers will load it from the cache


def test_version():
    proc, _ = _timed_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("rank1-hf ") and proc.stdout.split()[1][0].isdigit()


def test_every_option_has_help_text():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {action.option_strings or action.dest}" for name, p in sub.choices.items()
               for action in p._actions if action.help in (None, "") and not isinstance(action, argparse._HelpAction)]
    assert missing == []
    assert "default 8000" in sub.choices["serve"].format_help()


def test_output_folders_are_made(model_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "rank1.trec"
    args = ["rerank", "--model", model_dir, "--run", str(SAMPLE["run"]), "--queries", str(SAMPLE["queries"]),
            "--corpus", str(SAMPLE["corpus"]), "--top-k", "1", "--max-new-tokens", "2", "--threads", "1",
            "--output", str(out), "--store", str(tmp_path / "s.sqlite"), "--no-progress"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert out.is_file() and out.with_name("rank1.traces.jsonl").is_file()
    assert [json.loads(line)["qid"] for line in out.with_name("rank1.traces.jsonl").read_text().splitlines()]


def test_plan_on_cpu_reports_the_float32_weights_that_load(tmp_path):
    from rank1_hf import testing

    tok = testing.qwen_tokenizer()
    model = testing.tiny_model(tok)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"  # saved as rank1's checkpoints are
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    proc, _ = _timed_cli("plan", str(tmp_path / "m"), "--max-memory", "cpu=1GiB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "plan: float32 weights"
    proc, _ = _timed_cli("plan", str(tmp_path / "m"), "--max-memory", "0=1GiB")
    assert proc.stdout.splitlines()[0] == "plan: bfloat16 weights"
