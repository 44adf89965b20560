"""What a variant costs in memory: :class:`PeakMemory` over a span, and :func:`release_memory` between
variants."""

from __future__ import annotations

import gc
import os
import threading


class PeakMemory:
    """Peak memory over a span: ``torch.cuda.max_memory_allocated`` (summed over GPUs) when CUDA is in
    use, and the peak resident set size (RSS) above the RSS at the start, sampled every 10 ms.

    The RSS delta misses memory the allocator keeps from before the span (freed by the previous
    variant but not returned to the OS), so it can read low; the GPU figure is exact.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.gpu_peak_bytes: int | None = None
        self.rss_delta_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_rss = self._peak_rss = 0
        self._cuda = False

    @staticmethod
    def _rss() -> int | None:
        try:  # Linux: resident pages are the second field
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak_rss = max(self._peak_rss, self._rss() or 0)

    def __enter__(self) -> "PeakMemory":
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        start = self._rss()
        if start is not None:
            self._start_rss = self._peak_rss = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak_rss = max(self._peak_rss, self._rss() or 0)
            self.rss_delta_bytes = self._peak_rss - self._start_rss
        if self._cuda:
            self.gpu_peak_bytes = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))

    @property
    def peak_bytes(self) -> int | None:
        """The headline number: the GPU peak when the GPUs were used, else the RSS delta."""
        return self.gpu_peak_bytes if self.gpu_peak_bytes else self.rss_delta_bytes

    @property
    def measure(self) -> str:
        return ("torch.cuda.max_memory_allocated (all GPUs)" if self.gpu_peak_bytes
                else "peak RSS minus RSS at the start (sampled every 10 ms)")


def release_memory() -> None:
    """Give back a dropped model's memory before loading the next one (peak figures stay per variant)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
