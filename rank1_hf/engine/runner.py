"""The model side of the continuous engine: the paged pool, the forward calls, the captured decode step
and the fast output head.

Every forward call is a plain ``model(...)`` with a :class:`~rank1_hf.engine.kv_cache.PagedCache` as ``cache=``
and an explicit mask, so the model code stays transformers'. On one GPU with plain weights and sdpa
attention, decode steps replay CUDA graphs (decode_step.py).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .decode_step import StaticDecode, additive_mask, graphable, is_oom, pick, readout_ids
from ..model.devices import input_device
from .types import DecodeSettings
from .head import fast_head
from ..model.kv_budget import PAGE_SIZE, pages_for
from .kv_cache import PagedCache, Placement
from .pages import PageAllocator
from .scheduler import Compaction

# Room in a slot beyond prompt + max_new_tokens for the closing tokens ("\n</think>" and re-tokenization).
CLOSE_MARGIN = 64


def supports(model: PreTrainedModel) -> bool:
    """Plain full-attention KV caches with sdpa or eager attention (no sliding window, no hybrid layers)."""
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class ModelRunner:
    """Runs a model over a paged pool: row ``k`` of a call lives in slot ``k`` of the pool's tables."""

    def __init__(self, model: PreTrainedModel, settings: DecodeSettings):
        self.model = model
        self.settings = settings
        self.cache: PagedCache | None = None
        self._sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        # On one GPU with plain weights, decode steps are CUDA graphs (decode_step.py); its boolean mask
        # is taken as is by sdpa attention only.
        self._static_step = graphable(model) and self._sdpa
        self._static: StaticDecode | None = None  # bound to the current cache and mask
        self._head = contextlib.ExitStack()  # the fast output head, in place while rows are in flight

    @property
    def captures(self) -> bool:
        """Plain decode steps replay CUDA graphs (one GPU, plain weights, sdpa)."""
        return self._static_step

    # ---- the pool ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def pool(self, slots: int, kv_tokens: int) -> PageAllocator:
        """The pool's allocator, made with the cache the first time: ``slots`` tables over ``kv_tokens``."""
        if self.cache is None:
            row_tokens = self.settings.context_size + CLOSE_MARGIN
            row_pages = pages_for(row_tokens, PAGE_SIZE)
            # Never more pages than every slot could fill: the pool is allocated (zeroed) whole.
            pages = min(kv_tokens // PAGE_SIZE, slots * row_pages)
            self.cache = PagedCache(self.model, PageAllocator(slots, pages + 1, row_pages, PAGE_SIZE))
            self._visible = torch.zeros((slots, self.cache.capacity + 1), dtype=torch.bool,
                                        device=input_device(self.model))
            if self._static_step:
                s = self.settings
                self._static = StaticDecode(self.model, self.cache, self._visible, s.readout, s.pad_id)
        return self.cache.allocator

    def capture(self) -> None:
        """Capture every decode bucket now (on a GPU; it writes every slot's scratch column)."""
        if self._static is not None:
            self._static.capture_all()

    def drop_pool(self) -> None:
        self.cache = self._static = None

    def compact(self, compaction: Compaction) -> None:
        """Mirror the scheduler's compaction in the mask: moved rows keep what they see, emptied slots see nothing."""
        for source, target in compaction.moves:
            self._visible[target] = self._visible[source]
        self._visible[compaction.left : compaction.before] = False

    # ---- the output head -----------------------------------------------------------------------------

    def head_on(self) -> None:
        if not self._head._exit_callbacks:  # type: ignore[attr-defined]
            self._head.enter_context(fast_head(self.model, self.settings.readout))

    def head_off(self) -> None:
        """Put the model's own output head back."""
        self._head.close()

    # ---- forward calls -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, slots: list[int], inputs: list[list[int]], offsets: list[int], every: bool = False) -> torch.Tensor:
        """One model call: row r's ``inputs[r]`` go to positions ``offsets[r]..`` of slot ``slots[r]``, seeing
        positions 0.. of that slot (a prefix already there, such as shared prompt pages, is read, not run).

        Rows are left-padded to a common width; padding writes to the cache's scratch page and attends to
        column 0 only. Returns the last position's logits, (rows, vocab) float32, or with ``every`` the
        logits of every input position, (rows, width, vocab) (row r's inputs are its last len(inputs[r])).
        """
        cache, device = self.cache, input_device(self.model)
        cache.sync()
        width_in = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width_in), self.settings.pad_id, dtype=torch.long)
        positions = torch.full((len(inputs), width_in), cache.scratch, dtype=torch.long)
        for r, (tokens, offset) in enumerate(zip(inputs, offsets)):
            pad = width_in - len(tokens)
            ids[r, pad:] = torch.tensor(tokens, dtype=torch.long)
            positions[r, pad:] = torch.arange(offset, offset + len(tokens))
        width = max(o + len(x) for x, o in zip(inputs, offsets))
        # Query at position p sees columns 0..p; a padding query sees column 0 only (its output is unused).
        columns = torch.arange(width)
        seen = positions.clamp(max=width - 1)
        seen[positions == cache.scratch] = 0
        mask = columns[None, None, :] <= seen[:, :, None]
        cache.place(Placement(torch.tensor(slots), positions, width))
        for slot, length in zip(slots, [o + len(x) for x, o in zip(inputs, offsets)]):
            self._visible[slot, :length] = True
            self._visible[slot, length:] = False
        logits = self._logits(ids, positions.clamp(max=cache.capacity - 1), mask[:, None], device, width_in if every else 1)
        return logits if every else logits[:, -1]

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, device, keep: int = 1) -> torch.Tensor:
        if not self._sdpa:  # eager attention adds its mask
            mask = additive_mask(mask, self.model.dtype)
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),  # 4D: transformers uses it as given
            position_ids=positions.to(device),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits.float()

    @torch.inference_mode()
    def decode(self, last: list[int], cached: list[int]) -> list[tuple[float, float, float]]:
        """One token for rows in slots 0..n-1 (``last`` token of each, ``cached`` tokens before it): inputs,
        mask and cache reads are views or O(rows). (greedy token, true logit, false logit) per row."""
        n = len(last)
        self.cache.sync()
        if self._static is not None:
            return self._static.run(last, cached)
        positions = torch.tensor(cached, dtype=torch.long)[:, None]
        width = max(cached) + 1
        self.cache.place(Placement(torch.arange(n), positions, width))
        self._visible[torch.arange(n), positions[:, 0]] = True
        mask = self._visible[:n, None, None, :width]
        ids = torch.tensor(last, dtype=torch.long)[:, None]
        return self.pick(self._logits(ids, positions, mask, input_device(self.model))[:, -1])

    @torch.inference_mode()
    def verify(self, inputs: list[list[int]], cached: list[int]) -> list[list[tuple[float, float, float]]]:
        """Rows in slots 0..n-1 run their last token and its drafts (``inputs[r]``, written from position
        ``cached[r]``) in one call: (greedy token, true logit, false logit) at every input position.

        Eager on every device (the captured step runs one token per row). The caller keeps what it accepts
        and hides the rest with :meth:`forget`.
        """
        logits = self.forward(list(range(len(inputs))), inputs, cached, every=True)
        width = logits.shape[1]
        picked = self.pick(logits.reshape(-1, logits.shape[-1]))
        return [picked[r * width + width - len(x) : (r + 1) * width] for r, x in enumerate(inputs)]

    def forget(self, slot: int, start: int) -> None:
        """Positions ``start``.. of ``slot`` hold nothing any more (rejected drafts): no step attends to them."""
        self._visible[slot, start:] = False

    def pick(self, logits: torch.Tensor) -> list[tuple[float, float, float]]:
        """(greedy token, true logit, false logit) per row of (rows, vocab) logits: one device-to-host copy."""
        picked = torch.empty((len(logits), 3), dtype=torch.float64, device=logits.device)
        pick(logits, readout_ids(self.settings.readout, logits.device), picked)
        return picked.tolist()

    def readouts(self, logits: torch.Tensor) -> list[tuple[float, float]]:
        """(true, false) logits per row."""
        return [(t, f) for t, f in logits[:, list(self.settings.readout)].tolist()]
