"""Planting behaviour in tiny random models, for tests and benchmarks.

A random model almost never writes ``</think>``. These helpers make it do so while it still runs its
full, real forward passes: a forward hook adds a fixed boost to chosen next-token logits depending only
on the input token at each position, so every engine, batched or not, cached or not, sees the same
planted rule.
"""

from __future__ import annotations

import torch


def plant_rules(model, rules: dict[int, int], boost: float = 100.0):
    """When the input token at a position is ``k``, the logit of ``rules[k]`` there gets ``+boost``.

    Works with any number of positions per call (prefill, decode, full no-cache passes, and
    ``logits_to_keep``), because logits are aligned to the right end of the inputs. Returns the hook
    handle (``.remove()`` undoes it).
    """
    src = torch.tensor(sorted(rules), dtype=torch.long)
    dst = torch.tensor([rules[k] for k in sorted(rules)], dtype=torch.long)

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        ids = ids[:, ids.shape[1] - logits.shape[1] :]
        hit = ids.unsqueeze(-1) == src.to(ids.device)  # (batch, positions, rules)
        if hit.any():
            bonus = torch.zeros_like(logits)
            b, p, r = hit.nonzero(as_tuple=True)
            bonus[b, p, dst.to(ids.device)[r]] = boost
            output.logits = logits + bonus
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def boost_rows(model, token_ids: list[int], factor: float) -> None:
    """Scale the output-embedding rows of ``token_ids`` so the model picks them now and then."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        for i in token_ids:
            head[i] *= factor


def plant_think(model, tokenizer, factor: float = 3.0, tail: str | None = None):
    """Make a model close ``</think>`` by itself at prompt-dependent steps.

    The first token of ``</think>`` gets a scaled output row, so it wins at some steps of some rows; when
    ``</think>`` spans several tokens, a hook completes it once begun. ``tail`` replaces its last token
    (e.g. ``">\\n"`` to end ``</think>`` inside a token). Returns the hook handle or None.
    """
    ids = tokenizer.encode("</think>", add_special_tokens=False)
    if tail is not None:
        last = tokenizer.encode(tail, add_special_tokens=False)
        assert len(last) == 1, f"{tail!r} is not one token"
        ids = ids[:-1] + last
    boost_rows(model, ids[:1], factor)
    if len(ids) == 1:
        return None
    return plant_rules(model, {a: b for a, b in zip(ids, ids[1:])})


def logit_positions(kwargs, rows: int, k: int, width: int) -> torch.Tensor:
    """The positions of the last ``k`` inputs of a forward call (those with logits), however it was called:
    explicit position ids, a 2D attention mask (left padding), or neither (no cache, no padding)."""
    positions = kwargs.get("position_ids")
    if positions is None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            positions = mask.long().cumsum(-1) - 1
        else:
            positions = torch.arange(width - k, width).expand(rows, -1)
    return positions[:, -k:]


def plant_lengths(model, tokenizer, lengths: dict[int, int], never: set[int] = frozenset(), first_counter: int = 1000):
    """Make the model reason for a chosen number of tokens, decided by the prompt's token length.

    A prompt of ``n`` tokens with ``lengths[n] = r`` is answered with ``r`` countdown tokens
    ``C[r-1], ..., C[0]`` and then ``</think>``; a prompt length in ``never`` loops on one token and never
    closes. Every engine still runs every real forward pass; only the winning next token is planted
    (+100 on its logit), by the input token at each position and, for the prompt's last token, by its
    position. The readout logits right after ``</think>`` are the model's own.
    """
    think = tokenizer.encode("</think>", add_special_tokens=False)
    last_prompt_token = tokenizer("x\n<think>", add_special_tokens=False)["input_ids"][-1]
    longest = max(lengths.values(), default=1)
    counters = [i for i in range(first_counter, first_counter + longest + len(think) + 2) if i not in think][:longest]
    loop = counters[-1] + 1 if never else None
    table = torch.full((model.get_output_embeddings().weight.shape[0],), -1, dtype=torch.long)
    for k in range(1, longest):
        table[counters[k]] = counters[k - 1]
    table[counters[0]] = think[0]
    for a, b in zip(think, think[1:]):
        table[a] = b
    if loop is not None:
        table[loop] = loop
    # position of the prompt's last token (n - 1) -> first planted token
    entry = torch.full((max(list(lengths) + list(never) + [0]) + 1,), -1, dtype=torch.long)
    for n, r in lengths.items():
        entry[n - 1] = counters[r - 1]
    for n in never:
        entry[n - 1] = loop

    copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_device(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made on the first (uncaptured) call: a host-to-device copy cannot happen inside a capture.
        if device not in copies:
            copies[device] = (table.to(device), entry.to(device))
        return copies[device]

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        k, width = logits.shape[1], ids.shape[1]
        ids = ids[:, width - k :]
        positions = logit_positions(kwargs, ids.shape[0], k, width).to(ids.device)
        table_on, entry_on = on_device(ids.device)
        target = table_on[ids]
        at_entry = (ids == last_prompt_token) & (positions < entry_on.numel())
        target = torch.where(at_entry, entry_on[positions.clamp(0, entry_on.numel() - 1)], target)
        # In place, with fixed shapes and no host sync: the logits are this forward's own fresh tensor (a
        # copy of a rows x 151k tensor per step would charge the harness's cost to the batched engines),
        # and the hook also runs inside a captured CUDA graph (decode_step.py).
        bonus = (target >= 0).to(logits.dtype) * 100.0
        logits.scatter_add_(-1, target.clamp(min=0)[..., None], bonus[..., None])
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def plant_quoting(model, tokenizer, words: list[str], tail: str | None = None):
    """Make a model reason by quoting: right after the prompt it writes ``words`` (one token each, with a
    leading space) and then ``</think>``, whatever the pair. A passage that contains the same text lets
    prompt lookup guess the reasoning, so speculative drafts get accepted. ``tail`` replaces the last
    token of ``</think>`` (e.g. ``">\n"``: it ends inside a token). Returns the hook handle."""
    chain = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    assert all(len(c) == 1 for c in chain), "each word must be one token"
    chain = [c[0] for c in chain]
    think = tokenizer.encode("</think>", add_special_tokens=False)
    if tail is not None:
        think = think[:-1] + tokenizer.encode(tail, add_special_tokens=False)
    last_prompt_token = tokenizer("x\n<think>", add_special_tokens=False)["input_ids"][-1]
    order = [last_prompt_token] + chain + think
    return plant_rules(model, dict(zip(order, order[1:])))
