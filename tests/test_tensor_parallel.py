"""Tensor parallel under torchrun on CPU (gloo, 2 processes on loopback): judgements equal single-process
ones for each family (many rows, preemption in a small pool, forced closes), a failing process takes the
job down with a clear message, and the mistakes a user can make are refused in one line.

Each torchrun job is bounded by a timeout: past it, the agent and every worker under it are killed by id.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES, make_pairs
from plant import plant_lengths

from rank1_hf import Rank1, Rank1Error
from rank1_hf.model.kv_budget import PAGE_SIZE, kv_bytes_per_token
from rank1_hf.prompt import build_prompt
from rank1_hf.testing import tiny_model

pytestmark = pytest.mark.torchrun

HERE = Path(__file__).parent
ROOT = HERE.parent
MAX_NEW = 40
# Planted reasoning lengths: several pages each, some past MAX_NEW (forced closes).
REASONING = [30, 5, 38, 12, 60, 20, 33, 8]
JOB_TIMEOUT = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(spec: dict, tmp: Path, processes: int = 2, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """Run tests/tp_job.py under torchrun; killed (its whole session, by the id it started with) past ``timeout``."""
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(HERE / "tp_job.py"), str(path)]
    return bounded(command, env, timeout)


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (torchrun's workers run in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def bounded(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command``; past ``timeout`` kill it and every process under it, each by its id, and fail."""
    proc = subprocess.Popen(command, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=30)
        raise AssertionError(f"the torchrun job ran past {timeout} s") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.fixture(scope="module")
