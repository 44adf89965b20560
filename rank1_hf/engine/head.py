"""A faster output projection on CPU for float32 models, with the float32 argmax and readout kept.

On CPU, rank1's decode step is dominated by the output projection (a 151k-row vocabulary): 133 ms for
40 rows x 512 -> 151,667 in float32 through oneDNN with a prepacked weight on this project's 2-core
machine (torch's default MKL matmul: 200 ms), 55 ms in bfloat16. Greedy decoding needs only the argmax,
and the score only the " true"/" false" logits, so :class:`ScreenedHead` screens in bfloat16 and
computes exactly, in float32, every logit that could matter:

- every logit v of row r is within ``c_r ||w_v||`` of its bfloat16 estimate, where ``c_r`` bounds the
  rounding of the inputs, the weights and the output (see :meth:`ScreenedHead.error_scale`);
- the float32 logit of the best estimate is a floor the row's maximum reaches; a token can only be the
  float32 argmax if its estimate plus its bound reaches that floor; those candidates, and the readout
  ids, are recomputed in float32 (a small gather-dot);
- every other logit keeps its estimate, which is provably below the floor, so the argmax of the
  returned logits is the float32 argmax, and the readout logits are float32 values.

Where bfloat16 is not fast (no avx512_bf16/AMX) the head is the float32 weight prepacked for oneDNN
(:class:`PackedLinear`). :func:`fast_head` swaps the model's output embedding module for one of these
while an engine runs and puts the original back afterwards; packing is redone only when the weight
changes (planting in tests scales rows in place).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import torch
from torch import nn


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward through oneDNN with a weight packed once (float32, CPU)."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.linear = linear  # kept so that .weight and friends still answer
        self.packed = packed

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = _onednn(x.reshape(-1, shape[-1]), self.packed, self.linear.bias)
        return out.reshape(*shape[:-1], out.shape[-1])


class ScreenedHead(nn.Module):
    """Logits whose argmax and ``exact_ids`` columns are float32-exact, the rest bfloat16 estimates."""

    def __init__(self, linear: nn.Linear, packed_bf16: torch.Tensor, row_norms: torch.Tensor, exact_ids: Sequence[int]):
        super().__init__()
        self.linear = linear
        self.packed = packed_bf16
        self.row_norms = row_norms  # ||w_v||_2 for every token v
        self.block_norms = _block_max(row_norms[None, :], _BLOCK)[0]  # their maximum in each block
        self._out: torch.Tensor | None = None  # the float32 logits buffer, reused while shapes repeat
        self.exact_ids = torch.tensor(sorted(set(exact_ids)), dtype=torch.long)
        self.recomputed = 0  # logits recomputed in float32, for benchmarks

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @staticmethod
    def error_scale(x: torch.Tensor) -> torch.Tensor:
        """(rows,) c_r such that |float32 logit_v - estimate_v| <= c_r ||w_v|| for every token v.

        bfloat16 keeps 8 significant bits, so rounding x and w moves each product x_i w_i by at most
        (2^-8 + 2^-8 + 2^-16) |x_i||w_i|, and the sum by that times ||x|| ||w_v|| (Cauchy-Schwarz);
        float32 accumulation, here and in the float32 reference, adds at most hidden x 2^-24 of the same;
        rounding the output to bfloat16 adds 2^-8 |logit| <= 2^-8 ||x|| ||w_v||. A factor 1.25 covers
        the second-order terms.
        """
        hidden = x.shape[-1]
        return 1.25 * (2.0**-7 + 2.0**-8 + 2.0**-15 + 2 * hidden * 2.0**-24) * x.norm(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        weight, bias = self.linear.weight, self.linear.bias
        estimate = _onednn(flat.bfloat16(), self.packed)
        if self._out is None or self._out.shape != estimate.shape:
            # Reused: a fresh 24 MB array per call costs page faults that rival the screening itself.
            self._out = torch.empty(estimate.shape, dtype=torch.float32)
        logits = self._out.copy_(estimate)
        if bias is not None:
            logits += bias
        n, vocab = logits.shape
        every = torch.arange(n)
        # The best estimate's float32 logit is a floor the argmax reaches; a token can beat it only if
        # its estimate plus its bound does. Those tokens and the readout ids are recomputed in float32.
        top = greedy_tokens(logits)
        floor = _exact(flat, weight, bias, every, top)
        rows, cols = self._candidates(logits, self.error_scale(flat), floor)
        rows = torch.cat([rows, every.repeat_interleave(len(self.exact_ids))])
        cols = torch.cat([cols, self.exact_ids.repeat(n)])
        crowded = torch.bincount(rows, minlength=n) > _MOST_CANDIDATES
        crowded |= ~torch.isfinite(floor)
        if crowded.any():  # rows too close to call (or non-finite) are computed whole in float32
            keep = ~crowded[rows]
            rows, cols = rows[keep], cols[keep]
            logits[crowded] = torch.nn.functional.linear(flat[crowded], weight, bias)
        logits.view(-1).index_copy_(0, rows * vocab + cols, _exact(flat, weight, bias, rows, cols))
        self.recomputed += rows.numel() + int(crowded.sum()) * vocab
        return logits.reshape(*shape[:-1], vocab)


    def _candidates(self, logits: torch.Tensor, scale: torch.Tensor, floor: torch.Tensor):
        """(rows, cols) with estimate + scale_r ||w_v|| >= floor_r, searching only blocks that may hold one."""
        vocab = logits.shape[1]
        reach = _block_max(logits, _BLOCK) + scale[:, None] * self.block_norms[None, :]
        hot_rows, hot_blocks = (reach >= floor[:, None]).nonzero(as_tuple=True)
        columns = (hot_blocks[:, None] * _BLOCK + torch.arange(_BLOCK)).clamp_(max=vocab - 1)
        flat_index = (hot_rows[:, None] * vocab + columns).view(-1)
        found = logits.view(-1).index_select(0, flat_index).view(columns.shape)
        found += scale[hot_rows][:, None] * self.row_norms[columns]
        keep = found >= floor[hot_rows][:, None]
        return hot_rows[:, None].expand_as(columns)[keep], columns[keep]


_BLOCK = 256  # tokens per block when screening

# Beyond this many candidates in a row, one float32 row of the full projection is cheaper than gathering.
_MOST_CANDIDATES = 4096


def _exact(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor):
    """float32 logits at (rows, cols): one dot product each."""
    out = torch.einsum("kh,kh->k", flat.index_select(0, rows), weight.index_select(0, cols))
    return out + bias[cols] if bias is not None else out


def _block_max(values: torch.Tensor, block: int) -> torch.Tensor:
    n, vocab = values.shape
    whole = vocab // block
    parts = [values[:, : whole * block].reshape(n, whole, block).amax(-1)] if whole else []
    if vocab > whole * block:
        parts.append(values[:, whole * block :].amax(-1, keepdim=True))
    return torch.cat(parts, -1)


def greedy_tokens(logits: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """``logits.argmax(-1)`` for (rows, vocab) logits, exactly (first index on ties, NaN wins), but fast on CPU.

    PyTorch's CPU argmax is not vectorized: over a 151k vocabulary at 32 rows it took a quarter of the
    tiny benchmark model's decode step (3.7 ms), while this takes 0.43 ms: the max of each block of
    ``block`` columns (``amax`` is vectorized), the first block holding the row's max, and argmax in it.
    """
    if logits.device.type != "cpu":
        return logits.argmax(-1)
    vocab = logits.shape[1]
    block_max = _block_max(logits, block)
    top = block_max.amax(-1, keepdim=True)
    first = (block_max == top).to(torch.uint8).argmax(-1)
    # Past the vocabulary the index repeats the last column, which can only tie later than a real one.
    columns = ((first * block)[:, None] + torch.arange(block)).clamp_(max=vocab - 1)
    tokens = first * block + logits.gather(-1, columns).argmax(-1)
    nan = torch.isnan(top[:, 0])  # argmax takes the first NaN; the block maxima cannot see it
    if nan.any():
        tokens[nan] = logits[nan].argmax(-1)
    return tokens


def _packable(head: nn.Module) -> bool:
    # A tensor-parallel head (DTensor weight) is left alone: swapping the module would drop the gathering
    # of its vocabulary shards, and each process would read the argmax of its own shard.
    return (
        type(head) is nn.Linear
        and type(head.weight) is nn.Parameter
        and head.weight.device.type == "cpu"
        and head.weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _bf16_fast() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


# Packed weights per head module, kept off the module itself: oneDNN's packed tensors cannot be
# deep-copied or pickled, and a user's copy.deepcopy(model) must keep working.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _packed(head: nn.Linear, rows_hint: int = 16) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(kind, packed weight, row norms), kept on the module, redone when the weight changes."""
    weight = head.weight
    key = (weight.data_ptr(), weight._version)
    found = _PACKED.get(head)
    if found is not None and found[0] == key:
        return found[1]
    with torch.no_grad():
        if _bf16_fast():
            packed = ("bf16", torch.ops.mkldnn._reorder_linear_weight(weight.detach().bfloat16(), rows_hint),
                      weight.detach().norm(dim=-1))
        else:
            packed = ("fp32", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint), None)
    _PACKED[head] = (key, packed)
    return packed


def _output_head(model: nn.Module) -> nn.Linear | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None and _packable(head) else None


def prepack_head(model: nn.Module) -> None:
    """Pack the output projection now (loading time) rather than on the first judged batch."""
    head = _output_head(model)
    if head is not None:
        _packed(head)


@contextlib.contextmanager
def fast_head(model: nn.Module, exact_ids: Sequence[int]) -> Iterator[nn.Module | None]:
    """While inside, the model's output projection is a :class:`ScreenedHead` or :class:`PackedLinear`
    (float32 models on CPU only; otherwise nothing changes). Yields the module in place, or None."""
    head = _output_head(model)
    if head is None:
        yield None
        return
    kind, packed, norm = _packed(head)
    fast = ScreenedHead(head, packed, norm, exact_ids) if kind == "bf16" else PackedLinear(head, packed)
    model.set_output_embeddings(fast)
    try:
        yield fast
    finally:
        model.set_output_embeddings(head)
