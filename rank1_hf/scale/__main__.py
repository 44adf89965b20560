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
    from ..cli import rerank

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
        return made[-1]

    try:
        return rerank.run(args, ranker_factory=on_ray)
    finally:
        for ranker in made:
            ranker.close()


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


if __name__ == "__main__":
    sys.exit(main())
