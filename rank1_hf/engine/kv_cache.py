"""A paged KV cache: one pool of fixed-size pages per layer, allocated once; rows hold only the pages they use.

rank1's reasoning is mostly a few hundred tokens, but a row may run to ``max_new_tokens`` (8,192 by
default). Reserving that much per row would decide how many rows decode together; here a row takes a page
of ``page_size`` tokens when it reaches it, and gives all its pages back when it finishes, so the rows in
flight are bounded by the keys and values they hold. Which pages a slot holds (shared prompt pages
included) is the allocator's (pages.py); when the pool is full the scheduler preempts (scheduler.py).

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

from .pages import PageAllocator


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
    """Per-layer pools of pages and the device copies of an allocator's page tables, passed to the model
    as ``cache=``: the allocator (pages.py) decides which pages a slot holds, this writes and reads them."""

    def __init__(self, model: torch.nn.Module, allocator: PageAllocator):
        # Cache's own layer machinery is not used: update() below is the whole interface the
        # attention layers of Qwen2, Llama and Mistral call.
        self.layers = []
        self.allocator = allocator
        self.slots = allocator.slots
        self.page_size = allocator.page_size
        self.pages = allocator.pages  # page 0 is scratch
        self.row_pages = allocator.row_pages
        self.capacity = self.row_pages * self.page_size  # the most tokens one row can hold
        layers = model.config.get_text_config().num_hidden_layers
        # Allocated on a layer's first update, with the device and dtype its attention works in (that
        # covers device maps, offloading and quantized projections alike); never reallocated after.
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.table = torch.zeros((self.slots, self.row_pages), dtype=torch.long)  # the host's copy
        self.placement: Placement | None = None
        self._tables: dict[torch.device, torch.Tensor] = {}  # fixed-address copies of the table
        self._pinned: torch.Tensor | None = None  # the host's table staged for asynchronous copies to a GPU
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scratch(self) -> int:
        """The position padded inputs write to (page 0)."""
        return self.capacity

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
        """Copy the allocator's changed tables into the host's table and every device copy (before a forward
        call, outside any capture)."""
        dirty = self.allocator.dirty
        if dirty:
            for slot in dirty:
                held = self.allocator.tables[slot]
                self.table[slot, : len(held)] = torch.tensor(held, dtype=torch.long)
                self.table[slot, len(held) :] = 0
            dirty.clear()
            source = self.table
            if self._pinned is not None:  # the staged copy stays unchanged until the step's results are read
                source = self._pinned.copy_(self.table)  # (a host sync) after which the next sync may reuse it
            for table in self._tables.values():
                table[:, :-1].copy_(source, non_blocking=True)

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
