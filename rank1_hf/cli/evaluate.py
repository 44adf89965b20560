"""``rank1-hf evaluate``: score runs against qrels."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``evaluate`` subcommand; returns its parser."""
    from ..io.evaluate import DEFAULT_MEASURES

    p = subparsers.add_parser("evaluate", help="score runs against qrels (the figures trec_eval gives on the same files)")
    p.add_argument("--run", required=True, nargs="+", help="TREC, JSON {qid: {docid: score}} or mteb predictions")
    p.add_argument("--qrels", required=True, help="TREC qrels or BEIR qrels TSV (query-id corpus-id score)")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES),
                   help=f"ir_measures names (default {' '.join(DEFAULT_MEASURES)})")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The ``evaluate`` subcommand: one table row per run."""
    from ..io import formats
    from ..io.evaluate import evaluate, format_table

    qrels = formats.read_qrels(args.qrels)
    runs = {path: formats.read_run(path) for path in args.run}
    depths = {path: max((len(docs) for docs in run.values()), default=0) for path, run in runs.items()}
    if len(set(depths.values())) > 1:
        # R@100 of a top-10 run against R@100 of a top-100 one makes reranking look harmful.
        print("warning: the runs have different depths (" + ", ".join(f"{p}: {d} per query" for p, d in depths.items())
              + "); measures deeper than the shallowest favour the deeper runs (a reranked run written with "
              "--drop-rest holds only the top-k)", file=sys.stderr)
    rows = {path: evaluate(run, qrels, args.measures) for path, run in runs.items()}
    print(format_table(rows))
    return 0
