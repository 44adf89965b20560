"""A KV cache with fixed addresses: one slot per row in flight, allocated once, written in place.

Each attention layer owns two buffers of shape (slots, kv_heads, capacity + 1, head_dim) on that layer's
device (so accelerate device maps work). A row lives in one slot, its token at position p in column p;
the last column is scratch, where padded inputs write so that a real column is never overwritten.

The engine hands the model a :class:`SlotCache` as ``cache=`` for every forward call; Qwen2, Llama and
Mistral attention call ``cache.update(keys, values, layer_idx)``, which writes the new keys and values
into the rows' slots and returns the keys and values the attention must read. For a decode step over
slots ``0..n-1`` that is a view of the buffers (no copy), so a step's cost does not grow with what the
cache holds beyond the attention itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass
class Placement:
    """Where one forward call's inputs go in the cache.

    slots: (rows,) slot of each input row.
    positions: (rows, width_in) column each input token is written to (the scratch column for padding).
    width: key columns the attention reads (0..width-1), the same for every row.
    start: when the slots are ``start..start+rows-1``, reading them is a view; None: a gather.
    """

    slots: torch.Tensor
    positions: torch.Tensor
    width: int
    start: int | None


class SlotCache(Cache):
    """Per-layer key/value buffers with one slot per row, passed to the model as ``cache=``."""

    def __init__(self, model: torch.nn.Module, slots: int, capacity: int):
        # Cache's own layer machinery is not used: update() below is the whole interface the
        # attention layers of Qwen2, Llama and Mistral call.
        self.layers = []
        self.slots = slots
        self.capacity = capacity
        layers = model.config.get_text_config().num_hidden_layers
        # Allocated on a layer's first update, with the device and dtype its attention works in (that
        # covers device maps, offloading and quantized projections alike); never reallocated after.
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.placement: Placement | None = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scratch(self) -> int:
        """The column padded inputs write to."""
        return self.capacity

    def place(self, placement: Placement) -> None:
        """Set where the next forward call's inputs go."""
        self.placement = placement
        self._on_device = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # One copy of the placement per device of a device-map split, made once per forward call.
        found = self._on_device.get(device)
        if found is None:
            p = self.placement
            found = self._on_device[device] = (p.slots.to(device)[:, None], p.positions.to(device))
        return found

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (rows, kv_heads, width_in, head_dim) keys/values in place; return what attention reads."""
        p = self.placement
        if self.keys[layer_idx] is None:
            rows, kv_heads, _, head_dim = key_states.shape
            shape = (self.slots, kv_heads, self.capacity + 1, head_dim)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        slots, positions = self._indices(keys.device)
        # Advanced indices on dims 0 and 2 put those dims first: (rows, width_in, kv_heads, head_dim).
        keys[slots, :, positions] = key_states.transpose(1, 2)
        values[slots, :, positions] = value_states.transpose(1, 2)
        if p.start is not None:
            rows = slice(p.start, p.start + slots.shape[0])
            return keys[rows, :, : p.width], values[rows, :, : p.width]
        return keys[slots[:, 0], :, : p.width], values[slots[:, 0], :, : p.width]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` columns of slot ``source`` into slot ``target`` (compaction)."""
        for buffer in (*self.keys, *self.values):
            if buffer is not None:
                buffer[target, :, :length] = buffer[source, :, :length]

    def grown(self, capacity: int, lengths: list[int]) -> "SlotCache":
        """A cache with more columns per slot holding the same rows (slot k keeps its first lengths[k])."""
        new = SlotCache.__new__(SlotCache)
        new.layers, new.slots, new.capacity = [], self.slots, capacity
        new.keys, new.values, new.placement, new._on_device = [], [], None, {}
        for old, out in ((self.keys, new.keys), (self.values, new.values)):
            for buffer in old:
                if buffer is None:
                    out.append(None)
                    continue
                grown = buffer.new_zeros((buffer.shape[0], buffer.shape[1], capacity + 1, buffer.shape[3]))
                for slot, length in enumerate(lengths):
                    grown[slot, :, :length] = buffer[slot, :, :length]
                out.append(grown)
        return new

    # The few Cache queries transformers may make of a cache it did not build.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.placement.width if self.placement else 0, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.keys)


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token takes in all layers (at the model's floating dtype)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(model, "dtype", torch.float32)
    itemsize = dtype.itemsize if dtype.is_floating_point else 2
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize
