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
slot count) and the key columns read up to the next width bucket (256, 384, 512, 768, ... the capacity:
steps of about 1.4x, so a step reads on average ~15% more columns than its rows hold rather than ~35%
with doubling). Padding rows sit in free slots, write their keys to the scratch page and attend to
column 0 alone. One graph is captured per (rows, width) bucket the engine meets, all sharing one memory
pool; :meth:`StaticDecode.capture_all` captures the largest first, so the smaller ones reuse its blocks.

Nothing in the step may copy a host value to the device, read a device value on the host or make a
data-dependent shape (tests/test_gpu_readiness.py runs it under a dispatch mode that fails on each).
Capture runs on the engine's device (:func:`~rank1_hf.model.devices.use_device`) on a stream of that device.

Without CUDA (or when capture fails) the same step runs eagerly, which is also how the CPU tests check
its bucketing, padding and masks against the reference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from ..model.awq import AwqLinear
from ..model.devices import input_device, use_device
from .head import greedy_tokens
from .kv_cache import PagedCache, Placement

logger = logging.getLogger(__name__)

_MIN_WIDTH = 256


def graphable(model: PreTrainedModel) -> bool:
    """Whether a model can run captured decode steps: all on one CUDA device, with capturable layers.

    Device-map splits (accelerate hooks; offloaded weights sit on meta or cpu) keep the eager step.
    """
    devices = {p.device for p in model.parameters()}
    # A tensor-parallel model keeps the eager step too: its collectives run outside any capture.
    return (len(devices) == 1 and next(iter(devices)).type == "cuda" and capturable_layers(model)
            and not getattr(model, "_tp_size", None))


def capturable_layers(model: PreTrainedModel) -> bool:
    """Floating weights, or rank1_hf's own AWQ int4 layers (awq.AwqLinear: plain tensor ops around torch's
    int4 matmul, which a graph records like any kernel, as gpt-fast's int4 path does). Other quantized
    models (bitsandbytes, AWQ through another library) keep the eager step: their kernels are not ours to
    check for host syncs (tests/test_gpu_readiness.py audits the AWQ step on CPU)."""
    awq = {id(p) for m in model.modules() if isinstance(m, AwqLinear) for p in m.parameters()}
    if getattr(model.config, "quantization_config", None) is not None and not awq:
        return False
    return all(p.is_floating_point() or id(p) in awq for p in model.parameters())


def pick(logits: torch.Tensor, readout: torch.Tensor, out: torch.Tensor) -> None:
    """Write (greedy token, true logit, false logit) for each row of (rows, vocab) logits into ``out``
    (rows, 3); ``readout`` holds the two ids, on the logits' device."""
    out[:, 0] = greedy_tokens(logits)
    out[:, 1:] = logits.index_select(1, readout)


_READOUT: dict[tuple[tuple[int, int], torch.device], torch.Tensor] = {}


def readout_ids(readout: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The two readout ids as a tensor on ``device``, made once (not a host-to-device copy every step)."""
    key = (tuple(readout), torch.device(device))
    found = _READOUT.get(key)
    if found is None:
        found = _READOUT[key] = torch.tensor(readout, dtype=torch.long, device=device)
    return found


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as eager attention adds it (0 where seen, the dtype's min elsewhere), on
    the mask's own device."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)


def buckets(limit: int, first: int = 1) -> list[int]:
    """Powers of two from ``first`` below ``limit``, then ``limit`` itself."""
    out, k = [], first
    while k < limit:
        out.append(k)
        k *= 2
    return out + [limit]


def width_buckets(limit: int, first: int, step: int) -> list[int]:
    """Key-column buckets from ``first`` below ``limit``, then ``limit``: each power of two and the
    multiple of ``step`` halfway to the next one (256, 384, 512, 768, ...), so a bucket is at most 1.5x
    the columns it stands for."""
    out: list[int] = []
    for k in buckets(limit, first)[:-1]:
        out.append(k)
        half = -(-(k + k // 2) // step) * step
        if k < half < min(2 * k, limit):
            out.append(half)
    return out + [limit]


@contextlib.contextmanager
def capturing(graph: "torch.cuda.CUDAGraph", stream: "torch.cuda.Stream", pool) -> Iterator[None]:
    """Record the block into ``graph`` on ``stream``; unlike ``torch.cuda.graph``, an error in the block
    leaves the stream context cleanly and surfaces as itself, not as capture_end's "previous error".

    ``thread_local``: another thread's CUDA calls (a server thread, a second engine) do not break this
    capture, and this capture does not break theirs."""
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        except BaseException:
            try:
                graph.capture_end()  # ends the (invalidated) capture; its own error says nothing new
            except Exception:  # noqa: BLE001
                pass
            raise
        graph.capture_end()


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
        self.widths = width_buckets(cache.capacity + 1, min(_MIN_WIDTH, cache.capacity + 1), cache.page_size)
        self.pad_id = pad_id
        self.slots = torch.arange(slots, device=device)
        self.seen = torch.ones(slots, dtype=torch.bool, device=device)  # the value a step writes into visible
        self.tokens = torch.full((slots, 1), pad_id, dtype=torch.long, device=device)
        self.positions = torch.full((slots, 1), cache.scratch, dtype=torch.long, device=device)
        self.readout = readout_ids(readout, device)
        self.picked = torch.zeros((slots, 3), dtype=torch.float64, device=device)
        self._staged = torch.empty((2, slots), dtype=torch.long, pin_memory=device.type == "cuda")
        self.capture = device.type == "cuda"
        self.captured = 0  # graphs captured, for the benchmarks' report
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._stream: torch.cuda.Stream | None = None  # the side stream every capture runs on

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
        """Capture every (rows, width) bucket now, largest first, with padding rows only (on a GPU; else
        nothing). Largest first: the blocks the largest step takes from the shared pool are free again
        after its capture, and every smaller step fits in them, so the pool is about one step's worth."""
        for rows in reversed(self.rows):
            for width in reversed(self.widths):
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
        # on the side stream as capture requires; the capture itself records without running. Both on the
        # engine's device, whichever thread runs the engine now.
        use_device(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        stream, current = self._stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self._step(rows, width)
        current.wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with capturing(graph, stream, self._pool):
                self._step(rows, width)
        except Exception as error:
            if is_oom(error):
                raise  # the engine restarts smaller; the next StaticDecode captures again
            logger.warning("CUDA graph capture of the decode step (%d rows, %d columns) failed; decoding "
                           "eagerly from now on", rows, width, exc_info=error)
            self.capture = False
            self._graphs.clear()
            return None  # the warm-up above ran this step
        self._graphs[(rows, width)] = graph
        self.captured += 1
        return graph

    def _step(self, rows: int, width: int) -> None:
        """The step itself: reads and writes only the buffers above (slices of them are fixed addresses)."""
        positions = self.positions[:rows]
        self.cache.place(Placement(self.slots[:rows], positions, width))
        self.visible.index_put_((self.slots[:rows], positions[:, 0]), self.seen[:rows])
        out = self.model(
            input_ids=self.tokens[:rows],
            attention_mask=self.visible[:rows, None, None, :width],
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        pick(out.logits[:, -1, :].float(), self.readout, self.picked[:rows])


def is_oom(error: BaseException) -> bool:
    """Whether an error is a device running out of memory (torch raises some as plain RuntimeErrors)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
