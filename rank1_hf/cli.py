"""The ``rank1-hf`` command line: rerank, score, evaluate, plan.

Examples::

    rank1-hf rerank --model jhu-clsp/rank1-7b --run bm25.trec --queries queries.jsonl \\
        --corpus corpus.jsonl --top-k 100 --output rank1.trec --qrels qrels.txt
    rank1-hf rerank --model demo --sample --top-k 10 --max-new-tokens 64 --output runs/sample.trec
    accelerate launch --multi_gpu --num_processes 4 -m rank1_hf rerank ...   # data parallel
    torchrun --nproc_per_node 4 -m rank1_hf -- rerank ...   # without accelerate ("--": torchrun takes --run for --run-path)
    rank1-hf rerank ... --shard 0/8 --store shards/0.sqlite                  # one of 8 separate jobs
    rank1-hf rerank ... --store merged.sqlite shards/*.sqlite --output rank1.trec   # then the outputs
    rank1-hf score --model jhu-clsp/rank1-7b --query "what is a cat" --passage "Cats are felines."
    rank1-hf evaluate --run rank1.trec --qrels qrels.txt
    rank1-hf plan jhu-clsp/rank1-32b --max-memory 0=40GiB,1=40GiB

Errors in the user's input or setup print one line, ``rank1-hf: error: ...``, and exit with status 2.
Ctrl-C (or SIGTERM) exits with 130 after committing finished judgements to the store: rerunning the same
command resumes from there.

Data parallel: each process started with RANK/WORLD_SIZE/LOCAL_RANK set (one node or several) judges a
shard into its own store file and loads its own whole model (on cuda:LOCAL_RANK when there are GPUs and no
--device-map is given); rank 0 writes the outputs when every rank is done. ``accelerate launch
--multi_gpu`` uses torchrun and works on CPU-only machines as well; ``accelerate launch --cpu
--num_processes N`` starts a single process in accelerate 1.x (multi-CPU needs mpirun), which still gives
the right output, only not in parallel. Without a launcher, ``--shard I/N`` jobs judge one shard each and a
final run given all their ``--store`` files writes the outputs: see rank1_hf.pipeline.

Passages too long for --context-size are cut (the passage only; the template's tail stays whole) and the
summary counts them and names the first ten, since a cut passage may hide the relevant part.

Input validation (files, ids, output paths, the judgement store) happens before the model is loaded, and
torch/transformers are imported only when a model is needed, so mistakes are reported in a second.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import Rank1Error

PROG = "rank1-hf"
DEMO_NAMES = ("demo", "demo:smollm2")
DEMO_NOTE = (
    "--model demo is SmolLM2-135M-Instruct, a small general chat model, NOT a rank1 model: it shows the "
    "pipeline working offline; its scores say nothing about rank1's quality"
)


class _UsageError(Exception):
    """A bad command line, reported like a Rank1Error (one line, status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the whole usage block first; one line is easier to read in logs.
        raise _UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------- helpers


def is_demo(name: str) -> bool:
    """Whether ``--model`` names the offline demo model (SmolLM2, not a rank1 model)."""
    return name.lower() in DEMO_NAMES


def _resolve_model(name: str) -> str:
    """The path or hub id to load: the demo model's local path, or ``name`` as given."""
    if is_demo(name):
        from .assets import smollm2

        return str(smollm2())
    return name


def _add_loading(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model loading")
    g.add_argument("--dtype", help="auto (default), float16, bfloat16 or float32")
    g.add_argument("--device-map", help="cpu, cuda:0, auto, balanced, sequential, ... (default: one device)")
    g.add_argument("--max-memory", help="per-device budget, e.g. 0=40GiB,1=40GiB,cpu=100GiB")
    g.add_argument("--offload-folder", help="folder for weights offloaded to disk")
    g.add_argument("--quantization", choices=("bnb-4bit", "bnb-8bit"), help="quantize on load (AWQ checkpoints need no flag)")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    g.add_argument("--revision", help="hub branch, tag or commit")


def _add_judging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judging")
    g.add_argument("--max-new-tokens", type=int, default=8192, help="reasoning cap (default 8192, as the reference)")
    g.add_argument("--context-size", type=int, default=16000,
                   help="prompt + max-new-tokens must fit; longer passages are cut, passage only (default 16000)")
    g.add_argument("--batch-size", type=int, help="pairs decoded together (default 32 on GPU, 16 on CPU)")
    g.add_argument("--engine", choices=("auto", "continuous", "generate"), default="auto")
    g.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice; 1 is much faster on a busy shared CPU)")
    g.add_argument("--dataset-prompt", metavar="TEMPLATE_OR_NAME",
                   help="a template containing FILL_QUERY_HERE, or the name of an official rank1 prompt (e.g. "
                        "SciFact, touche2020, bright-pony; a BRIGHT subset without its own, e.g. bright-biology, "
                        "gets BrightRetrieval's)")


def _make_ranker(args: argparse.Namespace, *, device_map: Any = None, show_progress_bar: bool | None = None):
    """Load the model named by ``args`` into a Rank1 (imports torch/transformers on first use)."""
    from .dataset_prompts import resolve_dataset_prompt
    from .ranker import Rank1

    dataset_prompt = resolve_dataset_prompt(args.dataset_prompt)
    if args.threads is not None:
        import torch

        _positive("threads", args.threads)
        # With other busy processes on the same cores, OpenMP threads wait on each other and a forward
        # pass can get 10x slower (seen with 2 threads on 2 shared cores); one thread avoids that.
        torch.set_num_threads(args.threads)
    path = _resolve_model(args.model)
    return Rank1(
        path,
        dtype=args.dtype,
        device_map=args.device_map if args.device_map is not None else device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        quantization=args.quantization,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        max_new_tokens=args.max_new_tokens,
        context_size=args.context_size,
        batch_size=args.batch_size,
        dataset_prompt=dataset_prompt,
        engine=args.engine,
        show_progress_bar=show_progress_bar,
    )


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise Rank1Error(f"--{name} must be positive, got {value}")


# ---------------------------------------------------------------------------------------------- rerank


def fill_inputs(args: argparse.Namespace, command: str) -> None:
    """``--sample`` fills the input files not given; then --run, --queries and --corpus must be there."""
    from . import formats

    if args.sample:
        for name, path in formats.sample_paths().items():
            if getattr(args, name) is None:
                setattr(args, name, str(path))
    missing = [f"--{n}" for n in ("run", "queries", "corpus") if getattr(args, n) is None]
    if missing:
        raise Rank1Error(f"{command} needs {', '.join(missing)} (or --sample for the bundled sample)")


def _rerank(args: argparse.Namespace) -> int:
    from . import pipeline, formats

    fill_inputs(args, "rerank")
    for name in ("top_k", "batch_size", "flush_every", "flush_seconds", "max_new_tokens", "context_size"):
        _positive(name.replace("_", "-"), getattr(args, name))
    demo = is_demo(args.model)
    if demo:
        print(f"note: {DEMO_NOTE}", file=sys.stderr)
    from .dataset_prompts import resolve_dataset_prompt

    resolve_dataset_prompt(args.dataset_prompt)  # a bad name fails now, not after loading the model

    shard = pipeline.Shard.from_env()
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
    store_paths = _distinct_paths([Path(s) for s in args.store] if args.store else
                                  [output.with_name("rank1-judgements.sqlite")])

    # Everything that can be wrong with the inputs is found before the (slow) model load.
    items = pipeline.load_items(args.run, args.queries, args.corpus, args.instructions, args.top_k)
    if not items:
        raise Rank1Error(f"{args.run}: the run has no pairs")
    qrels = formats.read_qrels(args.qrels) if args.qrels and writes_outputs else None
    if qrels is not None:
        from .evaluate import _ir_measures

        _ir_measures()  # a missing optional dependency fails now, not after the judging

    from contextlib import ExitStack

    from .store import JudgementStore

    with ExitStack() as stack:
        # The stores after the first are only read: they must exist and, once the model is loaded, hold
        # judgements made with this run's settings.
        sources = [stack.enter_context(JudgementStore(p, readonly=True)) for p in store_paths[1:]]
        device_map = None
        if shard.world_size > 1:
            import torch

            # Data parallel: one whole model per process, on "its" GPU when there are GPUs.
            if torch.cuda.is_available():
                device_map = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
        ranker = _make_ranker(args, device_map=device_map)
        for source in sources:
            source.check_settings(ranker.settings())
        bar = _ProgressBar(enabled=args.progress or (not args.no_progress and sys.stderr.isatty()),
                           shard=job_shard or shard)
        judging = dict(batch_size=args.batch_size, flush_every=args.flush_every, flush_seconds=args.flush_seconds,
                       progress=bar.update, on_start=bar.start)
        own = pipeline.rank_store_path(store_paths[0], shard) if shard.world_size > 1 else store_paths[0]
        try:
            if shard.world_size > 1:
                result = pipeline.judge_across_ranks(ranker, items, store_paths[0], shard, sources=sources,
                                                     wait_timeout_s=args.wait_timeout, **judging)
            else:
                # A rollback journal (not WAL): the store may be on a network filesystem.
                with JudgementStore(store_paths[0], journal="delete") as store:
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
    tag = "demo-smollm2" if demo else args.tag
    reranked = pipeline.write_outputs(items, result.judgements, output, traces, tag)
    print("rank1-hf rerank" + (" (DEMO model, not rank1)" if demo else ""))
    print(f"model: {args.model}" + (f" ({DEMO_NOTE})" if demo else ""))
    if shard.world_size > 1:
        print(f"processes: {shard.world_size}")
    for line in summary.lines():
        print(line)
    print(f"run: {output}")
    print(f"traces: {traces}")
    print("store: " + (f"{own} and the other ranks' beside it" if shard.world_size > 1 else str(own))
          + (f", reused from {', '.join(map(str, store_paths[1:]))}" if store_paths[1:] else ""))
    if qrels is not None:
        from .evaluate import evaluate, format_table

        # Both runs hold exactly the job's queries: score them over those (a query the job left out
        # would count as zero in both and only dilute the difference).
        judged = {qid: docs for qid, docs in qrels.items() if qid in reranked}
        if not judged:
            print("evaluation: none of the run's queries is in the qrels")
            return 0
        table = format_table({
            f"input (top {args.top_k})": evaluate(pipeline.first_stage_run(items), judged, args.measures),
            "reranked": evaluate(reranked, judged, args.measures),
        })
        print()
        print(f"evaluation over the {len(judged)} queries with qrels:")
        print(table)
    return 0


def _distinct_paths(paths: list[Path]) -> list[Path]:
    """The --store paths in order, each file once (the same file given twice is read once)."""
    seen: dict[Path, Path] = {}
    for p in paths:
        seen.setdefault(p.resolve(), p)
    return list(seen.values())


class _ProgressBar:
    """A tqdm bar over the pairs this process judges (pairs/s and ETA), or nothing."""

    def __init__(self, enabled: bool, shard: Any) -> None:
        self.enabled, self.shard, self.bar = enabled, shard, None

    def start(self, todo: int, reused: int) -> None:
        if not self.enabled or todo == 0:
            return
        from tqdm.auto import tqdm

        desc = "rank1" if self.shard.world_size == 1 else f"rank1 [{self.shard.rank}/{self.shard.world_size}]"
        self.bar = tqdm(total=todo, unit="pair", desc=desc, dynamic_ncols=True, position=self.shard.rank)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------- others


def _score(args: argparse.Namespace) -> int:
    for text, name in ((args.query, "--query"), (args.passage, "--passage")):
        if not text.strip():
            raise Rank1Error(f"{name} is empty")
    if is_demo(args.model):
        print(f"note: {DEMO_NOTE}", file=sys.stderr)
    ranker = _make_ranker(args, show_progress_bar=False)
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


def _evaluate(args: argparse.Namespace) -> int:
    from . import formats
    from .evaluate import evaluate, format_table

    qrels = formats.read_qrels(args.qrels)
    rows = {}
    for path in args.run:
        rows[path] = evaluate(formats.read_run(path), qrels, args.measures)
    print(format_table(rows))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .planning import format_plan, plan_device_map

    path = _resolve_model(args.model)
    plan = plan_device_map(path, max_memory=args.max_memory, dtype=args.dtype, quantization=args.quantization,
                           device_map=args.device_map)
    print(format_plan(plan))
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import DEFAULT_MEASURES

    parser = _Parser(prog=PROG, description="rank1 reasoning rerankers on plain Hugging Face transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("rerank", help="rerank a first-stage TREC run", description=(
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
    p.add_argument("--tag", default="rank1", help="run tag in the TREC file (default rank1)")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES), help="measures for --qrels")
    p.add_argument("--flush-every", type=int, help="judgements per store commit (default: the batch size); a SIGKILL loses fewer than this")
    p.add_argument("--flush-seconds", type=float, default=5.0, help="commit at least this often (default 5)")
    p.add_argument("--wait-timeout", type=float, help="launcher rank 0: seconds to wait for the other ranks (default forever)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="a progress bar even when stderr is not a terminal")
    _add_judging(p)
    _add_loading(p)
    p.set_defaults(func=_rerank)

    p = sub.add_parser("score", help="judge one (query, passage) pair and print the reasoning")
    p.add_argument("--model", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--passage", required=True)
    p.add_argument("--instruction")
    _add_judging(p)
    _add_loading(p)
    p.set_defaults(func=_score)

    p = sub.add_parser("evaluate", help="score runs against qrels (the figures trec_eval gives on the same files)")
    p.add_argument("--run", required=True, nargs="+", help="TREC, JSON {qid: {docid: score}} or mteb predictions")
    p.add_argument("--qrels", required=True, help="TREC qrels or BEIR qrels TSV (query-id corpus-id score)")
    p.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES))
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("plan", help="show how a model would be split over devices, without loading it")
    p.add_argument("model")
    p.add_argument("--max-memory", required=True, help="e.g. 0=40GiB,1=40GiB (GPUs need not exist here)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", choices=("bnb-4bit", "bnb-8bit"))
    p.add_argument("--device-map", default="auto", choices=("auto", "balanced", "balanced_low_0", "sequential"))
    p.set_defaults(func=_plan)

    from . import compare  # the A/B report for quantized variants

    compare.add_parser(sub)
    return parser


def _sigterm(signum: int, frame: Any) -> None:
    # accelerate/torchrun stop workers with SIGTERM: treat it like Ctrl-C so the buffer gets committed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        previous = _install_sigterm()
        try:
            return args.func(args)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except (Rank1Error, _UsageError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _install_sigterm() -> Any:
    """Route SIGTERM to KeyboardInterrupt; returns the old handler (None off the main thread, where
    handlers cannot be installed, e.g. when main() is called from a worker thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _sigterm)
