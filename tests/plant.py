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
