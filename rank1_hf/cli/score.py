"""``rank1-hf score``: judge one (query, passage) pair and print the reasoning."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import Rank1Error
from .common import (DEMO_NOTE, add_judge_arguments, add_load_arguments, check_load_options, check_model, is_demo, judge_options,
                     load_options, make_ranker, positive)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``score`` subcommand; returns its parser."""
    p = subparsers.add_parser("score", help="judge one (query, passage) pair and print the reasoning")
    p.add_argument("--model", required=True,
                   help="hub id or local directory; 'demo' = the bundled SmolLM2 demo (not rank1)")
    p.add_argument("--query", required=True, help="the query text")
    p.add_argument("--passage", required=True, help="the passage text to judge")
    p.add_argument("--instruction", help="appended to the query with one space, as rank1 does")
    add_judge_arguments(p)
    add_load_arguments(p.add_argument_group("model loading"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The ``score`` subcommand."""
    for text, name in ((args.query, "--query"), (args.passage, "--passage")):
        if not text.strip():
            raise Rank1Error(f"{name} is empty")
    for name in ("max_new_tokens", "context_size", "batch_size", "threads"):
        positive(name.replace("_", "-"), getattr(args, name))
    judge_options(args)  # the judging flags (and a dataset prompt's name) before the model loads
    if is_demo(args.model):
        print(f"note: {DEMO_NOTE}", file=sys.stderr)
    load = load_options(args)
    check_load_options(load)
    check_model(args.model, "--model", args.revision)
    ranker = make_ranker(args.model, load, judge_options(args), args.threads, show_progress_bar=False)
    started = time.monotonic()
    (j,) = ranker.judge([(args.query, args.passage, args.instruction)], show_progress_bar=False)
    print("reasoning:")
    print(j.reasoning)
    print()
    print(f"outcome: {j.outcome}")
    print(f"score: {j.score:.6f}")
    print(f"reasoning tokens: {j.reasoning_tokens}, prompt tokens: {j.prompt_tokens}, "
          f"{time.monotonic() - started:.1f} s")
    if j.truncated:
        print("note: the passage was cut to fit --context-size")
    return 0
