"""The fixed-shape decode step (decode_step.py), run eagerly on CPU: its row and width buckets, padding
rows and masks give the reference's judgements for every family, rows joining and leaving. On a GPU the
same step is what a CUDA graph replays (benchmarks/gpu_throughput.py compares the two there)."""

import pytest
from conftest import FAMILIES, make_pairs
from reference import reference_judge
from test_judge import EOS, MAX_NEW, assert_agree, planted

from rank1_hf import Rank1
from rank1_hf.engine import decode_step, runner
from rank1_hf.engine.decode_step import buckets, graphable, width_buckets
from rank1_hf.testing import tiny_model


def test_buckets_are_powers_of_two_up_to_the_limit():
    assert buckets(1) == [1]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(321, 64) == [64, 128, 256, 321]


def test_width_buckets_add_the_page_multiple_halfway_between_powers_of_two():
    assert width_buckets(2049, 256, 32) == [256, 384, 512, 768, 1024, 1536, 2048, 2049]
    assert width_buckets(600, 256, 32) == [256, 384, 512, 600]  # 768 is past the limit
    assert width_buckets(65, 16, 32) == [16, 32, 64, 65]  # 24 and 48 round up to the next power
    for limit in (65, 600, 2049, 9281):
        b = width_buckets(limit, min(256, limit), 32)
        assert b == sorted(set(b)) and b[-1] == limit
        assert all(later <= 1.5 * earlier for earlier, later in zip(b, b[1:-1])), b


def test_a_cpu_model_keeps_the_eager_step(tokenizers):
    assert not graphable(tiny_model(tokenizers["qwen"], "qwen2", layers=1))


class Shapes:
    """The (rows, key columns) of every decode call's mask."""

    def __init__(self, model):
        self.seen: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            mask = kwargs["attention_mask"]
            self.seen.append((mask.shape[0], mask.shape[-1]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_step_matches_reference_with_padded_buckets(tokenizers, family, monkeypatch):
    monkeypatch.setattr(runner, "graphable", lambda model: True)
    monkeypatch.setattr(decode_step, "_MIN_WIDTH", 16)  # many width buckets even at tiny lengths
    model, tok = planted(tokenizers, family)
    pairs = make_pairs(10, seed=1, max_words=12)  # short prompts: rows cross width buckets as they decode
    refs = [reference_judge(model, tok, q, p, MAX_NEW, EOS[family]) for q, p in pairs]
    for batch_size in (3, 16):
        shapes = Shapes(model)
        try:
            ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=batch_size)
            judgements = ranker.judge(pairs)
        finally:
            shapes.handle.remove()
        assert_agree(judgements, refs)
        rows = {r for r, _ in shapes.seen}
        widths = {w for _, w in shapes.seen}
        assert rows <= set(buckets(batch_size)), rows
        # powers of two, the page multiple halfway to the next, or the capacity + 1 (a whole number of pages + 1)
        assert len(widths) >= 2 and all(w in {16, 32, 64, 96, 128, 192, 256} or w % 32 == 1 for w in widths), widths
        if batch_size == 16:
            assert 16 in rows  # 10 rows in flight padded up to the slot count
