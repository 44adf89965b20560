"""``rank1-hf rerank``: rerank the top-k of a first-stage run, resumably, on one process or many."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import Rank1Error
from .common import (DEMO_NOTE, PROG, ProgressBar, add_judge_arguments, add_load_arguments, check_arguments,
                     check_load_options, check_model, distinct_paths, is_demo, judge_options, load_options, make_ranker,
                     read_inputs)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``rerank`` subcommand; returns its parser."""
    from ..io.evaluate import DEFAULT_MEASURES

    p = subparsers.add_parser("rerank", help="rerank a first-stage TREC run", description=(
        "Rerank the top-k of a TREC run with a rank1 model. Judgements go to a SQLite store as they "
        "finish, so an interrupted run resumes where it stopped. Under accelerate launch / torchrun "
        "(RANK, WORLD_SIZE set; one node or several) each rank judges a shard into its own store file beside "
        "the --store path (a directory every rank sees, NFS included) and rank 0 writes the outputs once "
        "all are done. Without a launcher, --shard I/N jobs (e.g. a cluster's array jobs) each judge a "
        "shard, and a final run given all their stores writes the outputs. On CPU use accelerate launch "
        "--multi_gpu (or torchrun): accelerate's --cpu starts a single process."))
    p.add_argument("--model", required=True, help="hub id or local directory; 'demo' = the bundled SmolLM2 demo (not rank1)")
    p.add_argument("--run", help="first-stage run: TREC (qid Q0 docid rank score tag), JSON {qid: {docid: score}} "
                                 "(the rank1 run files) or an mteb predictions file")
    p.add_argument("--queries", help="queries: TSV (qid<TAB>text) or JSONL ({_id, text})")
    p.add_argument("--corpus", help="passages: TSV (docid<TAB>text) or BEIR JSONL ({_id, title, text})")
    p.add_argument("--instructions", help="per-query instructions, same formats as --queries")
    p.add_argument("--qrels", help="TREC qrels or BEIR qrels TSV: print an evaluation of the input top-k vs the reranked run")
    p.add_argument("--sample", action="store_true", help="use the bundled sample for run/queries/corpus/qrels/instructions")
    p.add_argument("--top-k", type=int, default=100, help="rerank the first k of each query (default 100)")
    p.add_argument("--output", help="reranked TREC run to write (required, except with --shard)")
    p.add_argument("--traces", help="JSONL traces (default: OUTPUT's name with .traces.jsonl)")
    p.add_argument("--store", action="extend", nargs="+", metavar="PATH",
                   help="judgement store(s): new judgements go to the first (default: rank1-judgements.sqlite "
                        "next to OUTPUT), judgements in any are reused; the others must exist and have been made "
                        "with this run's settings. May be given more than once. Under a launcher, rank r of N "
                        "writes FIRST's name with .rankR-of-N before the extension")
    p.add_argument("--shard", metavar="I/N",
                   help="judge only shard I (0-based) of N (pairs chosen by a hash of their store key) into the "
                        "first --store, and write no run file; then a run without --shard, given all the "
                        "shards' stores, writes the outputs")
    p.add_argument("--drop-rest", action="store_true",
                   help="write only the reranked top-k; by default the run's documents below the top-k follow them, "
                        "in first-stage order, so the output is as deep as the input and evaluates like with like")
    p.add_argument("--tag", default="rank1", help="run tag in the TREC file (default rank1)")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES), help="measures for --qrels")
    p.add_argument("--flush-every", type=int, help="judgements per store commit (default: the batch size); a SIGKILL loses fewer than this")
    p.add_argument("--flush-seconds", type=float, default=5.0, help="commit at least this often (default 5)")
    p.add_argument("--wait-timeout", type=float, help="launcher rank 0: seconds to wait for the other ranks (default forever)")
    p.add_argument("--no-progress", action="store_true", help="no progress at all")
    p.add_argument("--progress-every", type=float, metavar="SECONDS",
                   help="one progress line (pairs done, rate, time left) every SECONDS instead of a bar; the default "
                        "when stderr is not a terminal, every 30 s")
    p.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # kept for old scripts: the default now
    add_judge_arguments(p)
    add_load_arguments(p.add_argument_group("model loading"))
    p.set_defaults(func=run)
    return p



