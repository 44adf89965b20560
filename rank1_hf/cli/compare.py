"""``rank1-hf compare``: judge the same pairs with two variants A and B and write the report
(:mod:`rank1_hf.comparison` holds the statistics, the judging and the report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import pipeline
from ..comparison import (FIGURE_FILES, PERMUTATIONS, SEED, TEST_MEASURE, VariantRun, build_report, judge_variant,
                       release_memory, summary_lines, write_report)
from ..errors import Rank1Error
from ..options import LoadOptions
from .common import (PROG, ProgressBar, add_judge_arguments, add_load_arguments, check_arguments,
                     check_load_options, check_model, judge_options, load_options, make_ranker, read_inputs)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``compare`` subcommand on the CLI's subparsers; returns its parser."""
    from ..io.evaluate import DEFAULT_MEASURES

    p = subparsers.add_parser(
        "compare", help="compare two variants of a rank1 model (e.g. quantized vs not) on the same pairs",
        description=(
            "Judge the top-k of a run with two model variants A and B (the same checkpoint with another "
            "dtype or quantization, or two checkpoints) and report how far B's judgements, rankings and "
            "quality move from A's, and what each costs. Both variants use the same judgement store "
            "under their own settings, so earlier rerank results are reused and an interrupted "
            "comparison resumes."))
    for name in ("A", "B"):
        low = name.lower()
        g = p.add_argument_group(f"variant {name}")
        g.add_argument(f"--{low}", required=True, metavar=f"MODEL_{name}",
                       help="hub id or local directory ('demo' = the bundled SmolLM2 demo, not rank1)")
        g.add_argument(f"--{low}-label", help="name shown in the report (default: model and options)")
        add_load_arguments(g, prefix=f"{low}-")
    p.add_argument("--run", help="first-stage TREC run")
    p.add_argument("--queries", help="queries: TSV (qid<TAB>text) or JSONL ({_id, text})")
    p.add_argument("--corpus", help="passages: TSV or BEIR JSONL")
    p.add_argument("--instructions", help="per-query instructions, same formats as --queries")
    p.add_argument("--qrels", help="TREC qrels: add the evaluation and the paired test")
    p.add_argument("--sample", action="store_true",
                   help="use the bundled sample for run/queries/corpus/qrels/instructions")
    p.add_argument("--top-k", type=int, default=100, help="judge the first k of each query (default 100)")
    p.add_argument("--store", help="judgement store (default: rank1-judgements.sqlite in --report)")
    p.add_argument("--report", required=True, metavar="DIR", help="folder for report.md, report.json and figures")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES), help="measures for --qrels")
    p.add_argument("--test-measure", default=TEST_MEASURE, help=f"measure of the paired test (default {TEST_MEASURE})")
    p.add_argument("--permutations", type=int, default=PERMUTATIONS,
                   help=f"sign assignments of the paired test (default {PERMUTATIONS}; exact when 2^queries is fewer)")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the paired test (default {SEED})")
    p.add_argument("--no-figures", action="store_true", help="text report only")
    p.add_argument("--flush-every", type=int, help="judgements per store commit (default: the batch size)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, a line every 30 s elsewhere)")
    add_judge_arguments(p)
    p.set_defaults(func=run)
    return p


def _label(model: str, load: LoadOptions) -> str:
    options = [f"{k.replace('_', '-')}={v}" for k in ("dtype", "quantization", "device_map", "revision")
               if (v := getattr(load, k)) is not None]
    return model + (f" [{', '.join(options)}]" if options else "")


def run(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand: judge with A then B, write the report, print the summary."""
    from ..io.store import JudgementStore

    check_arguments(args, "compare", models=(args.a, args.b),
                    positives=("top_k", "batch_size", "flush_every", "max_new_tokens", "context_size",
                               "permutations"))
    for name in ("a", "b"):  # both variants' loading flags, before A is loaded and judged
        check_load_options(load_options(args, prefix=f"{name}-"), prefix=f"{name}-")
    items, qrels, no_documents = read_inputs(args, measures=[*args.measures, args.test_measure])
    for name in ("a", "b"):
        check_model(getattr(args, name), f"--{name}", getattr(args, f"{name}_revision"))
    report_dir = Path(args.report)
    if report_dir.exists() and not report_dir.is_dir():
        raise Rank1Error(f"{report_dir}: not a directory")
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Rank1Error(f"cannot create the report folder {report_dir}: {e}") from None
    pipeline.check_writable(report_dir / "report.json")
    store_path = Path(args.store) if args.store else report_dir / "rank1-judgements.sqlite"

    judge = judge_options(args)
    variants: dict[str, VariantRun] = {}
    with JudgementStore(store_path) as store:
        for name in ("A", "B"):
            model, load = getattr(args, name.lower()), load_options(args, prefix=f"{name.lower()}-")
            label = getattr(args, f"{name.lower()}_label") or _label(model, load)
            bar = ProgressBar(enabled=not args.no_progress, shard=pipeline.Shard())
            print(f"{name}: loading {label}", file=sys.stderr)
            try:
                variants[name] = judge_variant(
                    name, lambda model=model, load=load: make_ranker(model, load, judge, args.threads,
                                                                     show_progress_bar=False),
                    items, store, label=label, flush_every=args.flush_every,
                    progress=bar.update, on_start=bar.start)
            except KeyboardInterrupt:
                print(f"{PROG}: interrupted: finished judgements are in the store {store_path}; "
                      "rerun the same command to resume", file=sys.stderr)
                return 130
            finally:
                bar.close()
            release_memory()  # before loading B, so B's peak does not include A

    inputs = {"run": args.run, "queries": args.queries, "corpus": args.corpus, "instructions": args.instructions,
              "qrels": args.qrels, "top_k": args.top_k, "store": str(store_path),
              "max_new_tokens": args.max_new_tokens, "context_size": args.context_size}
    report = build_report(items, variants["A"], variants["B"], qrels, measures=args.measures,
                          test_measure=args.test_measure, permutations=args.permutations, seed=args.seed,
                          inputs=inputs)
    write_report(report, report_dir, figures=not args.no_figures)
    print("rank1-hf compare")
    for line in summary_lines(report):
        print(line)
    if no_documents:
        print(f"queries without documents in the run: {len(no_documents)} ({', '.join(no_documents[:10])}"
              + (f" and {len(no_documents) - 10} more)" if len(no_documents) > 10 else ")"))
    print()
    files = [FIGURE_FILES[k] for k, d in report.figures.items() if d.get("file")]
    print(f"report: {report_dir / 'report.md'}, {report_dir / 'report.json'}"
          + (f", figures: {', '.join(files)}" if files else ""))
    if report.figures_skipped:
        print(f"figures skipped: {report.figures_skipped}")
    print(f"store: {store_path}")
    return 0
