"""A paged KV cache: one pool of fixed-size pages per layer, allocated once; rows hold only the pages they use.

rank1's reasoning is mostly a few hundred tokens, but a row may run to ``max_new_tokens`` (8,192 by
default). Reserving that much per row would decide how many rows decode together; here a row takes a page
of ``page_size`` tokens when it reaches it, and gives all its pages back when it finishes, so the rows in
flight are bounded by the keys and values they hold (the engine preempts the newest row when the pool is
full; engine.py).

Each attention layer owns two buffers of shape (pages x page_size, kv_heads, head_dim), on that layer's
device (so accelerate device maps work). Page 0 is scratch: padded inputs write there and unused table
entries point there (always masked out). Row ``k`` of a forward call lives in table row ``k``: its token at
position ``p`` is at ``table[k, p // page_size] * page_size + p % page_size``. The table has a fixed
address on every device, updated in place before each forward call (:meth:`PagedCache.sync`), so the
index arithmetic of a decode step is plain tensor work that a CUDA graph can replay.

The engine hands the model a :class:`PagedCache` as ``cache=``; Qwen2, Llama and Mistral attention call
``cache.update(keys, values, layer_idx)``, which writes the new keys and values into their pages and
returns the keys and values the attention reads, gathered into (rows, kv_heads, width, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .devices import free_memory, module_device

# Tokens per page: the measured candidates and the choice are in benchmarks/RESULTS.md (issue 23).
PAGE_SIZE = 32


@dataclass
class Placement:
    """Where one forward call's inputs go in the cache.

    slots: (rows,) table row of each input row.
    positions: (rows, width_in) position each input token is written to (``scratch`` for padding).
    width: positions the attention reads (0..width-1), the same for every row.
    """

    slots: torch.Tensor
    positions: torch.Tensor
    width: int


class PagedCache(Cache):
    """Per-layer pools of pages, a page table with one row per slot, passed to the model as ``cache=``."""

    def __init__(self, model: torch.nn.Module, slots: int, pages: int, row_tokens: int,
                 page_size: int = PAGE_SIZE):
        # Cache's own layer machinery is not used: update() below is the whole interface the
        # attention layers of Qwen2, Llama and Mistral call.
        self.layers = []
        self.slots = slots
        self.page_size = page_size
        self.pages = max(2, pages)  # page 0 is scratch
        self.row_pages = -(-row_tokens // page_size)
        self.capacity = self.row_pages * page_size  # the most tokens one row can hold
        layers = model.config.get_text_config().num_hidden_layers
        # Allocated on a layer's first update, with the device and dtype its attention works in (that
        # covers device maps, offloading and quantized projections alike); never reallocated after.
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.table = torch.zeros((slots, self.row_pages), dtype=torch.long)  # the host's copy
        self.held = [0] * slots  # pages held by each slot
        self.free = list(range(self.pages - 1, 0, -1))  # a stack; page 0 is never given out
        self.placement: Placement | None = None
        self._tables: dict[torch.device, torch.Tensor] = {}  # fixed-address copies of the table
        self._pinned: torch.Tensor | None = None  # the host's table staged for asynchronous copies to a GPU
        self._dirty = False
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scratch(self) -> int:
        """The position padded inputs write to (page 0)."""
        return self.capacity

    # ---- pages ---------------------------------------------------------------------------------------

    def reserve(self, slot: int, tokens: int) -> bool:
        """Give ``slot`` pages for its first ``tokens`` tokens; False (nothing taken) when the pool is short."""
        need = -(-tokens // self.page_size) - self.held[slot]
        if need <= 0:
            return True
        if need > len(self.free) or self.held[slot] + need > self.row_pages:
            return False
        for k in range(self.held[slot], self.held[slot] + need):
            self.table[slot, k] = self.free.pop()
        self.held[slot] += need
        self._dirty = True
        return True

    def release(self, slot: int) -> None:
        """Return ``slot``'s pages to the pool."""
        self.free.extend(self.table[slot, : self.held[slot]].tolist())
        self.table[slot] = 0
        self.held[slot] = 0
        self._dirty = True

    def move(self, source: int, target: int) -> None:
        """Slot ``target`` (released) takes over ``source``'s pages: compaction moves no keys or values."""
        self.table[target] = self.table[source]
        self.held[target] = self.held[source]
        self.table[source] = 0
        self.held[source] = 0
        self._dirty = True

    def free_tokens(self) -> int:
        return len(self.free) * self.page_size

    # ---- forward calls -------------------------------------------------------------------------------

    def attach(self, device: torch.device) -> None:
        """Give ``device`` its copy of the table now (a capture must find it there)."""
        if device not in self._tables:
            # One column more than the host's, always page 0: the scratch column of the widest step reads it.
            table = torch.zeros((self.slots, self.row_pages + 1), dtype=torch.long, device=device)
            table[:, :-1].copy_(self.table)
            self._tables[device] = table
            if device.type == "cuda" and self._pinned is None:
                self._pinned = torch.empty_like(self.table).pin_memory()

    def sync(self) -> None:
        """Copy the host's table into every device copy (before a forward call, outside any capture)."""
        if self._dirty:
            source = self.table
            if self._pinned is not None:  # the staged copy stays unchanged until the step's results are read
                source = self._pinned.copy_(self.table)  # (a host sync) after which the next sync may reuse it
            for table in self._tables.values():
                table[:, :-1].copy_(source, non_blocking=True)
            self._dirty = False

    def place(self, placement: Placement) -> None:
        """Set where the next forward call's inputs go."""
        self.placement = placement
        self._on_device = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool indices on ``device``: (rows, width_in) token rows written, (rows * pages read,) whole pages
        read (the width rounded up to pages). Device work only."""
        found = self._on_device.get(device)
        if found is None:
            self.attach(device)
            table = self._tables[device]
            p, size = self.placement, self.page_size
            slots, positions = p.slots.to(device), p.positions.to(device)
            rows = table[slots]  # (rows, row_pages)
            column = positions.clamp(max=self.capacity - 1)
            write = rows.gather(1, column // size) * size + column % size
            write = torch.where(positions >= self.capacity, 0, write)
            read = rows[:, : -(-p.width // size)].reshape(-1)  # past the capacity: the extra column, page 0
            found = self._on_device[device] = (write.reshape(-1), read)
        return found

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (rows, kv_heads, width_in, head_dim) keys/values into their pages; return what attention reads."""
        if self.keys[layer_idx] is None:
            _, kv_heads, _, head_dim = key_states.shape
            shape = (self.pages * self.page_size, kv_heads, head_dim)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        write, pages = self._indices(keys.device)
        rows, width, size = key_states.shape[0], self.placement.width, self.page_size
        out = []
        # Whole rows in, whole pages out: index_copy_/index_select move contiguous blocks (a token's heads,
        # a page's tokens) where element-wise indexing reads one index per element.
        for pool, states in ((keys, key_states), (values, value_states)):
            pool.index_copy_(0, write, states.transpose(1, 2).reshape(-1, *pool.shape[1:]))
            read = pool.view(self.pages, size, *pool.shape[1:]).index_select(0, pages)
            out.append(read.view(rows, -1, *pool.shape[1:])[:, :width].transpose(1, 2))
        return out[0], out[1]

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