def cases(tokenizers, tmp_path_factory):
    """Per family: a saved tiny model (4 heads, 2 KV heads), its pairs, planted lengths, the single-process
    judgements, and the case the torchrun job judges (a pool small enough to preempt)."""
    out = {}
    for family in ("qwen", "llama", "mistral"):
        tok = tokenizers[family]
        model = tiny_model(tok, FAMILIES[family][1], seed=0)
        folder = tmp_path_factory.mktemp(f"tp-{family}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        pairs = make_pairs(10, seed=3, max_words=30)
        lengths = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
        never = [lengths[3]]
        planted = {m: REASONING[k % len(REASONING)] for k, m in enumerate(lengths) if m not in never}
        tokens = max(lengths) + MAX_NEW + 2 * PAGE_SIZE  # two pages over one longest row: rows get preempted
        single = Rank1(str(folder), max_new_tokens=MAX_NEW, batch_size=8, engine="continuous",
                       kv_memory=tokens * kv_bytes_per_token(model))
        handle = plant_lengths(single.model, single.tokenizer, planted, never=set(never))
        try:
            judged = single.judge_with_stats(pairs)
        finally:
            handle.remove()
            single.close()
        # Each process holds half the KV heads: the same rows in half the bytes.
        options = {"max_new_tokens": MAX_NEW, "batch_size": 8, "kv_memory": tokens * kv_bytes_per_token(model) // 2}
        case = {"model": str(folder), "options": options, "pairs": pairs,
                "plant": {"lengths": planted, "never": never}}
        out[family] = (case, judged, single.core.settings.kv_tokens)
    return out


def test_tensor_parallel_judgements_equal_single_process_ones(cases, tmp_path):
    """Two processes judge each family's pairs (8 rows at once, a pool that preempts, rows forced at
    max_new_tokens): the same outcomes and reasoning as one process, scores within 1e-4."""
    families = list(cases)
    spec = {"out": str(tmp_path / "out.json"), "cases": [cases[f][0] for f in families]}
    job = torchrun(spec, tmp_path)
    assert job.returncode == 0, job.stderr[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    for family, got in zip(families, results):
        single, kv_tokens = cases[family][1:]
        assert got["kv_tokens"] == kv_tokens, family  # half the bytes per process hold the same rows
        assert single.stats.preemptions >= 1 and got["preemptions"] >= 1, family
        assert got["peak_rows"] > 1, family
        outcomes = {j.outcome for j in single.judgements}
        assert outcomes == {"answered", "forced"}, family
        for (outcome, reasoning, n, score), j in zip(got["judgements"], single.judgements):
            assert (outcome, reasoning, n) == (j.outcome, j.reasoning, j.reasoning_tokens), family
            assert abs(score - j.score) <= 1e-4, family


@pytest.mark.parametrize("rank, message", [
    (1, "tensor parallel process 1 failed: RuntimeError: planted failure"),  # a follower
    (0, "tensor parallel process 0 failed (RuntimeError: planted failure)"),  # the leader, its follower inside the step
])
def test_a_failing_process_takes_the_job_down(cases, tmp_path, rank, message):
    """A process fails in its third engine step: the job ends (no hang) with a non-zero status and says
    why (a follower also names itself); the leader writes no results."""
    spec = {"out": str(tmp_path / "out.json"), "cases": [cases["qwen"][0]], "fail": {"rank": rank, "step": 3}}
    job = torchrun(spec, tmp_path, timeout=120)
    assert job.returncode != 0
    assert message in job.stderr
    assert not (tmp_path / "out.json").exists()


def test_tensor_parallel_without_torchrun_is_refused(model_dir, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(Rank1Error, match="tensor parallel runs under torchrun"):
        Rank1(model_dir, tensor_parallel=True)


def test_heads_that_do_not_divide_are_refused():
    from rank1_hf.model.tensor_parallel import check_heads
    from transformers import Qwen2Config

    check_heads(Qwen2Config(num_attention_heads=4, num_key_value_heads=2), 2)
    with pytest.raises(Rank1Error, match=r"KV heads \(2\) to divide by 4; use 2 processes"):
        check_heads(Qwen2Config(num_attention_heads=4, num_key_value_heads=2), 4)
    with pytest.raises(Rank1Error, match="divide by 2"):
        check_heads(Qwen2Config(num_attention_heads=6, num_key_value_heads=3), 2)


def test_several_nodes_are_refused():
    from rank1_hf.model.tensor_parallel import layout_from_env

    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(Rank1Error, match="one torchrun job per replica"):
        layout_from_env(env)
    assert layout_from_env({**env, "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "2"}).rank == 2


# ---------------------------------------------------------------------------------------------- the CLI


def cli_torchrun(*args: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """``rank1-hf ARGS`` under torchrun, 2 processes (stopped by its session's id past ``timeout``)."""
    from test_cli import _env

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               # "--": torchrun's own parser would otherwise read --run as an abbreviation of --run-path.
               "--master-port", str(free_port()), "-m", "rank1_hf", "--", *args]
    return bounded(command, {**_env(), "OMP_NUM_THREADS": "1"}, timeout)


def scores(run: Path) -> dict[tuple[str, str], float]:
    return {(q, d): float(s) for q, _, d, _, s, _ in (line.split() for line in run.read_text().splitlines())}


def test_rerank_and_score_under_torchrun_match_one_process(model_dir, tmp_path, capsys):
    """``rerank --tensor-parallel`` under torchrun: rank 0 writes the run, the traces and one store (no
    per-rank stores, nothing from rank 1), with the single-process scores (within 1e-4) and reasoning;
    ``score --tensor-parallel`` prints rank 0's score once."""
    from test_cli import _args, _small_run

    from rank1_hf import cli

    run = _small_run(tmp_path / "run.trec", queries=2, per_query=4)
    single = tmp_path / "single" / "r.trec"
    single.parent.mkdir()
    assert cli.main(_args(model_dir, run, single, "--batch-size", "4")) == 0
    capsys.readouterr()
    out = tmp_path / "tp" / "r.trec"
    out.parent.mkdir()
    job = cli_torchrun(*_args(model_dir, run, out, "--batch-size", "4", "--tensor-parallel"))
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("rank1-hf rerank") == 1 and "judged now: 8" in job.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.traces.jsonl", "r.trec", "rank1-judgements.sqlite"]
    got, want = scores(out), scores(single)
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-4 for k in want)
    reasoning = [[json.loads(line)["reasoning"] for line in p.with_name("r.traces.jsonl").read_text().splitlines()]
                 for p in (out, single)]
    assert reasoning[0] == reasoning[1]

    pair = ("--query", "what is a cat", "--passage", "Cats are small felines.", "--max-new-tokens", "8")
    assert cli.main(["score", "--model", model_dir, *pair]) == 0
    alone = capsys.readouterr().out
    job = cli_torchrun("score", "--model", model_dir, *pair, "--tensor-parallel")
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("score: ") == 1
    score_of = [float(re.search(r"^score: (\S+)$", text, re.M).group(1)) for text in (job.stdout, alone)]
    assert abs(score_of[0] - score_of[1]) <= 1e-4
    assert job.stdout.split("\noutcome:")[0] == alone.split("\noutcome:")[0]  # the same reasoning


@pytest.mark.parametrize("extra, message", [
    ((), "tensor parallel runs under torchrun"),
    (("--device-map", "cpu"), "--tensor-parallel splits every layer over the processes itself: drop --device-map"),
])
def test_tensor_parallel_flag_mistakes_are_one_line(model_dir, tmp_path, capsys, monkeypatch, extra, message):
    from test_cli import _args, _small_run

    from rank1_hf import cli

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if extra:  # the flag clash is found before torchrun's environment is asked for
        monkeypatch.setenv("RANK", "0")
    run = _small_run(tmp_path / "run.trec", queries=1, per_query=1)
    assert cli.main(_args(model_dir, run, tmp_path / "r.trec", "--tensor-parallel", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_serve_on_a_tensor_parallel_model(model_dir, tmp_path):
    """``serve --tensor-parallel`` under torchrun: rank 0 serves, the other rank runs its engine's steps;
    concurrent requests share the steps and score as one process does (within 1e-4); SIGTERM to torchrun
    stops every process."""
    import threading
    import time

    import httpx
    from test_cli import _env

    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "rank1_hf", "--", "serve", "--model", model_dir,
               "--port", str(port), "--tensor-parallel", "--max-new-tokens", "8", "--threads", "1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(command, env={**_env(), "OMP_NUM_THREADS": "1"}, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    docs = [f"Document {i} about cats, bread and rivers." for i in range(6)]
    answers: dict[str, dict[int, float]] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        else:
            raise AssertionError("the server was not ready in 120 s")

        def ask(query: str) -> None:
            r = httpx.post(f"http://127.0.0.1:{port}/v2/rerank", json={"model": "m", "query": query, "documents": docs},
                           timeout=120)
            answers[query] = {x["index"]: x["relevance_score"] for x in r.json()["results"]}

        callers = [threading.Thread(target=ask, args=(q,)) for q in ("cats", "bread")]
        for t in callers:
            t.start()
        for t in callers:
            t.join(150)
    finally:
        workers = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in workers:  # by their ids, should any outlive the agent (still the workers it started)
            try:
                if "rank1_hf" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        log.close()
    single = Rank1(model_dir, max_new_tokens=8)
    for query in ("cats", "bread"):
        judged = single.judge([(query, d) for d in docs])
        assert sorted(answers[query]) == list(range(len(docs)))
        assert all(abs(j.score - answers[query][i]) <= 1e-4 for i, j in enumerate(judged))


# ---------------------------------------------------------------------------------------------- rank1-hf plan


def test_plan_shows_memory_and_kv_rows_per_card(model_dir, tiny, capsys):
    """``plan --tensor-parallel 2``: each card holds the norms whole and half of every other weight, half
    of each token's keys and values, and a pool of budget - weights - 10% reserve, in tokens at its half."""
    from rank1_hf import cli

    model, _ = tiny
    total = sum(p.numel() * 4 for p in model.parameters())
    norms = sum(p.numel() * 4 for name, p in model.named_parameters() if "norm" in name)
    config = model.config
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    budget = 2**30
    pool = budget - (norms + (total - norms) // 2) - budget // 10
    assert cli.main(["plan", model_dir, "--max-memory", "0=1GiB,1=1GiB", "--tensor-parallel", "2", "--dtype",
                     "float32"]) == 0
    out = capsys.readouterr().out
    card = norms + (total - norms) // 2
    assert re.search(rf"^cuda:0 \| 1/2 of 0-1 \(2\) \| {card / 2**30:.2f} GiB \| 1.00 GiB$", out, re.M)
    assert f"KV cache: {kv_per_token // 2 / 2**10:.2f} KiB per token per card" in out
    assert f"= {pool // (kv_per_token // 2):,} tokens" in out

    assert cli.main(["plan", model_dir, "--max-memory", "0=1GiB,1=1GiB", "--tensor-parallel", "3"]) == 2
    assert "heads (4) and the KV heads (2) to divide by 3" in capsys.readouterr().err
    assert cli.main(["plan", model_dir, "--max-memory", "0=1GiB", "--tensor-parallel", "2"]) == 2
    assert "needs 2 GPU budgets in max_memory" in capsys.readouterr().err


def test_gpu_run_tensor_parallel_skips_without_two_gpus(tmp_path):
    """The multi-GPU stage of benchmarks/gpu_run.sh stops at once, successfully, on a machine with < 2 GPUs."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    run = subprocess.run(["timeout", "120", "bash", "benchmarks/gpu_run.sh", "--tensor-parallel"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "=== tensor_parallel: skipped (0 GPU(s)" in run.stdout


def test_a_tensor_parallel_shard_job_joins_the_other_shards(model_dir, tmp_path, capsys):
    """Data parallel with tensor parallel: replica 0 is a tensor-parallel torchrun job judging --shard 0/2
    into its own store, replica 1 a plain --shard 1/2 job; the run given both stores judges nothing and
    scores every pair as one process does (within 1e-4)."""
    from test_cli import _args, _count, _small_run, _stored

    from rank1_hf import cli

    run = _small_run(tmp_path / "run.trec", queries=2, per_query=4)
    stores = [tmp_path / "shard0.sqlite", tmp_path / "shard1.sqlite"]
    job = cli_torchrun(*_args(model_dir, run, tmp_path / "unused.trec", "--batch-size", "4", "--tensor-parallel",
                              "--shard", "0/2", "--store", str(stores[0])))
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.startswith("rank1-hf rerank, shard 0/2")
    assert cli.main(_args(model_dir, run, tmp_path / "unused.trec", "--batch-size", "4", "--shard", "1/2",
                          "--store", str(stores[1]))) == 0
    judged = [_count(job.stdout, "judged now"), _count(capsys.readouterr().out, "judged now")]
    assert all(judged) and sum(judged) == 8 and [_stored(s) for s in stores] == judged
    merged = tmp_path / "merged.trec"
    assert cli.main(_args(model_dir, run, merged, "--batch-size", "4", "--store", str(tmp_path / "m.sqlite"),
                          *map(str, stores))) == 0
    assert _count(capsys.readouterr().out, "judged now") == 0
    single = tmp_path / "single.trec"
    assert cli.main(_args(model_dir, run, single, "--batch-size", "4", "--store", str(tmp_path / "s.sqlite"))) == 0
    got, want = scores(merged), scores(single)
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-4 for k in want)


def test_tensor_parallel_runs_the_continuous_engine_only(tiny, monkeypatch):
    """engine='generate' (or a model whose cache the continuous engine cannot page) is refused under tensor
    parallel: only the continuous engine's calls are kept in lockstep."""
    from types import SimpleNamespace

    from rank1_hf.judging import engine_kind

    model, _ = tiny
    monkeypatch.setattr(model, "_tp_size", 2, raising=False)  # as a model split over 2 processes
    assert engine_kind(model, "auto") == engine_kind(model, "continuous") == "continuous"
    with pytest.raises(Rank1Error, match="tensor parallel runs the continuous engine only"):
        engine_kind(model, "generate")
    flash = SimpleNamespace(_tp_size=2, config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(Rank1Error, match="tensor parallel runs the continuous engine only"):
        engine_kind(flash, "auto")  # no paged cache: a single process would take the generate engine
