"""The decode step with fixed shapes, replayed as a CUDA graph on one GPU.

An eager decode step on a GPU is launch-bound: hundreds of small kernels, each waiting on Python. A CUDA
graph records the kernels of one step once and replays them with a single launch, but only if nothing
in the step depends on Python values: every tensor it reads or writes must keep its address and shape
from one replay to the next. So the step here works on buffers allocated once:

- ``tokens`` and ``positions`` (slots, 1): each row's last token and the cache column it is written to;
- the paged cache's pools and page table, and the engine's ``visible`` mask (slots, capacity + 1): the
  step computes its pool indices from the table on the device, so a replay follows pages the engine has
  given out since;
- ``picked`` (slots, 3): the greedy next token and the " true"/" false" logits, computed inside the step,
  so one device-to-host copy per step carries everything the engine needs.

Shapes come from buckets: the rows in flight are padded up to the next batch bucket (1, 2, 4, ... the
slot count) and the key columns read up to the next width bucket (256, 512, ... the capacity). Padding
rows sit in free slots, write their keys to the scratch page and attend to column 0 alone. One graph is
captured per (rows, width) bucket the engine meets, on first use, all sharing one memory pool.

Without CUDA (or when capture fails) the same step runs eagerly, which is also how the CPU tests check
its bucketing, padding and masks against the reference.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from .devices import input_device
from .head import greedy_tokens
from .kv_cache import PagedCache, Placement

logger = logging.getLogger(__name__)

_MIN_WIDTH = 256


def graphable(model: PreTrainedModel) -> bool:
    """Whether a model can run captured decode steps: plain floating weights, all on one CUDA device.

    Device-map splits (accelerate hooks), bitsandbytes and AWQ models keep the eager step.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        return False
    devices = {p.device for p in model.parameters()}  # offloaded weights sit on meta or cpu
    return len(devices) == 1 and next(iter(devices)).type == "cuda" and all(p.is_floating_point() for p in model.parameters())


def pick(logits: torch.Tensor, readout: torch.Tensor, out: torch.Tensor) -> None:
    """Write (greedy token, true logit, false logit) for each row of (rows, vocab) logits into ``out``
    (rows, 3); ``readout`` holds the two ids, on the logits' device."""
    out[:, 0] = greedy_tokens(logits)
    out[:, 1:] = logits.index_select(1, readout)


def buckets(limit: int, first: int = 1) -> list[int]:
    """Powers of two from ``first`` below ``limit``, then ``limit`` itself."""
    out, k = [], first
    while k < limit:
        out.append(k)
        k *= 2
    return out + [limit]


class StaticDecode:
    """One decode step over slots ``0..n-1`` on fixed buffers, captured as CUDA graphs on a CUDA device.

    Bound to one cache and one ``visible`` mask: the engine makes a new one when it replaces either.
    """

    def __init__(self, model: PreTrainedModel, cache: PagedCache, visible: torch.Tensor, readout: tuple[int, int],
                 pad_id: int):
        device = input_device(model)
        self.model, self.cache, self.visible = model, cache, visible
        self.device = device
        cache.attach(device)
        slots = cache.slots
        self.rows = buckets(slots)
        self.widths = buckets(cache.capacity + 1, min(_MIN_WIDTH, cache.capacity + 1))
        self.pad_id = pad_id
        self.slots = torch.arange(slots, device=device)
        self.tokens = torch.full((slots, 1), pad_id, dtype=torch.long, device=device)
        self.positions = torch.full((slots, 1), cache.scratch, dtype=torch.long, device=device)
        self.readout = torch.tensor(readout, dtype=torch.long, device=device)
        self.picked = torch.zeros((slots, 3), dtype=torch.float64, device=device)
        self._staged = torch.empty((2, slots), dtype=torch.long, pin_memory=device.type == "cuda")
        self.capture = device.type == "cuda"
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, rows: int, width: int) -> tuple[int, int]:
        """The smallest (rows, width) buckets holding ``rows`` rows that read ``width`` key columns."""
        return next(b for b in self.rows if b >= rows), next(w for w in self.widths if w >= width)

    @torch.inference_mode()
    def run(self, last: list[int], cached: list[int]) -> list[tuple[float, float, float]]:
        """Step rows 0..n-1 (their last tokens, and the column each writes): (token, true, false) per row."""
        n = len(last)
        rows, width = self.bucket(n, max(cached) + 1)
        staged = self._staged[:, :rows]
        staged[0, :n] = torch.tensor(last)
        staged[0, n:] = self.pad_id
        staged[1, :n] = torch.tensor(cached)
        staged[1, n:] = self.cache.scratch  # padding rows write the scratch page
        self.visible[n:rows, 0] = True  # and attend to column 0 (a free slot's row is reset when it is taken)
        self.tokens[:rows, 0].copy_(staged[0], non_blocking=True)
        self.positions[:rows, 0].copy_(staged[1], non_blocking=True)
        self._replay(rows, width)
        return [tuple(r) for r in self.picked[:n].tolist()]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every (rows, width) bucket now, with padding rows only (on a GPU; else nothing)."""
        for rows in self.rows:
            for width in self.widths:
                if not self.capture:
                    return
                if (rows, width) not in self._graphs:
                    self.tokens[:rows] = self.pad_id
                    self.positions[:rows] = self.cache.scratch
                    self.visible[:rows, 0] = True
                    self._replay(rows, width)

    def _replay(self, rows: int, width: int) -> None:
        if not self.capture:
            self._step(rows, width)
            return
        graph = self._graphs.get((rows, width))
        if graph is None:
            graph = self._capture(rows, width)
            if graph is None:
                return  # capture failed: the step ran eagerly, and will from now on
        graph.replay()

    def _capture(self, rows: int, width: int) -> torch.cuda.CUDAGraph | None:
        # Warm-up runs the real step (writing a step is idempotent: the same keys to the same columns),
        # on a side stream as capture requires; the capture itself records without running.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(rows, width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(rows, width)
        except Exception as error:  # noqa: BLE001 - any capture failure means: stay eager
            logger.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", error)
            self.capture = False
            self._graphs.clear()
            return None
        self._graphs[(rows, width)] = graph
        return graph

    def _step(self, rows: int, width: int) -> None:
        """The step itself: reads and writes only the buffers above (slices of them are fixed addresses)."""
        positions = self.positions[:rows]
        self.cache.place(Placement(self.slots[:rows], positions, width))
        self.visible[self.slots[:rows], positions[:, 0]] = True
        out = self.model(
            input_ids=self.tokens[:rows],
            attention_mask=self.visible[:rows, None, None, :width],
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        pick(out.logits[:, -1, :].float(), self.readout, self.picked[:rows])
