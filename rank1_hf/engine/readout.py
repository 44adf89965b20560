"""From logits to a rank1 score: the readout token ids, the score, the sequence read after an unfinished
row, and the forced readout pass."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model.devices import input_device
from .types import Request
from ..errors import Rank1Error
from ..prompt import THINK_END, forced_prompt
from .stopping import ThinkEnd


def readout_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The ids of " true" and " false", taken as the reference takes them: the first token of each.

    A tokenizer that cannot tell them apart (unknown token, same id) would give meaningless scores, so
    it is refused here rather than scored wrongly.
    """
    ids = []
    for word in (" true", " false"):
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not encoded or encoded[0] == tokenizer.unk_token_id:
            raise Rank1Error(f"tokenizer has no token for {word!r}: this is not a rank1-compatible tokenizer")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise Rank1Error(f"tokenizer maps ' true' and ' false' to the same first token {ids[0]}")
    return ids[0], ids[1]


def score(true_logit: float, false_logit: float) -> float:
    """P(" true") / (P(" true") + P(" false")): a softmax over just the two logits (float64, stable)."""
    diff = false_logit - true_logit
    if diff > 0:
        e = math.exp(-diff)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(diff))


def closing_ids(tokenizer: PreTrainedTokenizerBase, request: Request, tokens: list[int], think: ThinkEnd | None) -> list[int]:
    """The token sequence read for a row without a free readout (prompt ids first).

    A row whose ``</think>`` ended inside a token is read on its own tokens up to the exact end of
    ``</think>`` (outcome "answered"); unfinished reasoning is cut back to its last sentence and closed
    with ``"\\n</think>"`` and the whole string tokenized, as the reference does (outcome "forced").
    """
    if think is not None:
        end = think.end
        whole = tokenizer.decode(tokens[:end], skip_special_tokens=False)
        before = tokenizer.decode(tokens[: end - 1], skip_special_tokens=False)
        piece = whole[len(before) : whole.rfind(THINK_END) + len(THINK_END)]
        return request.ids + tokens[: end - 1] + tokenizer(piece, add_special_tokens=False)["input_ids"]
    reasoning = tokenizer.decode(tokens, skip_special_tokens=False)
    return tokenizer(forced_prompt(request.prompt, reasoning))["input_ids"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (rows, longest) long tensors, each row right-aligned after padding."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.inference_mode()
def forced_readout(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    readout: tuple[int, int],
    max_tokens: int = 16384,
) -> list[tuple[float, float]]:
    """The (true, false) logits at the position after each full token sequence, one forward pass per group.

    Rows are left-padded and grouped so that no group runs more than ``max_tokens`` padded tokens;
    position ids come from the attention mask so that padding never shifts a row's positions. Only the
    last position's logits are computed (``logits_to_keep=1``).
    """
    device = input_device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[tuple[float, float]] = [(math.nan, math.nan)] * len(sequences)
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and len(sequences[order[stop]]) * (stop - start + 1) <= max_tokens:
            stop += 1
        ids, mask = left_pad([sequences[i] for i in order[start:stop]], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1, list(readout)]
        for row, pair in zip(order[start:stop], logits.float().tolist()):
            out[row] = (pair[0], pair[1])
        start = stop
    return out