#: The KV pool on a CPU when none is asked for.
CPU_KV_MEMORY = 2 * 2**30
#: Share of each GPU's total memory kept free of the pool, for activations, captured decode steps and the
#: (rows, vocab) logits: the default pool takes the rest of the memory free once the weights are loaded,
#: so weights + pool stay at 90% of the card, as vLLM's default gpu_memory_utilization=0.9 does.
GPU_RESERVE = 0.10


def default_kv_memory(model: torch.nn.Module) -> int:
    """Bytes for the KV pool: on CUDA what is free after loading less :data:`GPU_RESERVE` of each card (a
    device-map split is bounded by its fullest card, in proportion to the layers it holds); else
    :data:`CPU_KV_MEMORY`."""
    layers: dict[torch.device, int] = {}
    for name, module in model.named_modules():
        if name.endswith("k_proj"):  # its keys and values live where it computes (an offloaded layer: a GPU)
            device = module_device(module)
            layers[device] = layers.get(device, 0) + 1
    gpus = {d: n for d, n in layers.items() if d.type == "cuda"}
    if not gpus:
        return CPU_KV_MEMORY
    total_layers = sum(layers.values())
    return min(card_pool(*free_memory(device), held, total_layers) for device, held in gpus.items())


def card_pool(free: float, total: float, held: int, total_layers: int) -> int:
    """The whole pool one card allows: its ``free`` bytes less :data:`GPU_RESERVE` of its ``total``, which
    holds the keys and values of the ``held`` layers it has out of ``total_layers`` (every layer gets an
    equal share of the pool, on its own device). The pool of a split is the least of its cards'."""
    return int(max(0.0, free - GPU_RESERVE * total) * total_layers / held)
