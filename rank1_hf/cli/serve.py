"""``rank1-hf serve``: an HTTP rerank server (Cohere v1/v2, Jina/vLLM and TEI shapes) on one model.

The app is :mod:`rank1_hf.serve`'s; this module checks the flags, loads the model, and runs uvicorn.
SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish for up to
``--graceful-timeout`` seconds (then cancels them), stops the engine, closes the store, and exits 0.
fastapi and uvicorn (the ``[serve]`` extra) are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from ..errors import Rank1Error
from .common import (DEMO_NOTE, add_judge_arguments, add_load_arguments, check_load_options, check_model, is_demo,
                     judge_options, load_options, make_ranker, positive)

if TYPE_CHECKING:
    from ..serve import ServeSettings

API_KEY_ENV = "RANK1_HF_API_KEY"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define the ``serve`` subcommand; returns its parser."""
    p = subparsers.add_parser("serve", help="serve rerank requests over HTTP (Cohere, Jina/vLLM, TEI APIs)")
    p.add_argument("--model", required=True,
                   help="hub id or local directory; 'demo' = the bundled SmolLM2 demo (not rank1)")
    p.add_argument("--served-model-name", help="the model name in responses (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--store", help="judgement store (SQLite): reuse stored judgements, commit each new one")
    p.add_argument("--max-documents", type=int, default=1000, help="most documents per request (default 1000)")
    p.add_argument("--max-queued-pairs", type=int, default=8192,
                   help="most pairs accepted and not yet answered; more gets 503 with Retry-After (default 8192)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest request body; more gets 413 (default 16 MiB)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before cancelling them; must be > 0 "
                        "(default 30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    add_judge_arguments(p)
    add_load_arguments(p.add_argument_group("model loading"))
    p.set_defaults(func=run)
    return p


def serve_settings(args: argparse.Namespace) -> "ServeSettings":
    """The app's settings from serve's flags (the port checked too): for ``rank1-hf serve`` and Ray Serve."""
    from ..serve import ServeSettings

    if not 0 <= args.port <= 65535:
        raise Rank1Error(f"--port must be 0..65535, got {args.port}")
    return ServeSettings(
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.served_model_name or args.model,
        max_documents=args.max_documents,
        max_queued_pairs=args.max_queued_pairs,
        max_body_bytes=args.max_body_bytes,
    )


def run(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand: checks, load, warm up in the background, serve until SIGTERM."""
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as error:
        raise Rank1Error(f"serve needs the [serve] extra (pip install 'rank1-hf[serve]'): {error}") from None
    settings = serve_settings(args)
    positive("graceful-timeout", args.graceful_timeout)
    judge = judge_options(args)  # a bad --dataset-prompt fails before the model loads
    load = load_options(args)
    check_load_options(load)  # so do bad loading flags
    sock = bind(args.host, args.port)  # and a busy port
    try:
        check_model(args.model, "--model", args.revision)  # the last check: it may ask the network
        if is_demo(args.model):
            print(f"note: {DEMO_NOTE}", file=sys.stderr)
        ranker = make_ranker(args.model, load, judge, args.threads, show_progress_bar=False,
                             store=args.store)
        config = uvicorn.Config(create_app(ranker, settings), host=args.host, port=sock.getsockname()[1],
                                log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout)
        address = f"[{args.host}]" if ":" in args.host else args.host
        print(f"rank1-hf: serving on http://{address}:{config.port} (Ctrl-C or SIGTERM stops)", file=sys.stderr)
        with _quiet_signals():
            uvicorn.Server(config).run(sockets=[sock])  # uvicorn logs no address for a socket it is given
    finally:
        sock.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before the model loads: a busy or unusable address is a one-line
    error at once (uvicorn listens on this socket once the app starts; connections before then are refused)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise Rank1Error(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise Rank1Error(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


class _quiet_signals:
    """uvicorn handles SIGTERM/SIGINT itself (graceful shutdown) and raises the signal again once done;
    while it runs, that second signal must do nothing, so a graceful stop exits 0."""

    def __enter__(self) -> None:
        self.previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
