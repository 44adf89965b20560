"""``rank1-hf report``: a reranked run as one self-contained HTML page (:mod:`rank1_hf.io.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import Rank1Error


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``report`` subcommand; returns its parser."""
    from ..io.evaluate import DEFAULT_MEASURES

    p = subparsers.add_parser("report", help="an HTML page for a reranked run: moves, scores, reasoning, qrels",
                              description="Write one self-contained HTML page (readable offline) for a reranked "
                                          "run: per query the documents after and before reranking, scores, "
                                          "outcomes, the reasoning folded under each, qrels grades and metrics.")
    p.add_argument("run", help="the reranked run rerank wrote (its traces, OUTPUT's name with .traces.jsonl, are "
                               "read) or the traces file itself")
    p.add_argument("--qrels", help="TREC or BEIR qrels: show grades and the metrics table")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES),
                   help=f"measures for the table (default {' '.join(DEFAULT_MEASURES)})")
    p.add_argument("--output", help="the page to write (default: RUN's name with .html)")
    p.add_argument("--title", help="page title (default: the run's file name)")
    p.set_defaults(func=run)
    return p


def traces_path(run: Path) -> Path:
    """The traces of ``run``: the file itself when it is traces, else the one rerank wrote beside it."""
    if run.name.endswith(".traces.jsonl"):
        return run
    return run.with_name(run.stem + ".traces.jsonl")


def run(args: argparse.Namespace) -> int:
    """The ``report`` subcommand."""
    from ..io import formats, report
    from .. import pipeline

    given = Path(args.run)
    traces = traces_path(given)
    if not traces.is_file():
        raise Rank1Error(f"{traces}: no traces beside the run {given} (rerank writes them as OUTPUT's name with "
                         ".traces.jsonl; give the traces file itself if it was written elsewhere)")
    stem = traces.name.removesuffix(".traces.jsonl")
    output = Path(args.output) if args.output else traces.with_name(stem + ".html")
    pipeline.check_writable(output)
    rows = report.read_traces(traces)
    qrels = formats.read_qrels(args.qrels) if args.qrels else None
    if qrels is not None:
        from ..io.evaluate import check_measures

        check_measures(args.measures)
    page = report.render(rows, title=args.title or f"rank1 reranking: {stem}", qrels=qrels, measures=args.measures)
    formats.write_text(output, page)
    print(f"report: {output} ({len(rows)} judged pairs)")
    return 0
