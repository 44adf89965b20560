"""The ``rank1-hf`` command line: rerank, score, evaluate, plan, compare, report, serve (one module each).

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
    rank1-hf serve --model jhu-clsp/rank1-7b --port 8000 --store judgements.sqlite   # HTTP rerank API
    rank1-hf report rank1.trec --qrels qrels.txt                             # rank1.html, readable offline

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

Input validation (flags, files, ids, output paths, the judgement store, whether --model can be found at
all: :mod:`rank1_hf.cli.preflight`) happens before torch or transformers are imported, so mistakes are
reported in about half a second.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Sequence

from ..errors import Rank1Error
from . import compare, evaluate, plan, report, rerank, score, serve
from .common import PROG


class _UsageError(Exception):
    """A bad command line, reported like a Rank1Error (one line, status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the whole usage block first; one line is easier to read in logs.
        raise _UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        # argparse reports a subcommand's unknown option from the top parser, pointing at the top help:
        # name the subcommand's help instead, with the nearest option it does have.
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise _UsageError(_unknown_options(unknown, self._command_parser(getattr(parsed, "command", None))))
        return parsed

    def _command_parser(self, command: str | None) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                return action.choices[command]
        return self


def _unknown_options(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """``unrecognized arguments: --topk 2; did you mean --top-k? (see rank1-hf rerank --help)``."""
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for word in unknown:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                hints.append((word.split("=", 1)[0], close[0]))
    if len(hints) == 1:
        hint = f"; did you mean {hints[0][1]}?"
    else:
        hint = "; did you mean " + ", ".join(f"{near} for {word}" for word, near in hints) + "?" if hints else ""
    return f"unrecognized arguments: {' '.join(unknown)}{hint} (see {parser.prog} --help)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rank1-hf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``rank1-hf`` parser: one subcommand per module of this package."""
    parser = _Parser(prog=PROG, description="rank1 reasoning rerankers on plain Hugging Face transformers")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (rerank, score, evaluate, plan, compare, report, serve):
        command.add_parser(sub)
    return parser


def _sigterm(signum: int, frame: Any) -> None:
    # accelerate/torchrun stop workers with SIGTERM: treat it like Ctrl-C so the buffer gets committed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    try:
        parser = build_parser()
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
        interrupted()
        return 130


def interrupted(message: str = "interrupted") -> None:
    """Print ``rank1-hf: <message>`` with Ctrl-C ignored meanwhile: a second Ctrl-C while the message is
    written must not end in a traceback (main thread only; elsewhere signal handlers cannot be set)."""
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        print(f"{PROG}: {message}", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _install_sigterm() -> Any:
    """Route SIGTERM to KeyboardInterrupt; returns the old handler (None off the main thread, where
    handlers cannot be installed, e.g. when main() is called from a worker thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _sigterm)
