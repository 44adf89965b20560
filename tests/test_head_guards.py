"""The CPU output head's screening (rank1_hf.engine.head.ScreenedHead) on data built to sit near its bound.

The screen's bfloat16 estimate is what oneDNN computes from a bfloat16 packed weight: bfloat16 inputs and
weights, float32 accumulation, output rounded to bfloat16. Where this CPU cannot pack bfloat16 weights, the
same arithmetic is done by torch (products of two bfloat16 values are exact in float32), so the screening
logic is tested everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from rank1_hf.engine import head as head_module
from rank1_hf.engine.head import ScreenedHead


def _screened(weight: torch.Tensor, exact_ids, monkeypatch) -> ScreenedHead:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    if head_module._bf16_fast():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), 1)
    else:
        packed = weight.bfloat16()
        monkeypatch.setattr(head_module, "_onednn",
                            lambda x, w, bias=None: (x.float() @ w.float().t()).bfloat16())
    return ScreenedHead(linear, packed, weight.norm(dim=-1), exact_ids)


def _adversarial(hidden: int = 64, vocab: int = 300):
    """x and W where every rounding goes the same way (worked out by hand, no code under test):

    x_i = 1 + 2^-8 - 2^-16 rounds down to 1 in bfloat16. Token b's weights are the same value, so its
    bfloat16 estimate is exactly ``hidden`` while its float32 logit is hidden (1 + 2^-8 - 2^-16)^2, about
    2^-7 hidden higher: over half the bound of ``error_scale`` (1.25 (2^-7 + 2^-8 + ...) ||x|| ||w_b||,
    about 3.75 2^-8 hidden). Token a (a lower index) has weights 1 + 0.875 2^-8, which also round to 1:
    its estimate ties b's, so a is the screen's top, and its float32 logit hidden (1 + 2^-8 - 2^-16)
    (1 + 0.875 2^-8) is about 1.875 2^-8 hidden: below b's, so b is the float32 argmax, and b is found only
    if b's estimate plus b's bound reaches a's float32 logit: a bound under half the right one misses it.
    """
    x = torch.full((1, hidden), 1 + 2.0**-8 - 2.0**-16)
    weight = torch.full((vocab, hidden), -0.5)
    a, b = 5, 9
    weight[a] = 1 + 0.875 * 2.0**-8
    weight[b] = 1 + 2.0**-8 - 2.0**-16
    return x, weight, a, b


def test_rounding_bound_holds_where_the_error_reaches_half_of_it(monkeypatch):
    x, weight, a, b = _adversarial()
    exact = torch.nn.functional.linear(x, weight)
    assert exact.argmax(-1).item() == b and exact[0, a] < exact[0, b]
    head = _screened(weight, [0, 1], monkeypatch)
    estimate = head_module._onednn(x.bfloat16(), head.packed).float()
    assert estimate[0, a] == estimate[0, b] == 64.0
    bound = ScreenedHead.error_scale(x)[0] * weight.norm(dim=-1)
    error = (exact - estimate).abs()[0]
    assert (error <= bound).all()  # the bound holds...
    assert error[b] / bound[b] > 0.5  # ...on data that reaches over half of it
    assert error[b] > exact[0, a] - estimate[0, b]  # a bound short by half would not reach a's float32 logit
    out = head(x)
    assert out.argmax(-1).item() == b  # the float32 argmax, found through b's bound
    assert out[0, b] == exact[0, b] and torch.equal(out[0, :2], exact[0, :2])  # float32 where it matters
