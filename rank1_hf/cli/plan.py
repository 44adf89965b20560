"""``rank1-hf plan``: how a model would be split over devices, without loading it."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import QUANTIZATIONS
from .common import resolve_model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``plan`` subcommand; returns its parser."""
    p = subparsers.add_parser("plan", help="show how a model would be split over devices, without loading it")
    p.add_argument("model")
    p.add_argument("--max-memory", required=True, help="e.g. 0=40GiB,1=40GiB (GPUs need not exist here)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", choices=QUANTIZATIONS)
    p.add_argument("--device-map", default="auto", choices=("auto", "balanced", "balanced_low_0", "sequential"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The ``plan`` subcommand."""
    from ..planning import format_plan, plan_device_map

    plan = plan_device_map(resolve_model(args.model), max_memory=args.max_memory, dtype=args.dtype,
                           quantization=args.quantization, device_map=args.device_map)
    print(format_plan(plan))
    return 0
