"""Engine behaviour: no row waits for another, readout without re-reading, OOM halving."""

import pytest
import torch
from conftest import make_pairs
from plant import plant_lengths

from rank1_hf import Rank1
from rank1_hf.offline import tiny_model
from rank1_hf.prompt import build_prompt


@pytest.fixture(scope="module")
def planted(tokenizers):
    """A tiny model that reasons for a planted, widely varied number of tokens per prompt length."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    pairs = make_pairs(24, seed=11)
    lengths = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    planted = {n: [3, 40, 7, 90, 12, 5, 60, 20][k % 8] for k, n in enumerate(lengths)}
    handle = plant_lengths(model, tok, planted)
    yield model, tok, pairs, planted
    handle.remove()


def test_planted_lengths_and_free_readout(planted):
    model, tok, pairs, lengths = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=128, engine="continuous", batch_size=4)
    js = ranker.judge(pairs)
    for (q, p), j in zip(pairs, js):
        assert j.outcome == "answered"
        assert j.reasoning_tokens == lengths[len(tok(build_prompt(q, p))["input_ids"])]
    stats = ranker.last_stats
    # One decode step per answered row reads its readout; no prompt or reasoning is read again.
    assert stats.readout_tokens == len(pairs)
    # Rows leave as they finish and others take their place: almost every slot computed is a reasoning token.
    assert stats.generated_tokens / stats.decode_slots >= 0.9


def test_static_engine_pays_for_the_longest_row_continuous_does_not(planted):
    model, tok, pairs, _ = planted
    static = Rank1.from_model(model, tok, max_new_tokens=128, engine="generate", batch_size=8)
    cont = Rank1.from_model(model, tok, max_new_tokens=128, engine="continuous", batch_size=8)
    a, b = static.judge(pairs), cont.judge(pairs)
    assert [(x.reasoning, x.outcome) for x in a] == [(y.reasoning, y.outcome) for y in b]
    assert max(abs(x.score - y.score) for x, y in zip(a, b)) <= 1e-4
    eff_static = static.last_stats.generated_tokens / static.last_stats.decode_slots
    eff_cont = cont.last_stats.generated_tokens / cont.last_stats.decode_slots
    assert eff_cont >= 0.9 and eff_static < 0.7


class InjectedOOM:
    """Raises an out-of-memory error on the first forward pass with more than ``rows`` rows."""

    def __init__(self, model, rows: int, times: int = 1):
        self.rows, self.left = rows, times
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if self.left and ids is not None and ids.shape[0] > self.rows:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_out_of_memory_halves_the_batch_and_loses_nothing(planted, engine):
    model, tok, pairs, _ = planted
    expected = Rank1.from_model(model, tok, max_new_tokens=128, engine=engine, batch_size=8).judge(pairs)
    oom = InjectedOOM(model, rows=4, times=2)
    try:
        ranker = Rank1.from_model(model, tok, max_new_tokens=128, engine=engine, batch_size=8)
        seen = [i for i, _ in ranker.judge_iter(pairs)]
        got = ranker.judge(pairs)
    finally:
        oom.handle.remove()
    assert sorted(seen) == list(range(len(pairs)))  # each pair judged exactly once
    assert ranker.last_stats.oom_retries >= 1 or oom.left == 0
    assert [(j.reasoning, j.outcome) for j in got] == [(j.reasoning, j.outcome) for j in expected]
    assert max(abs(a.score - b.score) for a, b in zip(got, expected)) <= 1e-4


def test_token_budget_limits_rows_in_flight(planted):
    model, tok, pairs, _ = planted
    longest = max(len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs)
    budget = 3 * (longest + 128)
    ranker = Rank1.from_model(model, tok, max_new_tokens=128, batch_size=32, token_budget=budget)
    ranker.judge(pairs)
    assert 1 <= ranker.last_stats.peak_rows <= 3


def test_greedy_tokens_is_argmax_exactly():
    """The CPU fast path must pick what torch.argmax picks: first index on ties, NaN wins, any width."""
    from rank1_hf.engine import greedy_tokens

    torch.manual_seed(0)
    cases = [torch.randn(5, 151665), torch.randn(3, 100), torch.randn(2, 4096), torch.randn(1, 2049)]
    cases.append(torch.randint(0, 3, (16, 10001)).float())  # many ties, across block edges
    edge = torch.zeros(6, 5000)
    edge[1, 4999] = float("inf")
    edge[2, 7] = float("nan")
    edge[2, 3000] = float("nan")
    edge[3, 2047] = edge[3, 2048] = 1.0  # tie across a block edge: the first wins
    edge[4] = float("-inf")
    edge[5, 4096:] = 2.0  # the max only in the last, partial block
    cases.append(edge)
    cases.append(torch.randn(4, 300).to(torch.bfloat16).float())
    for logits in cases:
        assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
        assert torch.equal(greedy_tokens(logits, block=64), logits.argmax(-1))


def test_engine_choice_follows_the_cache(tokenizers):
    """auto takes the continuous engine only over a plain full-attention cache; forcing it elsewhere is an error."""
    from rank1_hf import Rank1Error

    tok = tokenizers["mistral"]
    windowed = tiny_model(tok, "mistral", sliding_window=16)
    assert Rank1.from_model(windowed, tok, max_new_tokens=8)._engine(None, None).name == "generate"
    with pytest.raises(Rank1Error, match="plain full-attention KV cache"):
        Rank1.from_model(windowed, tok, max_new_tokens=8, engine="continuous")._engine(None, None)
    plain = tiny_model(tok, "mistral")
    assert Rank1.from_model(plain, tok, max_new_tokens=8)._engine(None, None).name == "continuous"
    assert Rank1.from_model(plain, tok, max_new_tokens=8, engine="generate")._engine(None, None).name == "generate"
