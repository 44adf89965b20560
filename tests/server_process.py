"""Run ``rank1-hf serve`` as a real process on 127.0.0.1, for the server tests and the load benchmark.

The process imports this checkout's rank1_hf (cwd and PYTHONPATH are the repository root). Every wait
is bounded in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(path: Path, seed: int = 0, planted: bool = True) -> Path:
    """A tiny random Qwen2 with the real Qwen tokenizer, saved as a local checkpoint.

    ``planted``: the </think> token's output row is boosted, so rows close their reasoning at varied steps
    (the boost is in the weights, so it survives saving); otherwise every row reasons to max_new_tokens.
    """
    from plant import plant_think

    from rank1_hf.testing import qwen_tokenizer, tiny_model

    tok = qwen_tokenizer()
    model = tiny_model(tok, "qwen2", seed=seed)
    if planted:
        assert plant_think(model, tok, factor=3.0) is None  # a one-token </think>: weights only, no hook
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Server:
    """``rank1-hf serve --model <dir> --port <free> <args>``, its log in ``log``."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str] | None = None,
                 script: str | None = None):
        """``script``: Python code run instead of ``rank1-hf serve``, given the model and port as argv[1:3]."""
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        if script is None:
            command = [sys.executable, "-m", "rank1_hf", "serve", "--model", str(model), "--port", str(self.port),
                       "--threads", "1", *args]
        else:
            command = [sys.executable, "-c", script, str(model), str(self.port), *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=self._log_file,
                                        stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 180.0) -> "Server":
        """This server once /health answers 200; otherwise it is stopped (a fixture that fails here never
        reaches its own stop) and the error raised."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server was not healthy within {timeout} s:\n{self.log.read_text()}")

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_for(self, condition, timeout: float, headers: dict[str, str] | None = None) -> dict[str, float]:
        """Poll /metrics until ``condition(metrics)`` holds (bounded); returns those metrics."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics(headers)
            if condition(m):
                return m
            time.sleep(0.05)
        raise TimeoutError(f"condition not met within {timeout} s; last metrics {m}")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log_file.close()