def run(args: argparse.Namespace, ranker_factory: Callable[..., Any] | None = None) -> int:
    """The ``rerank`` subcommand; ``ranker_factory`` (``make_ranker``, or one with its arguments) makes the ranker
    (:mod:`rank1_hf.scale` passes one that judges on a Ray actor pool)."""
    from .. import pipeline
    from ..io.formats import check_tag

    check_arguments(args, "rerank", models=(args.model,),
                    positives=("top_k", "batch_size", "flush_every", "flush_seconds", "max_new_tokens",
                               "context_size", "wait_timeout", "progress_every"))
    demo = is_demo(args.model)
    tag = "demo-smollm2" if demo else args.tag
    check_tag(tag)  # used only when the run is written, hours from now: checked first
    load = load_options(args)
    check_load_options(load)

    # Under tensor parallel torchrun's processes split one model, not the pairs: rank 0 judges them all.
    shard = pipeline.Shard() if load.tensor_parallel else pipeline.Shard.from_env()
    job_shard = pipeline.Shard.parse(args.shard) if args.shard is not None else None
    if job_shard is not None and shard.world_size > 1:
        raise Rank1Error("--shard is for separate jobs; under a launcher (WORLD_SIZE > 1) the ranks are the shards")
    if job_shard is not None and not args.store:
        raise Rank1Error("--shard needs --store: the shard job's own judgement store")
    if job_shard is None and args.output is None:
        raise Rank1Error("rerank needs --output (only a --shard job writes no run file)")
    writes_outputs = job_shard is None and shard.is_main
    output = Path(args.output) if args.output else None
    traces = None
    if output is not None:
        traces = Path(args.traces) if args.traces else output.with_name(output.stem + ".traces.jsonl")
    if writes_outputs:
        pipeline.check_writable(output)
        pipeline.check_writable(traces)
    store_paths = distinct_paths([Path(s) for s in args.store] if args.store else
                                  [output.with_name("rank1-judgements.sqlite")])
    own = pipeline.rank_store_path(store_paths[0], shard) if shard.world_size > 1 else store_paths[0]
    named = [("--store", own), *(("--store", p) for p in store_paths[1:])]
    if writes_outputs:
        named = [("--output", output), ("--traces", traces), *named]
    _check_distinct(named)

    items, qrels, no_documents = read_inputs(args, with_qrels=writes_outputs)

    from contextlib import ExitStack

    from ..io.store import JudgementStore

    with ExitStack() as stack:
        # The stores after the first are only read: they must exist and, once the model is loaded, hold
        # judgements made with this run's settings.
        sources = [stack.enter_context(JudgementStore(p, readonly=True)) for p in store_paths[1:]]
        _check_store(own)  # this process's store, before the model loads (it is created only once judging starts)
        check_model(args.model, "--model", args.revision)  # the last check: it may ask the network
        device_map = None
        if shard.world_size > 1:
            import torch

            # Data parallel: one whole model per process, on "its" GPU when there are GPUs.
            if torch.cuda.is_available():
                device_map = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
        if load.device_map is None:
            load = dataclasses.replace(load, device_map=device_map)
        ranker = (ranker_factory or make_ranker)(args.model, load, judge_options(args), args.threads)
        for source in sources:
            source.check_settings(ranker.settings())
        if shard.world_size == 1:  # under a launcher judge_across_ranks opens the rank's own store
            # A rollback journal (not WAL): the store may be on a network filesystem.
            store = stack.enter_context(JudgementStore(own, journal="delete"))
        bar = ProgressBar(enabled=not args.no_progress, shard=job_shard or shard,
                          terminal=False if args.progress_every else None, every_s=args.progress_every or 30.0)
        judging = dict(flush_every=args.flush_every, flush_seconds=args.flush_seconds,
                       progress=bar.update, on_start=bar.start)
        try:
            if shard.world_size > 1:
                result = pipeline.judge_across_ranks(ranker, items, store_paths[0], shard, sources=sources,
                                                     wait_timeout_s=args.wait_timeout, **judging)
            else:
                result = pipeline.judge_items(ranker, items, store, sources=sources,
                                              shard=job_shard or shard, **judging)
        except KeyboardInterrupt:
            bar.close()
            print(f"{PROG}: interrupted: the finished judgements are in the store {own}; rerun the same command "
                  "to resume", file=sys.stderr)
            return 130
        finally:
            bar.close()

    summary = result.summary
    summary.no_documents = no_documents
    if job_shard is not None:
        print(f"rank1-hf rerank, shard {job_shard.rank}/{job_shard.world_size}")
        print(f"model: {args.model}")
        for line in summary.lines():
            print(line)
        print(f"store: {own}")
        print("no run file written by a shard job: rerun without --shard, with --store given every shard's store")
        return 0
    if not shard.is_main:
        print(f"{PROG}: rank {shard.rank}/{shard.world_size}: judged {summary.judged_here} pairs into {own}; "
              "rank 0 writes the outputs", file=sys.stderr)
        return 0
    rest = None if args.drop_rest else pipeline.first_stage_rest(args.run, args.top_k)
    reranked = pipeline.write_outputs(items, result.judgements, output, traces, tag, rest)
    print("rank1-hf rerank" + (" (DEMO model, not rank1)" if demo else ""))
    print(f"model: {args.model}" + (f" ({DEMO_NOTE})" if demo else ""))
    if shard.world_size > 1:
        print(f"processes: {shard.world_size}")
    for line in summary.lines():
        print(line)
    if demo and not summary.outcomes.get("answered"):
        print("note: the demo model is not rank1: it seldom closes </think>; its scores show the pipeline only")
    print(f"run: {output}" + ("" if args.drop_rest else
                                  f" (the reranked top {args.top_k}, then the rest of the input in its order)"))
    print(f"traces: {traces}")
    print("store: " + (f"{own} and the other ranks' beside it" if shard.world_size > 1 else str(own))
          + (f", reused from {', '.join(map(str, store_paths[1:]))}" if store_paths[1:] else ""))
    if qrels is not None:
        from ..io.evaluate import evaluate, format_table

        # Both runs hold exactly the job's queries: score them over those (a query the job left out
        # would count as zero in both and only dilute the difference).
        judged = {qid: docs for qid, docs in qrels.items() if qid in reranked}
        if not judged:
            print("evaluation: none of the run's queries is in the qrels")
            return 0
        table = format_table({
            ("input" if rest else f"input (top {args.top_k})"):
                evaluate(pipeline.first_stage_run(items, rest), judged, args.measures),
            ("reranked top-k, then the rest" if rest else "reranked"): evaluate(reranked, judged, args.measures),
        })
        print()
        print(f"evaluation over the {len(judged)} queries with qrels:")
        print(table)
    return 0


def _check_distinct(paths: list[tuple[str, Path]]) -> None:
    """The output, the traces and the stores must be different files (one would overwrite another)."""
    seen: dict[Path, str] = {}
    for flag, path in paths:
        key = path.resolve()
        if key in seen:
            raise Rank1Error(f"{flag} {path} is the same file as {seen[key]}")
        seen[key] = f"{flag} {path}"


def _check_store(path: Path) -> None:
    """The store judgements will go to, checked without creating or changing it: an existing file must be
    a judgement store; a new one must be creatable (its nearest existing folder writable)."""
    import os

    from ..io.store import JudgementStore

    if path.is_dir():
        raise Rank1Error(f"--store {path}: is a directory")
    if path.exists():
        if path.stat().st_size > 0:  # an empty file becomes a store when opened for writing
            JudgementStore(path, readonly=True).close()
        if not os.access(path, os.W_OK):
            raise Rank1Error(f"--store {path}: not writable")
        return
    folder = path.parent if str(path.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise Rank1Error(f"--store {path}: cannot create it: {folder} is not a writable directory")
