"""Runs spread over several jobs or nodes: --shard jobs with their own stores and a merge run, kill -9 of a
shard job, torchrun over two "nodes", and stores made with other settings refused.

Every comparison is against a single-process run with --batch-size 1 (batched decoding rounds differently,
about 1e-6 on a score, depending on which pairs share a batch), on the tiny random model of test_cli.
"""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank1_hf import cli
from test_cli import ROOT, _args, _count, _env, _small_run, _stored, _stored_safe


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rank1_hf", *args], env=_env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _single(capsys, model_dir: str, run: Path, out: Path, *extra: str) -> str:
    """The reference: one process, one store, outputs written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    assert cli.main(_args(model_dir, run, out, "--batch-size", "1", *extra)) == 0
    capsys.readouterr()
    return out.read_text()


def _journal(store: Path) -> str:
    with sqlite3.connect(store) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.fixture(scope="module")
def sharded(model_dir, tmp_path_factory):
    """12 pairs judged by two --shard jobs started together as two processes, each into its own store."""
    d = tmp_path_factory.mktemp("sharded")
    run = _small_run(d / "run.trec", queries=3, per_query=4)
    stores = [d / "shard0.sqlite", d / "shard1.sqlite"]
    jobs = [_popen(*_args(model_dir, run, d / "unused.trec", "--batch-size", "1", "--shard", f"{i}/2",
                          "--store", str(stores[i]))) for i in range(2)]
    outs = [_finish(job) for job in jobs]
    return d, run, stores, outs


def test_two_shard_jobs_then_the_merge_judges_nothing_and_matches_one_process(model_dir, sharded, capsys):
    d, run, stores, outs = sharded
    judged = [_count(out, "judged now") for out in outs]
    assert all(out.startswith(f"rank1-hf rerank, shard {i}/2") for i, out in enumerate(outs))
    assert sum(judged) == 12 and all(judged)  # each job judged its own share, together every pair
    assert [_stored(s) for s in stores] == judged
    assert all(_journal(s) == "delete" for s in stores)  # a rollback journal: safe on NFS
    assert not (d / "unused.trec").exists()  # a shard job writes no run file

    merged = d / "merged" / "r.trec"
    merged.parent.mkdir()
    assert cli.main(_args(model_dir, run, merged, "--batch-size", "1", "--store", str(d / "merged.sqlite"),
                          *map(str, stores))) == 0
    stdout = capsys.readouterr().out
    assert _count(stdout, "judged now") == 0 and _count(stdout, "reused from store") == 12
    assert _stored(d / "merged.sqlite") == 0  # nothing new, so nothing written to the first store
    single = _single(capsys, model_dir, run, d / "single" / "r.trec")
    assert merged.read_text() == single
    assert (merged.parent / "r.traces.jsonl").read_text() == (d / "single" / "r.traces.jsonl").read_text()

    # Another number of shards reuses everything: shard 2 of 3, given the two stores, judges nothing.
    assert cli.main(_args(model_dir, run, merged, "--batch-size", "1", "--shard", "2/3", "--store",
                          str(d / "three2.sqlite"), *map(str, stores))) == 0
    stdout = capsys.readouterr().out
    assert _count(stdout, "judged now") == 0 and _count(stdout, "reused from store") > 0


def test_stores_with_other_settings_are_refused_naming_the_setting(model_dir, sharded, capsys):
    d, run, stores, _ = sharded
    out = d / "other" / "r.trec"
    out.parent.mkdir()
    args = _args(model_dir, run, out, "--batch-size", "1", "--store", str(d / "other.sqlite"), *map(str, stores))
    args[args.index("--max-new-tokens") + 1] = "9"  # the shards were judged with 8
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^rank1-hf: error: judgement store \S*shard0\.sqlite was made with other settings than "
                     r"this run: max_new_tokens: 8 in the store, 9 in this run$", err, re.M), err
    assert not out.exists() and not (d / "other.sqlite").exists()  # refused before judging anything

    assert cli.main([*args, "--store", str(d / "no-such.sqlite")]) == 2
    assert "judgement store " in capsys.readouterr().err  # a missing store to read is an error too


def test_kill_9_of_a_shard_job_then_rerun_gives_the_same_output(model_dir, tmp_path, capsys):
    run = _small_run(tmp_path / "run.trec", queries=8, per_query=3)  # 24 pairs
    slow = ("--batch-size", "1", "--max-new-tokens", "48")  # long enough to be caught in the middle
    stores = [tmp_path / "shard0.sqlite", tmp_path / "shard1.sqlite"]
    shard = [_args(model_dir, run, tmp_path / "x.trec", *slow, "--flush-every", "1", "--shard", f"{i}/2",
                   "--store", str(stores[i])) for i in range(2)]
    victim = _popen(*shard[0])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and victim.poll() is None:
            if stores[0].exists() and _stored_safe(stores[0]) >= 2:
                break
            time.sleep(0.02)
        assert victim.poll() is None, "the shard job ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.communicate()
    done_before = _stored(stores[0])
    assert cli.main(shard[1]) == 0
    capsys.readouterr()

    assert cli.main(shard[0]) == 0  # the rerun resumes the killed shard
    stdout = capsys.readouterr().out
    assert _count(stdout, "reused from store") == done_before and _count(stdout, "judged now") > 0

    merged = tmp_path / "merged" / "r.trec"
    merged.parent.mkdir()
    assert cli.main(_args(model_dir, run, merged, *slow, "--store", str(tmp_path / "m.sqlite"),
                          *map(str, stores))) == 0
    assert _count(capsys.readouterr().out, "judged now") == 0
    assert merged.read_text() == _single(capsys, model_dir, run, tmp_path / "single" / "r.trec", *slow[2:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_on_two_nodes_matches_one_process(model_dir, tmp_path, capsys):
    """Two torchrun agents, --nnodes 2 --node_rank 0/1, meeting over a localhost rendezvous: each node's
    rank writes its own store file in the shared folder, and rank 0 writes the outputs from all."""
    run = _small_run(tmp_path / "run.trec", queries=3, per_query=4)
    single = _single(capsys, model_dir, run, tmp_path / "single" / "r.trec")
    out, shared = tmp_path / "two" / "r.trec", tmp_path / "two" / "stores" / "j.sqlite"
    out.parent.mkdir()
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         # "--": torchrun's own parser would otherwise read --run as an ambiguous abbreviation of --run-path.
         "-m", "rank1_hf", "--", *_args(model_dir, run, out, "--batch-size", "1", "--store", str(shared))],
        env=_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    node0, node1 = [_finish(node, timeout=240) for node in nodes]
    assert "processes: 2" in node0 and _count(node0, "judged now") == 12 and node1 == ""
    assert out.read_text() == single
    assert (out.parent / "r.traces.jsonl").read_text() == (tmp_path / "single" / "r.traces.jsonl").read_text()
    rank_files = sorted(p.name for p in shared.parent.glob("*.sqlite"))
    assert rank_files == ["j.rank0-of-2.sqlite", "j.rank1-of-2.sqlite"]
    counts = [_stored(shared.parent / name) for name in rank_files]
    assert sum(counts) == 12 and all(counts)  # both nodes judged, each into its own file
    assert all(_journal(shared.parent / name) == "delete" for name in rank_files)

    # A plain run given the rank files reuses all of them.
    again = tmp_path / "again.trec"
    assert cli.main(_args(model_dir, run, again, "--batch-size", "1", "--store", str(tmp_path / "m.sqlite"),
                          *map(str, sorted(shared.parent.glob("*.sqlite"))))) == 0
    assert _count(capsys.readouterr().out, "judged now") == 0
    assert again.read_text() == single
