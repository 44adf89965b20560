"""``rank1-hf evaluate``: score runs against qrels."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``evaluate`` subcommand; returns its parser."""
    from ..evaluate import DEFAULT_MEASURES

    p = subparsers.add_parser("evaluate", help="score runs against qrels (the figures trec_eval gives on the same files)")
    p.add_argument("--run", required=True, nargs="+", help="TREC, JSON {qid: {docid: score}} or mteb predictions")
    p.add_argument("--qrels", required=True, help="TREC qrels or BEIR qrels TSV (query-id corpus-id score)")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES),
                   help=f"ir_measures names (default {' '.join(DEFAULT_MEASURES)})")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The ``evaluate`` subcommand: one table row per run."""
    from .. import formats
    from ..evaluate import evaluate, format_table

    qrels = formats.read_qrels(args.qrels)
    rows = {}
    for path in args.run:
        rows[path] = evaluate(formats.read_run(path), qrels, args.measures)
    print(format_table(rows))
    return 0
