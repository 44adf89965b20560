"""``rank1-hf plan``: how a model would be split over devices, and the rows its KV pool holds, without loading it."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import Rank1Error
from ..options import QUANTIZATIONS, JudgeOptions
from .common import positive, resolve_model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``plan`` subcommand; returns its parser."""
    p = subparsers.add_parser("plan", help="show how a model would be split over devices, and how many pairs its "
                                           "KV pool holds, without loading it")
    p.add_argument("model", help="hub id or local directory (only its config.json is read); 'demo' = the bundled "
                                 "SmolLM2 demo")
    p.add_argument("--max-memory", required=True, help="e.g. 0=40GiB,1=40GiB (GPUs need not exist here)")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: the checkpoint's dtype when the budget names a GPU, float32 on a CPU-only "
                        "budget, as loading does), float16, bfloat16 or float32")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="plan for quantization on load (AWQ is read from "
                                                                 "the checkpoint)")
    p.add_argument("--device-map", default="auto", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="how accelerate splits the layers (default auto)")
    p.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="plan tensor parallel over the first N GPUs of --max-memory instead of a device map: memory "
                        "and KV rows per card")
    p.add_argument("--prompt-tokens", type=int, default=500, help="tokens of one pair's prompt (default 500)")
    p.add_argument("--reasoning-tokens", action="append", metavar="N[,N...]",
                   help="reasoning lengths to count rows at, repeatable or a comma list (default 1000)")
    p.add_argument("--max-new-tokens", type=int, default=JudgeOptions.max_new_tokens,
                   help=f"the reasoning cap, for the reserve-at-max comparison (default {JudgeOptions.max_new_tokens})")
    p.add_argument("--kv-memory", metavar="SIZE",
                   help="the KV pool, e.g. 12GiB (default: what the GPUs have left, as when judging)")
    p.set_defaults(func=run)
    return p


def reasoning_lengths(values: list[str] | None) -> list[int]:
    """``--reasoning-tokens 500,1000 --reasoning-tokens 8192`` -> [500, 1000, 8192]; default [1000]."""
    lengths: list[int] = []
    for value in values or ["1000"]:
        for part in value.split(","):
            try:
                lengths.append(int(part))
            except ValueError:
                raise Rank1Error(f"--reasoning-tokens takes whole numbers such as 500,1000,8192, "
                                 f"got {value!r}") from None
    return lengths


def run(args: argparse.Namespace) -> int:
    """The ``plan`` subcommand."""
    from ..options import LoadOptions, parse_bytes
    from .common import check_model
    from .preflight import check_load_flags

    lengths = reasoning_lengths(args.reasoning_tokens)
    check_load_flags(LoadOptions(dtype=args.dtype, max_memory=args.max_memory))
    if args.kv_memory is not None:
        parse_bytes(args.kv_memory, "--kv-memory")
    check_model(args.model)

    from ..model.planning import format_kv_plan, format_plan, kv_plan, plan_device_map, plan_tensor_parallel

    if args.tensor_parallel is not None:
        positive("tensor-parallel", args.tensor_parallel)
        if args.quantization:
            raise Rank1Error("--tensor-parallel loads no quantized model: drop --quantization")
        plan = plan_tensor_parallel(resolve_model(args.model), cards=args.tensor_parallel, max_memory=args.max_memory,
                                    dtype=args.dtype)
    else:
        plan = plan_device_map(resolve_model(args.model), max_memory=args.max_memory, dtype=args.dtype,
                               quantization=args.quantization, device_map=args.device_map)
    kv = kv_plan(plan, lengths, prompt_tokens=args.prompt_tokens, kv_memory=args.kv_memory,
                 max_new_tokens=args.max_new_tokens)
    print(format_plan(plan))
    print()
    print(format_kv_plan(kv))
    return 0
