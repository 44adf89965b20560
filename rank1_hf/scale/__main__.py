"""``python -m rank1_hf.scale rerank|serve ...``: ``rank1-hf rerank`` and ``rank1-hf serve`` on a Ray cluster.

Every flag of ``rank1-hf rerank`` / ``rank1-hf serve`` works the same, plus the Ray ones::

    python -m rank1_hf.scale rerank --model jhu-clsp/rank1-7b --run bm25.trec --queries q.jsonl \\
        --corpus c.jsonl --output rank1.trec --address auto --actors 8 --gpus-per-actor 1

``rerank`` runs the command's own code (inputs, store, run file, traces, summary, evaluation) with the
judging done by :class:`~rank1_hf.scale.ray_batch.RayRanker`'s actor pool, so its outputs are those of a
single-process run. A separate entry point rather than flags on ``rank1-hf``: the Ray options stay out of
the main command's help, and ``rank1-hf`` never imports Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from ..errors import Rank1Error

PROG = "python -m rank1_hf.scale"


def _actors(text: str) -> int | tuple[int, int]:
    """``N`` or ``MIN-MAX``."""
    try:
        low, _, high = text.partition("-")
        return (int(low), int(high)) if high else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def _add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster")
    g.add_argument("--address", help="the Ray cluster: 'auto' (the one running here), ray://HOST:10001, or none "
                                     "for ray.init's default (RAY_ADDRESS, else a new local cluster)")
    g.add_argument("--num-cpus", type=int, help="CPUs of a new local cluster (default: all)")


def build_parser() -> argparse.ArgumentParser:
    from ..cli import rerank, serve

    parser = argparse.ArgumentParser(prog=PROG, description="rank1-hf's rerank and serve on a Ray cluster")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = rerank.add_parser(sub)
    _add_cluster_arguments(p)
    g = p.add_argument_group("Ray Data actor pool")
    g.add_argument("--actors", type=_actors, default=1, metavar="N|MIN-MAX",
                   help="actors, each with its own model (default 1); MIN-MAX grows the pool with the work")
    g.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="default 1")
    g.add_argument("--rows-per-batch", type=int, help="pairs sent to an actor at a time (default: 2 x --batch-size)")
    g.add_argument("--concurrent-batches", type=int, default=2,
                   help="batches one actor judges at once, sharing its engine (default 2)")
    p.set_defaults(func=_rerank)

    p = serve.add_parser(sub)
    _add_cluster_arguments(p)
    g = p.add_argument_group("Ray Serve replicas")
    g.add_argument("--replicas", type=_actors, default=1, metavar="N|MIN-MAX",
                   help="replicas, each with its own model (default 1); MIN-MAX autoscales on ongoing requests")
    g.add_argument("--gpus-per-replica", type=float, help="default: 1 when the cluster has GPUs, else 0")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="default 1")
    g.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests one replica takes at once, sharing its engine (default 64)")
    p.set_defaults(func=_serve)
    return parser


def _rerank(args: argparse.Namespace) -> int:
    from ..cli import rerank
    from ..cli.common import resolve_model
    from .ray_batch import RayRanker

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise Rank1Error("on Ray the actors are the shards: run one process, not a launcher")
    made: list[RayRanker] = []

    def on_ray(model: str, load: Any, judge: Any, threads: int | None) -> RayRanker:
        init = {"num_cpus": args.num_cpus} if args.num_cpus else {}
        made.append(RayRanker(resolve_model(model), load, judge, threads=threads, address=args.address,
                              actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                              cpus_per_actor=args.cpus_per_actor, rows_per_batch=args.rows_per_batch,
                              concurrent_batches=args.concurrent_batches, init=init))
        _stop_on_sigterm()
        return made[-1]

    try:
        return rerank.run(args, ranker_factory=on_ray)
    finally:
        for ranker in made:
            ranker.close()


def _serve(args: argparse.Namespace) -> int:
    import time

    import ray
    from ray import serve

    from ..cli.common import (DEMO_NOTE, check_load_options, check_model, is_demo, judge_options, load_options,
                              positive, resolve_model)
    from ..cli.serve import serve_settings
    from .ray_serve import application, start

    # Every flag, and --model, is checked before Ray starts: a mistake is one line, not a cluster's traceback.
    settings = serve_settings(args)
    positive("max-ongoing-requests", args.max_ongoing_requests)
    judge = judge_options(args)
    if args.tensor_parallel:
        raise Rank1Error("Ray Serve replicas do not run tensor-parallel models; use --gpus-per-replica with "
                         "--device-map to split a model over a replica's cards")
    load = load_options(args)
    check_load_options(load)
    check_model(args.model, "--model", args.revision)
    if is_demo(args.model):
        print(f"note: {DEMO_NOTE}", file=sys.stderr)
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, **({"num_cpus": args.num_cpus} if args.num_cpus else {}))
    _stop_on_sigterm()
    try:
        start(application(resolve_model(args.model), load, judge, settings, replicas=args.replicas,
                          gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                          max_ongoing_requests=args.max_ongoing_requests, threads=args.threads,
                          store=str(Path(args.store).resolve()) if args.store else None),
              host=args.host, port=args.port)
        print(f"rank1 on Ray Serve: http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
        while True:  # Serve runs in the cluster; this process only holds it up until Ctrl-C / SIGTERM
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        _ignore_stop_signals()  # shutting down already: a second SIGTERM / Ctrl-C must not cut it short
        serve.shutdown()
        if started:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 ok, 2 a user error (one line on stderr), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Rank1Error as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job) ends like Ctrl-C: finished judgements committed, Serve shut
    down. Called once Ray is up: ``ray.init`` installs a handler of its own that would just exit."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _ignore_stop_signals() -> None:
    import signal

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
