"""Judging one variant of the comparison through the pipeline, and what it cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import pipeline
from .profiling import PeakMemory

if TYPE_CHECKING:  # the ranker pulls in torch
    from ..ranker import Rank1
    from ..io.store import JudgementStore


@dataclass
class VariantRun:
    """One variant's judgements of the items, with what they cost."""

    name: str  # "A" or "B"
    label: str
    settings: dict[str, Any]
    settings_key: str
    result: pipeline.Result
    cost: dict[str, Any] = field(default_factory=dict)


def judge_variant(
    name: str,
    ranker: "Rank1 | Callable[[], Rank1]",
    items: Sequence[pipeline.Item],
    store: "JudgementStore",
    *,
    label: str | None = None,
    flush_every: int | None = None,
    progress: Callable[[int], Any] | None = None,
    on_start: Callable[[int, int], Any] | None = None,
) -> VariantRun:
    """Judge ``items`` with one variant through :func:`rank1_hf.pipeline.judge_items` and measure it.

    ``ranker`` is a loaded :class:`~rank1_hf.ranker.Rank1` or a function that loads one: with a function,
    loading is timed and inside the memory measurement (so quantized weights show up as less memory),
    and the model is released on return. Pairs already in the store are reused and not measured: the
    cost covers only the pairs judged now (None rates when there are none).
    """
    from ..io.store import settings_key

    with PeakMemory() as memory:
        started = time.monotonic()
        loaded = ranker if hasattr(ranker, "judge_iter") else ranker()
        load_s = None if loaded is ranker else time.monotonic() - started
        result = pipeline.judge_items(loaded, items, store, flush_every=flush_every,
                                      shard=pipeline.Shard(), progress=progress, on_start=on_start)
    summary = result.summary
    judged = summary.judged_now
    tokens = result.stats.generated_tokens  # zero when this call judged nothing
    seconds = summary.judging_s
    settings = loaded.settings()
    try:
        weights = int(loaded.model.get_memory_footprint())
    except Exception:  # not every model type reports it; it is a nicety
        weights = None
    device = str(getattr(loaded.model, "device", "?"))
    cost = {
        "judged_now": judged,
        "reused": summary.reused,
        "judging_s": seconds,
        "pairs_per_s": judged / seconds if judged and seconds > 0 else None,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds if judged and seconds > 0 else None,
        "load_s": load_s,
        "peak_memory_bytes": memory.peak_bytes,
        "gpu_peak_bytes": memory.gpu_peak_bytes,
        "rss_delta_bytes": memory.rss_delta_bytes,
        "memory_measure": f"{memory.measure}, over {_span(load_s is not None, judged > 0)}",
        "weights_bytes": weights,
        "device": device,
        "note": _cost_note(judged, summary.reused),
    }
    if loaded is not ranker:
        loaded.close()  # its engine (thread, cache) goes with it
    del loaded
    return VariantRun(name, label or settings.get("model", name), settings, settings_key(settings), result, cost)


def _span(loaded: bool, judged: bool) -> str:
    if loaded:
        return "model load + judging" if judged else "model load only (nothing judged)"
    return "judging" if judged else "nothing (nothing loaded or judged)"


def _cost_note(judged: int, reused: int) -> str:
    if not judged:
        return f"all {reused} distinct pairs were reused from the store: no judging cost measured"
    if reused:
        return f"cost over the {judged} pairs judged now; {reused} were reused from the store"
    return f"cost over all {judged} pairs, judged now"
