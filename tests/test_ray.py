"""rank1 on a local Ray cluster (loopback, 2 CPUs): Ray Data batch jobs and Ray Serve, with faults.

One cluster for the module (starting Ray takes tens of seconds on a busy machine), stopped at the end by
``ray.shutdown()`` and, for anything left, by process id. Skipped only when Ray cannot start here.
Runs compared for identical output use --batch-size 1 (one pair per decode step): batched decoding
rounds differently (about 1e-6 on a score) depending on which pairs share a step.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
psutil = pytest.importorskip("psutil")

from rank1_hf import cli, pipeline  # noqa: E402
from rank1_hf.io.formats import read_run, sample_paths  # noqa: E402
from rank1_hf.io.store import JudgementStore  # noqa: E402
from rank1_hf.options import JudgeOptions  # noqa: E402
from test_cli import _small_run  # noqa: E402  (the sample's first queries)

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = sample_paths()
JUDGE = ["--max-new-tokens", "8", "--context-size", "512", "--batch-size", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: loopback only, 2 CPUs, a small object store, no dashboard."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                 _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    except Exception as error:  # noqa: BLE001 - any failure to start means: no Ray on this machine
        pytest.skip(f"Ray cannot start a local cluster on this machine: {error}")
    yield
    started = psutil.Process().children(recursive=True)
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=20)
    for proc in alive:  # what shutdown left behind, by process id
        proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _workers(kind: str) -> list[psutil.Process]:
    """This cluster's worker processes whose title names ``kind`` (Ray titles them ``ray::<class>...``)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if kind in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def _same_runs(a: Path, b: Path) -> None:
    """The same ranking line for line, scores within 1e-4."""
    run_a, run_b = read_run(a), read_run(b)
    assert [(q, [d for d, _ in docs]) for q, docs in sorted(run_a.items())] == \
        [(q, [d for d, _ in docs]) for q, docs in sorted(run_b.items())]
    for qid, docs in run_a.items():
        assert [s for _, s in docs] == pytest.approx([s for _, s in run_b[qid]], abs=1e-4)


def _same_traces(a: Path, b: Path) -> None:
    rows_a, rows_b = ([json.loads(line) for line in p.read_text().splitlines()] for p in (a, b))
    assert [(r["qid"], r["docid"], r["reasoning"], r["outcome"]) for r in rows_a] == \
        [(r["qid"], r["docid"], r["reasoning"], r["outcome"]) for r in rows_b]
    assert [r["score"] for r in rows_a] == pytest.approx([r["score"] for r in rows_b], abs=1e-4)


def test_ray_data_rerank_matches_a_single_process_run(cluster, model_dir, tmp_path, capsys):
    from rank1_hf.scale.__main__ import main as scale_main

    run = _small_run(tmp_path / "run.trec", queries=3, per_query=4)  # 12 pairs, with the sample's instructions
    common = ["--model", model_dir, "--sample", "--run", str(run), "--top-k", "4", *JUDGE, "--no-progress"]
    assert cli.main(["rerank", *common, "--output", str(tmp_path / "one.trec")]) == 0
    ray_args = ["rerank", *common, "--output", str(tmp_path / "ray.trec"), "--actors", "2",
                "--rows-per-batch", "2", "--store", str(tmp_path / "ray.sqlite")]
    assert scale_main(ray_args) == 0
    out = capsys.readouterr().out
    assert "judged now: 12" in out
    _same_runs(tmp_path / "one.trec", tmp_path / "ray.trec")
    _same_traces(tmp_path / "one.traces.jsonl", tmp_path / "ray.traces.jsonl")
    with JudgementStore(tmp_path / "ray.sqlite", readonly=True) as store:
        assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 12
    # Rerun: every pair is in the store, none goes to the pool.
    assert scale_main(ray_args) == 0
    assert "reused from store: 12" in capsys.readouterr().out


