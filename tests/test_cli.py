"""The rank1-hf CLI end to end on a tiny random model: outputs, reuse, kill -9 + resume, two processes,
and one-line errors for bad input.

Scores of a tiny random model mean nothing; these tests check the plumbing. Runs that are compared for
identical output use --batch-size 1, because batched decoding rounds differently (about 1e-6 on a score)
depending on which pairs share a batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank1_hf import cli
from rank1_hf.io.formats import sample_paths

SAMPLE = sample_paths()
ROOT = Path(__file__).resolve().parent.parent




def _small_run(path: Path, queries: int, per_query: int) -> Path:
    """The first ``queries`` queries of the bundled sample run, ``per_query`` documents each."""
    kept, count = [], {}
    for line in SAMPLE["run"].read_text().splitlines():
        qid = line.split()[0]
        if (qid in count or len(count) < queries) and count.get(qid, 0) < per_query:
            count[qid] = count.get(qid, 0) + 1
            kept.append(line)
    path.write_text("\n".join(kept) + "\n")
    return path


def _args(model_dir: str, run: Path, out: Path, *extra: str) -> list[str]:
    return ["rerank", "--model", model_dir, "--run", str(run), "--queries", str(SAMPLE["queries"]),
            "--corpus", str(SAMPLE["corpus"]), "--instructions", str(SAMPLE["instructions"]),
            "--max-new-tokens", "8", "--threads", "1", "--output", str(out), "--no-progress", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rank1_hf", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


def _count(text: str, key: str) -> int:
    return int(re.search(rf"^{key}: (\d+)", text, re.M).group(1))


def _stored(store: Path) -> int:
    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


# ---------------------------------------------------------------------------------------------- happy paths


def test_rerank_end_to_end_then_everything_reused(model_dir, tmp_path, capsys):
    run = _small_run(tmp_path / "run.trec", queries=3, per_query=4)
    out = tmp_path / "out" / "reranked.trec"
    out.parent.mkdir()
    proc = _cli(*_args(model_dir, run, out, "--qrels", str(SAMPLE["qrels"]), "--top-k", "4"))
    assert proc.returncode == 0, proc.stderr
    assert _count(proc.stdout, "pairs") == 12 and _count(proc.stdout, "judged now") == 12
    assert "nDCG@10" in proc.stdout and "input (top 4)" in proc.stdout and "reranked" in proc.stdout

    lines = out.read_text().splitlines()
    assert len(lines) == 12 and all(len(line.split()) == 6 for line in lines)
    traces = [json.loads(line) for line in (tmp_path / "out" / "reranked.traces.jsonl").read_text().splitlines()]
    assert [(t["qid"], t["docid"]) for t in traces] == [tuple(line.split()[0:3:2]) for line in lines]
    assert set(traces[0]) == {"qid", "docid", "rank", "score", "outcome", "reasoning", "full_reasoning",
                              "reasoning_tokens", "prompt_tokens", "truncated", "true_logit", "false_logit",
                              "first_stage_rank", "first_stage_score", "query", "instruction", "passage"}
    assert (tmp_path / "out" / "rank1-judgements.sqlite").exists()

    before = out.read_text()
    assert cli.main(_args(model_dir, run, out, "--top-k", "4")) == 0
    stdout = capsys.readouterr().out
    assert _count(stdout, "reused from store") == 12 and _count(stdout, "judged now") == 0
    assert out.read_text() == before


def test_kill_9_then_resume_matches_an_uninterrupted_run(model_dir, tmp_path, capsys):
    run = _small_run(tmp_path / "run.trec", queries=8, per_query=3)  # 24 pairs
    killed, store = tmp_path / "killed" / "r.trec", tmp_path / "killed" / "rank1-judgements.sqlite"
    killed.parent.mkdir()
    # 48 reasoning tokens per pair keep the job running long enough to be caught in the middle.
    slow = ("--batch-size", "1", "--max-new-tokens", "48")
    args = _args(model_dir, run, killed, *slow, "--flush-every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "rank1_hf", *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if store.exists() and _stored_safe(store) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = _stored(store)
    with capsys.disabled():  # evidence in the log with pytest -s
        print(f"\nkilled with {done_before}/24 judgements in the store")
    assert 3 <= done_before < 24
    created = _created(store)

    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    assert _count(stdout, "reused from store") == done_before
    assert _count(stdout, "judged now") == 24 - done_before
    after = _created(store)
    assert {k: after[k] for k in created} == created  # finished rows were not redone

    clean = tmp_path / "clean" / "r.trec"
    clean.parent.mkdir()
    assert cli.main(_args(model_dir, run, clean, *slow)) == 0
    capsys.readouterr()
    assert killed.read_text() == clean.read_text()
    assert (killed.parent / "r.traces.jsonl").read_text() == (clean.parent / "r.traces.jsonl").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_exits_130_with_finished_judgements_committed(model_dir, tmp_path, sig):
    """Ctrl-C, or the SIGTERM accelerate/torchrun stop workers with: exit status 130, a one-line message
    naming what is in the store, no traceback."""
    run = _small_run(tmp_path / "run.trec", queries=8, per_query=3)
    out, store = tmp_path / "r.trec", tmp_path / "rank1-judgements.sqlite"
    args = _args(model_dir, run, out, "--batch-size", "1", "--max-new-tokens", "48", "--flush-every", "1")
    # SIGINT back to its default in the child: a shell may start background jobs with it ignored, and
    # Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "rank1_hf", *args], env=_env(), cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and (_stored_safe(store) if store.exists() else 0) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be interrupted"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    done = _stored(store)
    assert 2 <= done < 24
    assert stderr.strip().splitlines()[-1] == (
        f"rank1-hf: interrupted: the finished judgements are in the store {store}; rerun the same command to resume")
    assert "Traceback" not in stderr and not out.exists()


def _stored_safe(store: Path) -> int:
    try:
        return _stored(store)
    except sqlite3.Error:  # the schema may not exist yet
        return 0


def _created(store: Path) -> dict[str, float]:
    with sqlite3.connect(store) as conn:
        return dict(conn.execute("SELECT pair_key, created FROM judgements"))


def test_two_processes_match_one(model_dir, tmp_path, capsys):
    """accelerate launch --multi_gpu (its torchrun launcher; it needs no GPU) starts 2 ranks.

    ``accelerate launch --cpu --num_processes 2`` starts only one process in accelerate 1.x (multi-CPU
    needs mpirun), which would still give the right output, just not in parallel.
    """
    run = _small_run(tmp_path / "run.trec", queries=3, per_query=4)
    one, two = tmp_path / "one" / "r.trec", tmp_path / "two" / "r.trec"
    one.parent.mkdir(), two.parent.mkdir()
    assert cli.main(_args(model_dir, run, one, "--batch-size", "1")) == 0
    capsys.readouterr()
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher:
        cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rank1_hf"]
    else:  # pragma: no cover - accelerate is a dependency, but keep the fallback honest
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rank1_hf"]
    proc = subprocess.run([*cmd, *_args(model_dir, run, two, "--batch-size", "1")], capture_output=True,
                          text=True, env=_env(), timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helper = re.search(r"rank 1/2: judged (\d+) pairs", proc.stderr)
    assert "processes: 2" in proc.stdout and helper and _count(proc.stdout, "judged now") == 12
    assert 0 < int(helper.group(1)) < 12  # each rank judged its (hash-chosen) share
    assert two.read_text() == one.read_text()
    assert (two.parent / "r.traces.jsonl").read_text() == (one.parent / "r.traces.jsonl").read_text()


def test_score_evaluate_and_plan_commands(model_dir, capsys):
    assert cli.main(["score", "--model", model_dir, "--query", "how do cats purr", "--passage",
                     "Cats purr with their larynx.", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reasoning:\n") and re.search(r"^outcome: (answered|forced|fallback)$", out, re.M)
    assert re.search(r"^score: 0\.\d{6}$|^score: 1\.000000$", out, re.M)

    assert cli.main(["evaluate", "--run", str(SAMPLE["run"]), "--qrels", str(SAMPLE["qrels"]),
                     "--measures", "nDCG@10", "P@5"]) == 0
    out = capsys.readouterr().out
    assert "nDCG@10" in out and "P@5" in out and str(SAMPLE["run"]) in out

    assert cli.main(["plan", model_dir, "--max-memory", "0=50MiB,1=50MiB,cpu=1GiB", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: float32 weights") and "cuda:" in out and "lm_head" in out


def test_plan_prints_the_rows_that_fit(tmp_path, capsys):
    """The tiny config of test_loading's KV-plan tests: 512 bytes of K+V a token; on one 40,000,000-byte card
    its 553,152 bytes of weights leave 40,000,000 - 553,152 - 4,000,000 (10%) = 35,446,848 bytes, 69,232
    tokens, 2,163 pages of 32."""
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=1000, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(tmp_path)
    assert cli.main(["plan", str(tmp_path), "--max-memory", "0=40000000", "--prompt-tokens", "500",
                     "--reasoning-tokens", "500,1000", "--reasoning-tokens", "8192"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: bfloat16 weights")
    assert "KV cache: 0.50 KiB per token" in out and "= 69,232 tokens (2,163 pages of 32)" in out
    # prompt + reasoning = 1000, 1500, 8692 tokens: 32, 47, 272 pages; reserving 500 + 8192: 69,232 // 8692
    rows = re.findall(r"^ *([\d,]+) \| +(\d+) \| +(\d+)$", out, re.M)
    assert rows == [("500", "67", "7"), ("1,000", "46", "7"), ("8,192", "7", "7")]

    assert cli.main(["plan", str(tmp_path), "--max-memory", "0=40000000", "--kv-memory", "64KiB",
                     "--prompt-tokens", "28", "--reasoning-tokens", "100,1000"]) == 0
    out = capsys.readouterr().out
    assert "(--kv-memory)" in out and "= 128 tokens (4 pages of 32)" in out
    assert re.findall(r"^ *([\d,]+) \| +(\d+) \| +(\d+)$", out, re.M) == [("100", "1", "0"), ("1,000", "0", "0")]
    assert "0 rows: not one pair of prompt + 1,000 tokens fits" in out

    _bad(capsys, ["plan", str(tmp_path), "--max-memory", "0=1GiB", "--reasoning-tokens", "500,lots"],
         "--reasoning-tokens")


# ---------------------------------------------------------------------------------------------- bad input


def _bad(capsys, args: list[str], *expected: str) -> str:
    """main() must return 2 with one line 'rank1-hf: error: ...' containing ``expected``, no traceback."""
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rank1-hf: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """Small valid inputs; each bad-input test spoils one of them."""
    (tmp_path / "q.tsv").write_text("q1\thow do cats purr\nq2\tbread ovens\n")
    (tmp_path / "c.tsv").write_text("d1\tCats purr with their larynx.\nd2\tDeck ovens bake bread.\n")
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 2.0 bm25\nq1 Q0 d2 2 1.0 bm25\nq2 Q0 d2 1 3.0 bm25\n")
    return tmp_path


def _rerank_args(d: Path, **override: str) -> list[str]:
    paths = {"run": d / "run.trec", "queries": d / "q.tsv", "corpus": d / "c.tsv", "output": d / "out.trec"}
    paths.update(override)
    # A model id that does not exist: every check below must fire before the model is loaded.
    return ["rerank", "--model", str(d / "no-model-here"), "--no-progress",
            *(x for k, v in paths.items() for x in (f"--{k}", str(v)))]


def test_malformed_run_line(files, capsys):
    (files / "run.trec").write_text("q1 Q0 d1 1 2.0 bm25\nq1 Q0 d2 oops\n")
    _bad(capsys, _rerank_args(files), "run.trec line 2", "expected 6 fields")


def test_unknown_qid(files, capsys):
    (files / "run.trec").write_text("q1 Q0 d1 1 2.0 bm25\nq9 Q0 d1 1 2.0 bm25\n")
    _bad(capsys, _rerank_args(files), "run.trec line 2", "qid 'q9'")


def test_unknown_docid(files, capsys):
    (files / "run.trec").write_text("q1 Q0 d1 1 2.0 bm25\nq1 Q0 d7 2 1.0 bm25\n")
    _bad(capsys, _rerank_args(files), "run.trec line 2", "docid 'd7'")


def test_empty_query(files, capsys):
    (files / "q.tsv").write_text("q1\thow do cats purr\nq2\t   \n")
    _bad(capsys, _rerank_args(files), "q.tsv line 2", "empty text")


def test_empty_passage(files, capsys):
    (files / "c.jsonl").write_text('{"_id": "d1", "title": "Cats", "text": "Purring."}\n'
                                   '{"_id": "d2", "title": "Ovens", "text": ""}\n')
    _bad(capsys, _rerank_args(files, corpus=files / "c.jsonl"), "c.jsonl line 2", "'d2'", "empty text")


def test_duplicate_pair(files, capsys):
    (files / "run.trec").write_text("q1 Q0 d1 1 2.0 bm25\nq1 Q0 d1 2 1.0 bm25\n")
    _bad(capsys, _rerank_args(files), "run.trec line 2", "duplicate pair")


def test_non_utf8_bytes(files, capsys):
    (files / "c.tsv").write_bytes(b"d1\tCats purr.\nd2\tOvens \xff bake.\n")
    _bad(capsys, _rerank_args(files), "c.tsv line 2", "not valid UTF-8")


def test_unwritable_output_path(files, capsys):
    (files / "a-file").write_text("x")
    _bad(capsys, _rerank_args(files, output=files / "a-file" / "out.trec"), "a-file", "cannot write", "not a directory")
    _bad(capsys, _rerank_args(files, output=files), "is a directory")


def test_unknown_dataset_prompt_and_bad_argument(files, capsys):
    _bad(capsys, [*_rerank_args(files), "--dataset-prompt", "nosuchset"], "unknown dataset prompt", "scifact")
    _bad(capsys, [*_rerank_args(files), "--top-k", "ten"], "--top-k", "invalid int value")


def test_unknown_model_offline_exits_2_without_traceback(files):
    args = _rerank_args(files)
    args[2] = "org-that-does-not-exist/rank1-nope"
    proc = _cli(*args, env=_env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rank1-hf: error:")]
    assert errors == ["rank1-hf: error: --model org-that-does-not-exist/rank1-nope: not a local folder and not in "
                      "the hub cache, and HF_HUB_OFFLINE is set; download it where the hub is reachable or pass a "
                      "local folder"]


def test_late_error_keeps_finished_judgements(model_dir, files, capsys, monkeypatch):
    """A failure after the judging (here: the disk fills while writing the run) loses no judgement."""
    from rank1_hf import pipeline
    from rank1_hf.errors import Rank1Error

    def disk_full(*args, **kwargs):
        raise Rank1Error(f"{files / 'out.trec'}: cannot write: No space left on device")

    monkeypatch.setattr(pipeline, "write_outputs", disk_full)
    args = _rerank_args(files)
    args[2] = model_dir
    _bad(capsys, [*args, "--max-new-tokens", "4"], "No space left on device")
    assert _stored(files / "rank1-judgements.sqlite") == 3
    monkeypatch.undo()
    assert cli.main([*args, "--max-new-tokens", "4"]) == 0
    assert _count(capsys.readouterr().out, "reused from store") == 3
