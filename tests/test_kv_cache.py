"""Engine v2's pieces: the fixed-address paged cache, the screened output head, pairs from a stream."""

import itertools

import pytest
import torch
from conftest import make_pairs
from torch import nn

from rank1_hf import Rank1
from rank1_hf.engine.head import ScreenedHead, _bf16_fast, fast_head
from rank1_hf.engine.kv_cache import PagedCache
from rank1_hf.testing import tiny_model

needs_bf16 = pytest.mark.skipif(not _bf16_fast(), reason="this CPU has no fast bfloat16 (avx512_bf16/AMX) for oneDNN")


class Head(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(weight)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, module):
        self.lm_head = module


def near_ties(vocab=20000, hidden=256, rows=24, gap=2e-3, seed=0):
    """Weights and inputs whose top two logits differ by ``gap``: far above float32 noise (~1e-5 here),
    far below bfloat16's (~1e-2), so only a float32-exact argmax finds the winner."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.05
    x = torch.randn(rows, hidden, generator=g)
    winners = torch.randint(0, vocab, (rows,), generator=g)
    runners = (winners + 1 + torch.randint(0, vocab - 1, (rows,), generator=g)) % vocab
    for r in range(rows):
        # Row r's winner and runner-up point along x_r; the runner-up falls short by exactly gap.
        direction = x[r] / x[r].norm() ** 2
        weight[winners[r]] = weight[winners[r]] + 8.0 * direction
        weight[runners[r]] = weight[winners[r]] - gap * direction
    return weight, x, winners


@needs_bf16
def test_screened_head_keeps_the_float32_argmax_on_near_ties():
    weight, x, winners = near_ties()
    model = Head(weight)
    exact = (x.double() @ weight.double().T)
    assert torch.equal(exact.argmax(-1), winners)
    # A plain bfloat16 projection cannot tell these apart (checked, so that the test means something).
    rough = (x.bfloat16() @ weight.bfloat16().T).float()
    assert not torch.equal(rough.argmax(-1), winners)
    readout = [5, 17]
    with fast_head(model, readout) as head:
        assert isinstance(head, ScreenedHead)
        logits = model.lm_head(x)
    assert torch.equal(logits.argmax(-1), winners)
    # The readout ids are float32 values, not bfloat16 estimates.
    assert torch.allclose(logits[:, readout].double(), exact[:, readout], atol=1e-5, rtol=0)
    assert model.lm_head is not head  # the original module is back


@needs_bf16
def test_screened_head_handles_an_outlier_row_and_non_finite_inputs():
    """One huge output row (as a planted </think>) must not make every token a candidate; a NaN row
    falls back to float32 and keeps argmax's NaN rule."""
    weight, x, _ = near_ties(vocab=5000, rows=6)
    weight[123] *= 160.0
    model = Head(weight)
    x[2] = float("nan")
    with fast_head(model, [0, 1]) as head:
        logits = model.lm_head(x)
        recomputed = head.recomputed
    expected = torch.nn.functional.linear(x, weight)
    finite = [0, 1, 3, 4, 5]
    assert torch.equal(logits[finite].argmax(-1), expected[finite].argmax(-1))
    assert torch.isnan(logits[2]).all()
    # The NaN row is recomputed whole (5000); the others need only a few candidates each.
    assert recomputed < 5000 + 5 * 300


def test_cache_buffers_never_move_while_rows_join_and_leave(tokenizers, monkeypatch):
    """Every forward call writes into the same buffers: no per-step allocation that grows with the cache."""
    from plant import plant_lengths
    from rank1_hf.prompt import build_prompt

    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    pairs = make_pairs(10, seed=5)
    lengths = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    handle = plant_lengths(model, tok, {n: [3, 30, 8, 17][k % 4] for k, n in enumerate(lengths)})
    addresses, widths = set(), []
    update = PagedCache.update

    def spy(self, keys, values, layer_idx, *args, **kwargs):
        out = update(self, keys, values, layer_idx, *args, **kwargs)
        addresses.add((layer_idx, self.keys[layer_idx].data_ptr(), self.values[layer_idx].data_ptr()))
        if keys.shape[2] == 1 and layer_idx == 0:
            widths.append(out[0].shape[2])
        return out

    monkeypatch.setattr(PagedCache, "update", spy)
    ranker = Rank1.from_model(model, tok, max_new_tokens=40, engine="continuous", batch_size=3)
    stats = ranker.judge_with_stats(pairs).stats
    handle.remove()
    assert len(addresses) == model.config.num_hidden_layers  # one pair of pools per layer, for the whole run
    assert len(widths) == stats.steps and max(widths) > min(widths)


def test_pairs_from_a_stream_are_pulled_as_slots_free_up(tokenizers):
    """An iterator is consumed while judging runs: with 2 slots, the first judgement arrives before the
    stream is exhausted, and every pair is judged once, as from a list."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=1)
    pairs = make_pairs(8, seed=3)
    pulled = []

    def stream():
        for pair in pairs:
            pulled.append(pair)
            yield pair

    ranker = Rank1.from_model(model, tok, max_new_tokens=6, engine="continuous", batch_size=2)
    results = ranker.judge_iter(stream())
    first = next(results)
    assert len(pulled) < len(pairs)
    got = dict(itertools.chain([first], results))
    assert sorted(got) == list(range(len(pairs)))
    listed = ranker.judge(pairs)
    # Batches differ (stream order vs shortest first), so float rounding may differ, nothing more.
    assert [got[i].reasoning for i in range(len(pairs))] == [j.reasoning for j in listed]
    assert max(abs(got[i].score - j.score) for i, j in enumerate(listed)) <= 1e-6