def test_killed_actor_is_replaced_and_the_run_is_complete(cluster, model_dir, tmp_path):
    from rank1_hf.ranker import Rank1
    from rank1_hf.scale.ray_batch import RayRanker

    items = pipeline.load_items(_small_run(tmp_path / "run.trec", 3, 4), SAMPLE["queries"], SAMPLE["corpus"],
                                SAMPLE["instructions"])
    options = JudgeOptions(max_new_tokens=8, context_size=512, batch_size=1)
    with Rank1(model_dir, judge=options) as local, JudgementStore(tmp_path / "one.sqlite") as store:
        single = pipeline.judge_items(local, items, store, shard=pipeline.Shard())
    pipeline.write_outputs(items, single.judgements, tmp_path / "one.trec", tmp_path / "one.jsonl")

    # The store already holds the first three pairs: they must not be judged again.
    seeded = {(it.qid, it.docid) for it in items[:3]}
    with JudgementStore(tmp_path / "ray.sqlite") as store:
        with Rank1(model_dir, judge=options) as local:
            pipeline.judge_items(local, items[:3], store, shard=pipeline.Shard())
    killed: list[int] = []

    def kill_one_actor(n: int) -> None:
        if killed:
            return
        actors = _workers("JudgeBatch")
        assert len(actors) == 2, [p.cmdline() for p in actors]
        killed.append(actors[0].pid)
        os.kill(actors[0].pid, signal.SIGKILL)  # mid-job: batches are still in both actors

    with RayRanker(model_dir, judge=options, threads=1, actors=2, rows_per_batch=1) as ranker, \
            JudgementStore(tmp_path / "ray.sqlite") as store:
        result = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard(), progress=kill_one_actor)
    assert killed
    assert (result.summary.reused, result.summary.judged_now) == (3, len(items) - 3)
    assert ranker.pairs_sent == len(items) - 3
    assert seeded <= result.judgements.keys() and len(result.judgements) == len(items)
    pipeline.write_outputs(items, result.judgements, tmp_path / "ray.trec", tmp_path / "ray.jsonl")
    _same_runs(tmp_path / "one.trec", tmp_path / "ray.trec")
    _same_traces(tmp_path / "one.jsonl", tmp_path / "ray.jsonl")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_answers_cohere_and_keeps_answering_while_a_replica_is_replaced(cluster, model_dir):
    import cohere
    import httpx
    from ray import serve

    from rank1_hf.ranker import Rank1
    from rank1_hf.scale import ray_serve
    from rank1_hf.scale.ray_serve import ServeSettings  # the server's own (one import to move with it)

    options = JudgeOptions(max_new_tokens=8, context_size=512, batch_size=4)
    query = "how do cats purr"
    documents = ["Cats purr by vibrating their larynx.", "A deck oven bakes bread.", "Dogs bark.",
                 "Purring is a sound cats make."]
    with Rank1(model_dir, judge=options) as local:
        expected = [j.score for j in local.judge([(query, d) for d in documents])]
    port = _free_port()
    app = ray_serve.application(model_dir, judge=options, settings=ServeSettings(api_key="key", model_name="tiny"),
                                replicas=2, cpus_per_replica=0.5, threads=1)
    ray_serve.start(app, host="127.0.0.1", port=port)
    base = f"http://127.0.0.1:{port}"
    client = cohere.ClientV2(api_key="key", base_url=base, timeout=60)

    def answers() -> None:
        results = client.rerank(model="tiny", query=query, documents=documents).results
        assert [r.index for r in results] == sorted(range(4), key=lambda i: -expected[i])
        assert [r.relevance_score for r in results] == pytest.approx(sorted(expected, reverse=True), abs=1e-4)

    try:
        answers()
        assert httpx.post(f"{base}/v2/rerank", json={"model": "tiny", "query": query, "documents": documents},
                          timeout=30).status_code == 401  # the server's API key, through Serve
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer key"}, timeout=30).text
        assert "rank1_requests_total" in metrics
        replicas = _workers("ServeReplica")
        assert len(replicas) == 2, [p.cmdline() for p in replicas]
        os.kill(replicas[0].pid, signal.SIGKILL)
        deadline, replaced = time.monotonic() + 180, False
        while time.monotonic() < deadline and not replaced:
            answers()  # every request is answered, by the live replica meanwhile
            alive = {p.pid for p in _workers("ServeReplica")} - {replicas[0].pid}
            status = serve.status().applications[ray_serve.APP_NAME].deployments[ray_serve.APP_NAME]
            replaced = len(alive) == 2 and status.replica_states.get("RUNNING", 0) == 2
            time.sleep(1)
        assert replaced, "Serve did not replace the killed replica within 180 s"
        answers()
    finally:
        serve.shutdown()


def test_bad_ray_flags_are_one_line_errors_before_ray_starts(tmp_path, capsys, monkeypatch):
    from rank1_hf.scale.__main__ import main as scale_main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # a model folder the pre-flight accepts
    args = ["rerank", "--model", str(tmp_path / "m"), "--sample", "--output", str(tmp_path / "out.trec")]
    assert scale_main([*args, "--actors", "3-2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m rank1_hf.scale: error: actors must be N >= 1 or (min, max) with 1 <= min <= max, got (3, 2)"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert scale_main(args) == 2
    assert "on Ray the actors are the shards" in capsys.readouterr().err
    assert not (tmp_path / "out.trec").exists()


def test_ray_serve_checks_model_and_loading_flags_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from rank1_hf.scale.__main__ import main as scale_main

    def touched(*args, **kwargs):  # another test's cluster may be up in this process: fail on any use
        raise AssertionError("Ray was used before the flags were checked")

    monkeypatch.setattr(ray, "is_initialized", touched)
    monkeypatch.setattr(ray, "init", touched)

    assert scale_main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m rank1_hf.scale: error: --model {tmp_path / 'missing'}: no such folder"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert scale_main(["serve", "--model", str(tmp_path / "m"), "--dtype", "float64"]) == 2
    assert "--dtype: unknown dtype 'float64'" in capsys.readouterr().err


def test_judge_batch_on_a_numpy_batch_gives_the_rankers_judgements_and_keeps_other_columns(model_dir):
    import numpy as np

    from rank1_hf.ranker import Rank1
    from rank1_hf.scale.ray_batch import JUDGEMENT_COLUMNS, JudgeBatch

    options = JudgeOptions(max_new_tokens=8, context_size=512, batch_size=1)
    pairs = [("how do cats purr", "Cats purr with their larynx.", None),
             ("bread", "A deck oven bakes bread.", "Relevant documents must mention a date.")]
    batch = {"id": np.array([7, 9]), "query": np.array([p[0] for p in pairs]),
             "passage": np.array([p[1] for p in pairs]), "instruction": np.array([p[2] for p in pairs], dtype=object)}
    out = JudgeBatch(model_dir, judge=options, threads=1)(batch).to_pylist()
    with Rank1(model_dir, judge=options) as local:
        expected = local.judge(pairs)
    assert [row["id"] for row in out] == [7, 9]
    floats = ("score", "true_logit", "false_logit")
    for row, judgement in zip(out, expected):
        assert {name: row[name] for name in JUDGEMENT_COLUMNS if name not in floats} == \
            {name: getattr(judgement, name) for name in JUDGEMENT_COLUMNS if name not in floats}
        assert [row[name] for name in floats] == pytest.approx([getattr(judgement, name) for name in floats], abs=1e-4)
