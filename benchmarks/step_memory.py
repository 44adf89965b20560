"""Does a decode step allocate or copy more as the cache fills? torch.profiler's bytes per step, early vs late.

    python benchmarks/step_memory.py

Judges 8 pairs planted to reason 600 tokens with the continuous engine, profiling decode steps while the
rows hold about 150 tokens and again while they hold about 700; prints the bytes allocated per step
(``profile_memory``), the bytes moved by copy/cat/index ops per step, and whether the cache buffers kept
their addresses. An engine that grows or re-pads its cache per step shows the late figures growing with
the cache; a fixed-address cache shows them flat.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from plant import plant_lengths  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.engine.kv_cache import PagedCache  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, same_length_pairs, tiny_model  # noqa: E402
from rank1_hf.prompt import build_prompt  # noqa: E402

WINDOWS = {"early (~150 tokens cached)": (40, 60), "late (~700 tokens cached)": (570, 590)}


def main() -> None:
    tok = qwen_tokenizer()
    model = tiny_model(tok, "qwen2", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, initializer_range=0.02)
    # one prompt length, so every row gets the planted length; distinct, as identical pairs are judged once
    pairs = same_length_pairs(tok, 8, "passage " * 100)
    n = len(tok(build_prompt(*pairs[0]))["input_ids"])
    handle = plant_lengths(model, tok, {n: 600})
    ranker = Rank1.from_model(model, tok, max_new_tokens=640, engine="continuous", batch_size=8, show_progress_bar=False)
    state = {"step": 0, "addresses": set()}
    results = {}
    update = PagedCache.update

    def spy(self, keys, values, layer_idx, *args, **kwargs):
        out = update(self, keys, values, layer_idx, *args, **kwargs)
        state["addresses"].add((layer_idx, self.keys[layer_idx].data_ptr()))
        return out

    PagedCache.update = spy
    profiler = None

    def on_step(module, args, kwargs, output):
        nonlocal profiler
        if kwargs["input_ids"].shape[1] != 1:
            return
        state["step"] += 1
        for name, (start, stop) in WINDOWS.items():
            if state["step"] == start:
                profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                profiler.__enter__()
            if state["step"] == stop and profiler is not None:
                profiler.__exit__(None, None, None)
                events = profiler.key_averages()
                allocated = sum(max(e.self_cpu_memory_usage, 0) for e in events)
                moved = sum(max(e.self_cpu_memory_usage, 0) for e in events if e.key in ("aten::cat", "aten::copy_", "aten::index", "aten::clone"))
                results[name] = (allocated / (stop - start), moved / (stop - start))
                profiler = None

    hook = model.register_forward_hook(on_step, with_kwargs=True)
    try:
        ranker.judge(pairs)
    finally:
        PagedCache.update = update
        hook.remove()
        handle.remove()
    print("| window | bytes allocated per decode step | of which cat/copy/index/clone |")
    print("|---|---|---|")
    for name, (allocated, moved) in results.items():
        print(f"| {name} | {allocated / 2**10:.0f} KiB | {moved / 2**10:.0f} KiB |")
    layers = {layer for layer, _ in state["addresses"]}
    print(f"\ncache buffer addresses seen per layer: {len(state['addresses']) // max(len(layers), 1)} "
          f"(1 = never reallocated), over {state['step']} decode steps")


if __name__ == "__main__":
    main()
