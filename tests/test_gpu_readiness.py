"""What a CUDA graph of the decode step needs, checked on CPU (issue 38).

A captured step may not copy a host value to the device, read a device value on the host or make a
data-dependent shape, and every replay must see the same op shapes over the same addresses; capture must
run on the engine's device and a stream of it, and a failed capture must say why. Without a GPU these are
checked by running the step's body under a dispatch mode and by standing in for ``torch.cuda``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from collections import deque
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rank1_hf import Rank1
from rank1_hf.engine import decode_step, runner
from rank1_hf.model import devices, loading
from rank1_hf.engine.decode_step import StaticDecode, additive_mask, readout_ids
from rank1_hf.engine.continuous import ContinuousEngine
from rank1_hf.model.kv_budget import PAGE_SIZE, default_kv_memory, pages_for
from rank1_hf.engine.kv_cache import PagedCache
from rank1_hf.engine.pages import PageAllocator
from rank1_hf.testing import tiny_model

aten = torch.ops.aten
# Ops that read a device value on the host (a sync, not allowed in a capture) or make a shape from data.
_HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default,
               aten.masked_select.default}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class StepAudit(TorchDispatchMode):
    """Records every op of a block with its tensors' shapes and, for tensors allocated before the block
    (weights, pools, the step's buffers), their addresses; lists what a capture would not allow.

    A tensor that is neither allocated ahead nor made by an op of the block came from a host value
    (``lift_fresh``: Python's ``x[i] = True`` or ``torch.tensor(...)``): on a GPU that is a host-to-device
    copy inside the capture."""

    def __init__(self, ahead: list[torch.Tensor]):
        super().__init__()
        self.ahead = {_storage(t) for t in ahead}
        self.made: set[int] = set()
        self.trace: list[tuple] = []
        self.problems: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if func in _HOST_READS:
            self.problems.append(f"{func}: reads a device value on the host")
        if func is aten.lift_fresh.default:
            self.problems.append(f"{func}: a host value made a tensor inside the step")
        for t in inputs:
            if t.dim() and _storage(t) not in self.ahead | self.made:  # 0-dim: wrapped Python scalars
                self.problems.append(f"{func}: reads a {tuple(t.shape)} tensor from outside the step")
        if func in (aten._to_copy.default, aten.copy_.default) and len({t.device for t in inputs}) > 1:
            self.problems.append(f"{func}: copies between devices")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.made.add(_storage(t))
        self.trace.append((str(func), tuple(
            (tuple(t.shape), t.dtype, _storage(t) if _storage(t) in self.ahead else None) for t in inputs)))
        return out


def _cache(model, slots: int, pages: int, row_tokens: int) -> PagedCache:
    """A pool of ``pages`` pages (page 0 scratch) for ``slots`` rows of ``row_tokens`` tokens at most."""
    return PagedCache(model, PageAllocator(slots, pages, pages_for(row_tokens, PAGE_SIZE), PAGE_SIZE))


def _static(tokenizers, slots: int = 4) -> StaticDecode:
    model = tiny_model(tokenizers["qwen"], "qwen2", layers=2)
    cache = _cache(model, slots, pages=24, row_tokens=100)
    visible = torch.zeros((slots, cache.capacity + 1), dtype=torch.bool)
    return StaticDecode(model, cache, visible, readout=(11, 12), pad_id=0)


def _rows(static: StaticDecode, cached: list[int]) -> tuple[list[int], list[int]]:
    """Rows 0..n-1 holding ``cached`` tokens each, as the engine leaves them before a step."""
    pages = static.cache.allocator
    for k, n in enumerate(cached):
        pages.release(k)
        assert pages.grow(k, n + 1)
        static.visible[k] = False
        static.visible[k, :n] = True
    static.cache.sync()
    return [100 + k for k in range(len(cached))], cached


def _ahead(static: StaticDecode) -> list[torch.Tensor]:
    cache = static.cache
    return [*static.model.parameters(), *static.model.buffers(), *cache.keys, *cache.values, *cache._tables.values(),
            static.slots, static.seen, static.tokens, static.positions, static.readout, static.picked, static.visible]


def _audited(static: StaticDecode, cached: list[int]) -> StepAudit:
    """Run one step over ``cached``, its body (what a capture records) under a :class:`StepAudit`."""
    body, audits = static._step, []

    def step(rows: int, width: int) -> None:
        with StepAudit(_ahead(static)) as audit:
            body(rows, width)
        audits.append(audit)

    static._step = step
    try:
        static.run(*_rows(static, cached))
    finally:
        del static._step
    return audits[0]


@pytest.fixture
def gpu_argmax(monkeypatch):
    """greedy_tokens as it runs on a GPU (argmax); its CPU-only fast path checks for NaN on the host."""
    monkeypatch.setattr(decode_step, "greedy_tokens", lambda logits: logits.argmax(-1))


def test_the_step_body_copies_no_host_value_reads_no_device_value_and_makes_no_data_shape(tokenizers, gpu_argmax):
    static = _static(tokenizers)
    static.run(*_rows(static, [5, 9, 3]))  # the pools are allocated on a first step, as on a GPU's warm-up
    audit = _audited(static, [6, 10, 4])
    assert len(audit.trace) > 50  # the whole model ran under the audit
    assert audit.problems == []


def test_two_row_states_in_one_bucket_replay_the_same_ops_over_the_same_addresses(tokenizers, gpu_argmax):
    static = _static(tokenizers)
    static.run(*_rows(static, [5, 9, 3]))
    first = _audited(static, [6, 40, 4])  # 3 rows and a padding row; 41 columns
    second = _audited(static, [70, 2, 11, 33])  # 4 rows; 71 columns: the same (4, 96) bucket
    assert static.bucket(3, 41) == static.bucket(4, 71)
    assert first.trace == second.trace  # every op, shape, dtype and allocated-ahead address
    addresses = {a for _, ts in first.trace for *_, a in ts if a is not None}
    for buffer in (static.tokens, static.positions, static.visible, static.picked, *static.cache._tables.values(),
                   *static.cache.keys, *static.cache.values):
        assert _storage(buffer) in addresses


# ---- capture, with torch.cuda stood in for --------------------------------------------------------------


class FakeCuda:
    """The torch.cuda calls capture makes, recorded: the current device, the stream each block runs on,
    the graphs' capture arguments. ``fail`` raises inside the step while a capture records it."""

    def __init__(self, monkeypatch, fail: BaseException | None = None):
        self.events: list[tuple] = []
        self.device = 0
        self.on: list[object] = []  # the stream context stack
        self.capturing = False
        self.fail = fail
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = device
                fake.events.append(("stream", device))

            def wait_stream(self, other):
                pass

        class Graph:
            def capture_begin(self, pool=None, capture_error_mode="global"):
                fake.events.append(("begin", pool, capture_error_mode, fake.on[-1] if fake.on else None, fake.device))
                fake.capturing, fake.failed = True, False

            def capture_end(self):
                failed, fake.capturing = fake.failed, False
                if failed:  # what CUDA says when the captured work went wrong
                    raise RuntimeError("operation failed due to a previous error during capture")

            def replay(self):
                fake.events.append(("replay",))
                getattr(self, "body", lambda: None)()  # what the captured kernels would do

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                fake.on.append(self.stream)

            def __exit__(self, *exc):
                fake.on.pop()

        def set_device(device):
            fake.device = torch.device(device).index
            fake.events.append(("set_device", torch.device(device)))

        self.failed = False
        for name, value in dict(Stream=Stream, CUDAGraph=Graph, stream=StreamContext, set_device=set_device,
                                current_device=lambda: fake.device,
                                current_stream=lambda device=None: Stream("current"),
                                synchronize=lambda device=None: None, graph_pool_handle=lambda: "POOL").items():
            monkeypatch.setattr(torch.cuda, name, value)

    def step_hook(self, module, args, kwargs):
        if self.capturing and self.fail is not None:
            self.failed = True
            raise self.fail


def _capturing_static(tokenizers, monkeypatch, fail=None) -> tuple[StaticDecode, FakeCuda]:
    static = _static(tokenizers)
    cuda = FakeCuda(monkeypatch, fail)
    static.capture, static._pool, static.device = True, torch.cuda.graph_pool_handle(), torch.device("cuda", 1)
    static.model.register_forward_pre_hook(cuda.step_hook, with_kwargs=True)
    return static, cuda


def test_capture_runs_on_the_engines_device_on_a_stream_of_it_in_thread_local_mode(tokenizers, monkeypatch):
    static, cuda = _capturing_static(tokenizers, monkeypatch)
    static.run(*_rows(static, [5, 9, 3]))
    static.run(*_rows(static, [6, 90]))  # another bucket: captured on the same stream
    begins = [e for e in cuda.events if e[0] == "begin"]
    streams = [e for e in cuda.events if e[0] == "stream" and e[1] != "current"]
    assert streams == [("stream", torch.device("cuda", 1))]
    assert len(begins) == 2 == static.captured
    for _, pool, mode, stream, device in begins:
        assert (pool, mode, device) == ("POOL", "thread_local", 1)
        assert stream is not None and stream.device == torch.device("cuda", 1)
    assert cuda.events.index(("set_device", torch.device("cuda", 1))) < cuda.events.index(streams[0])
    assert [e for e in cuda.events if e[0] == "replay"] == [("replay",)] * 2
    assert cuda.on == []


def test_a_failed_capture_logs_its_own_error_leaves_the_stream_and_decodes_eagerly(tokenizers, monkeypatch, caplog):
    static, cuda = _capturing_static(tokenizers, monkeypatch, fail=ValueError("the real cause"))
    last, cached = _rows(static, [5, 9, 3])
    with caplog.at_level(logging.WARNING, logger="rank1_hf.engine.decode_step"):
        picked = static.run(last, cached)
    assert cuda.on == []  # back on the current stream
    (record,) = [r for r in caplog.records if "capture" in r.getMessage()]
    assert isinstance(record.exc_info[1], ValueError) and "the real cause" in str(record.exc_info[1])
    assert not static.capture and static.captured == 0
    eager = _static(tokenizers)  # the same weights: the warm-up before the capture ran the step
    want = eager.run(*_rows(eager, [5, 9, 3]))
    assert [x for row in picked for x in row] == pytest.approx([x for row in want for x in row])


def test_out_of_memory_in_a_capture_is_raised_for_the_engines_smaller_restart(tokenizers, monkeypatch):
    static, cuda = _capturing_static(tokenizers, monkeypatch, fail=torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        static.run(*_rows(static, [5, 9, 3]))
    assert static.capture and cuda.on == []  # graphs stay on: the engine's next StaticDecode captures again


class Capturing(StaticDecode):
    """A StaticDecode that takes the capture path on CPU (torch.cuda stood in for)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture, self._pool = True, "POOL"

    def _capture(self, rows, width):
        graph = super()._capture(rows, width)
        if graph is not None:
            graph.body = lambda: self._step(rows, width)
        return graph


def test_out_of_memory_while_capturing_restarts_the_engine_smaller(tokenizers, monkeypatch):
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", layers=2)
    ooms = []

    def hook(module, args, kwargs):
        if cuda.capturing and not ooms:
            ooms.append(1)
            cuda.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected in a capture)")

    cuda = FakeCuda(monkeypatch)
    model.register_forward_pre_hook(hook, with_kwargs=True)
    monkeypatch.setattr(runner, "graphable", lambda model: True)
    monkeypatch.setattr(runner, "StaticDecode", Capturing)
    pairs = [("cat", "a cat sat on the mat"), ("dog", "dogs bark at night"), ("oven", "bread in the oven"),
             ("law", "the court and the judge")]
    ranker = Rank1.from_model(model, tok, max_new_tokens=6, engine="continuous", batch_size=4)
    got = ranker.judge_with_stats(pairs)
    rows_limit = ranker.core.worker.call(lambda e: e.scheduler.rows_limit)
    ranker.close()
    assert ooms == [1] and got.stats.oom_retries == 1 and rows_limit == 2
    monkeypatch.setattr(runner, "graphable", lambda model: False)
    want = Rank1.from_model(model, tok, max_new_tokens=6, engine="continuous", batch_size=4).judge(pairs)
    assert [j.reasoning for j in got.judgements] == [j.reasoning for j in want]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(got.judgements, want))


def test_warmup_captures_largest_bucket_first_and_out_of_memory_there_restarts_smaller(tokenizers, monkeypatch):
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", layers=1)
    cuda = FakeCuda(monkeypatch)
    order = []
    monkeypatch.setattr(runner, "graphable", lambda model: True)
    monkeypatch.setattr(runner, "StaticDecode", Capturing)
    ranker = Rank1.from_model(model, tok, max_new_tokens=6, engine="continuous", batch_size=4)
    def capture(self, rows, width):
        order.append((rows, width))
        return StaticDecode._capture(self, rows, width)

    monkeypatch.setattr(Capturing, "_capture", capture)
    ranker.warmup()
    static = ranker.core.worker.call(lambda e: e.runner._static)
    assert order[0] == (static.rows[-1], static.widths[-1]) and len(order) == len(static.rows) * len(static.widths)
    assert order == sorted(order, reverse=True)
    ranker.close()

    def oom(self, rows, width):
        cuda.events.append(("oom",))
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(Capturing, "_capture", oom)
    ranker = Rank1.from_model(model, tok, max_new_tokens=6, engine="continuous", batch_size=4)
    ranker.warmup()  # no error: the engine halves its rows and pool, as after an out-of-memory step
    stats, rows_limit = ranker.core.worker.call(lambda e: (e.stats, e.scheduler.rows_limit))
    assert stats.oom_retries == 1 and rows_limit == 2
    ranker.close()


# ---- the engine's device, whichever thread drives it ----------------------------------------------------


def test_every_engine_entry_makes_the_engines_device_current(tokenizers, monkeypatch):
    cuda = FakeCuda(monkeypatch)
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", layers=1)
    ranker = Rank1.from_model(model, tok, max_new_tokens=6, engine="continuous", batch_size=2)
    eng = ContinuousEngine(model, ranker.core.settings)
    eng.device = torch.device("cuda", 1)
    for entry in (lambda: eng.warmup(), lambda: eng.step(deque()), lambda: eng.drop(set())):
        cuda.device = 0  # a fresh caller thread's device
        entry()
        assert cuda.device == 1


def test_use_device_leaves_cpu_alone_and_skips_a_device_already_current(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    devices.use_device(torch.device("cpu"))
    cuda.device = 2
    devices.use_device(torch.device("cuda", 2))
    assert cuda.events == []


# ---- eager attention's mask, the readout ids, the page table copy ---------------------------------------


def test_the_additive_mask_is_made_on_the_masks_device():
    mask = torch.ones((2, 1, 1, 5), dtype=torch.bool, device="meta")
    assert additive_mask(mask, torch.bfloat16).device == mask.device
    cpu = torch.tensor([[True, False]])
    assert additive_mask(cpu, torch.float32).tolist() == [[0.0, torch.finfo(torch.float32).min]]


def test_eager_attention_engine_builds_its_mask_with_additive_mask(tokenizers, monkeypatch):
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", layers=1)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    calls = []
    monkeypatch.setattr(runner, "additive_mask",
                        lambda mask, dtype: calls.append(mask.device) or additive_mask(mask, dtype))
    Rank1.from_model(model, tok, max_new_tokens=4, engine="continuous").judge([("cat", "a cat")])
    assert calls  # prefill and every decode step


def test_readout_ids_are_made_once_per_device():
    first = readout_ids((11, 12), torch.device("cpu"))
    assert first.tolist() == [11, 12] and readout_ids((11, 12), torch.device("cpu")) is first


def test_the_page_table_goes_to_the_device_from_a_staged_copy_without_blocking(tokenizers):
    model = tiny_model(tokenizers["qwen"], "qwen2", layers=1)
    cache = _cache(model, 2, pages=8, row_tokens=64)
    cache.attach(torch.device("cpu"))
    cache._pinned = torch.empty_like(cache.table)  # what attach() stages on a GPU (pinning needs CUDA)
    assert cache.allocator.grow(0, 40)
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.copy_.default:
                copies.append((_storage(args[1]), args[2] if len(args) > 2 else (kwargs or {}).get("non_blocking")))
            return func(*args, **(kwargs or {}))

    with Copies():
        cache.sync()
    assert (_storage(cache._pinned), True) in copies
    device_table = cache._tables[torch.device("cpu")]
    assert device_table[0, :2].tolist() == cache.table[0, :2].tolist() and device_table[:, -1].tolist() == [0, 0]


# ---- the default KV pool ---------------------------------------------------------------------------------


class _Layer(torch.nn.Module):
    """An attention layer's k_proj whose weights sit on the meta device (offloaded, or on a GPU we do
    not have) and which computes on ``execution`` (an accelerate hook's execution device)."""

    def __init__(self, execution):
        super().__init__()
        self.k_proj = torch.nn.Linear(4, 4, device="meta")
        self.k_proj._hf_hook = types.SimpleNamespace(execution_device=execution)


def _fake_model(executions) -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(_Layer(e) for e in executions)
    return model


GiB = 2**30


def _memory(monkeypatch, free, total, reserved, allocated):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[torch.device(device).index], total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated[torch.device(device).index])


def test_the_default_pool_counts_memory_the_allocator_holds_unused(monkeypatch):
    _memory(monkeypatch, free={0: 20 * GiB}, total=80 * GiB, reserved={0: 30 * GiB}, allocated={0: 16 * GiB})
    # free to the card 20 GiB + 14 GiB cached by torch, less 10% of 80 GiB
    assert default_kv_memory(_fake_model([0, 0])) == 26 * GiB


def test_offloaded_layers_count_on_the_gpu_they_compute_on(monkeypatch):
    _memory(monkeypatch, free={0: 18 * GiB, 1: 38 * GiB}, total=80 * GiB, reserved={0: 0, 1: 0}, allocated={0: 0, 1: 0})
    # 3 layers compute (and keep their keys and values) on cuda:0, one on cuda:1: cuda:0 bounds the pool
    assert default_kv_memory(_fake_model([0, 0, "cuda:0", 1])) == (18 - 8) * GiB * 4 // 3


# ---- bitsandbytes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bnb_4bit_computes_in_the_models_dtype(monkeypatch, dtype):
    monkeypatch.setattr(loading, "_require", lambda *args: None)
    config = types.SimpleNamespace(quantization_config=None)
    assert loading._quantization_config("bnb-4bit", config, dtype).bnb_4bit_compute_dtype == dtype


# ---- benchmarks/gpu_run.sh: one device call that surely ends in time -------------------------------------

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("steps", "gather", "workload", "speculation", "check")


def test_gpu_run_timeouts_add_up_to_under_eight_minutes():
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    stages = dict(re.findall(r"^stage (\w+) (\d+) ", script, re.M))
    setup = [int(s) for s in re.findall(r"^\s*timeout (\d+) ", script, re.M)]  # the install and the version check
    assert set(stages) == set(STAGES) and len(setup) == 2
    assert sum(int(s) + 5 for s in stages.values()) + sum(setup) <= 480  # timeout -k 5: 5 s more each


def test_gpu_run_dry_run_on_cpu_prints_every_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    run = subprocess.run(["timeout", "480", "bash", "benchmarks/gpu_run.sh", "--shape", "tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    for stage in STAGES:
        assert f"=== {stage}: exit 0" in out, out[-3000:]
        assert (tmp_path / f"{stage}.log").read_text().strip()
    for row in ("| continuous | 1 |", "| continuous-eager | 2 |", "| whole pages, 1.5x buckets |",
                "| continuous | 4 |", "| continuous-lookup | 4 |",
                "| small random Qwen2 packed as AWQ int4 vs bf16 twin (cpu) | PASS |"):
        assert row in out, row
    assert out.count("graphs: 0 captured") == 3  # reported by every gpu_throughput run (none on CPU)
    assert "=== done in" in out


# ---- quantized models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def awq_model(tokenizers, tmp_path_factory):
    from awq_fixture import build_awq_checkpoint

    target = tmp_path_factory.mktemp("awq") / "tiny-awq"
    build_awq_checkpoint(tokenizers["qwen"], target, seed=0)
    return loading.load_model(str(target))[0]


def test_rank1_awq_layers_are_capturable_and_other_quantized_models_are_not(awq_model, tokenizers):
    assert any(isinstance(m, decode_step.AwqLinear) for m in awq_model.modules())
    assert decode_step.capturable_layers(awq_model)
    plain = tiny_model(tokenizers["qwen"], "qwen2", layers=1)
    assert decode_step.capturable_layers(plain)
    plain.config.quantization_config = {"quant_method": "bitsandbytes"}  # quantized by another library
    assert not decode_step.capturable_layers(plain)


def test_the_awq_step_body_copies_no_host_value_and_reads_no_device_value(awq_model, gpu_argmax):
    cache = _cache(awq_model, 4, pages=24, row_tokens=100)
    visible = torch.zeros((4, cache.capacity + 1), dtype=torch.bool)
    static = StaticDecode(awq_model, cache, visible, readout=(11, 12), pad_id=0)
    static.run(*_rows(static, [5, 9, 3]))
    audit = _audited(static, [6, 10, 4])
    layouts = {m.layout for m in awq_model.modules() if isinstance(m, decode_step.AwqLinear)}
    kernel = {"cpu": "_weight_int4pack_mm_for_cpu", "dequant": "aten.mm"}[layouts.pop()]
    assert any(kernel in op for op, _ in audit.trace)  # the int4 layers ran under the audit
    assert audit.problems == []
