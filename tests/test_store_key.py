"""The judgement store's key: every setting that determines a judgement is in it, the weights included,
so judgements made with other settings or other weights are never reused."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BitsAndBytesConfig

from rank1_hf import Rank1, ranker as ranker_module
from rank1_hf.model import fingerprint
from rank1_hf.testing import llama3_tokenizer, qwen_tokenizer, tiny_model
from rank1_hf.io.store import JudgementStore, settings_key

# Every field of Rank1.settings(); a field added there must get a variant below.
FIELDS = {"model", "revision", "quantization", "weights", "dtype", "max_new_tokens", "context_size",
          "dataset_prompt", "prompt", "readout"}
PAIRS = [("what causes tides", "The Moon pulls the oceans."), ("best bread oven", "A deck oven bakes evenly.")]
OPTIONS = dict(max_new_tokens=6, context_size=512, batch_size=2)


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=0)


@pytest.fixture(scope="module")
def saved(tok, model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def changed_fields(a: Rank1, b: Rank1) -> set[str]:
    sa, sb = a.settings(), b.settings()
    return {k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)}


def test_each_setting_changes_the_key(tok, model, saved, monkeypatch):
    base = Rank1.from_model(model, tok, name="m", **OPTIONS)
    assert set(base.settings()) == FIELDS
    quantized = copy.deepcopy(model)  # the same tensors, a quantization config on top (deepcopy must work after Rank1)
    quantized.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    variants = {
        "model": Rank1.from_model(model, tok, name="other", **OPTIONS),
        "quantization": Rank1.from_model(quantized, tok, name="m", **OPTIONS),
        "weights": Rank1.from_model(tiny_model(tok, seed=1), tok, name="m", **OPTIONS),
        "max_new_tokens": Rank1.from_model(model, tok, name="m", **{**OPTIONS, "max_new_tokens": 7}),
        "context_size": Rank1.from_model(model, tok, name="m", **{**OPTIONS, "context_size": 513}),
        "dataset_prompt": Rank1.from_model(model, tok, name="m", dataset_prompt="Find: FILL_QUERY_HERE", **OPTIONS),
        # Llama 3's " true"/" false" are 837/905, Qwen's 830/895; nothing else differs.
        "readout": Rank1.from_model(model, llama3_tokenizer(), name="m", **OPTIONS),
    }
    for field, variant in variants.items():
        assert changed_fields(base, variant) == {field}, field
        assert settings_key(variant.settings()) != settings_key(base.settings()), field
    # The template: settings() must follow the prompt the engine is given.
    template = settings_key(base.settings())
    monkeypatch.setattr(ranker_module, "build_prompt", lambda q, p: f"Query: {q}\nDoc: {p}\n<think>")
    assert settings_key(base.settings()) != template
    monkeypatch.undo()
    # Loaded from one directory, the weights' fingerprint is the same: only revision or dtype differ.
    loaded = Rank1(saved, **OPTIONS)
    for field, variant in (("revision", Rank1(saved, revision="v2", **OPTIONS)),
                           ("dtype", Rank1(saved, dtype="bfloat16", **OPTIONS))):
        assert changed_fields(loaded, variant) == {field}, field
        assert settings_key(variant.settings()) != settings_key(loaded.settings()), field


def test_in_memory_models_differing_only_in_weights_never_share_judgements(tok, tmp_path):
    store = JudgementStore(tmp_path / "s.sqlite")
    first, second = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    # Same class, no _name_or_path: the same default name for both.
    a = Rank1.from_model(first, tok, store=store, **OPTIONS)
    b = Rank1.from_model(second, tok, store=store, **OPTIONS)
    assert a.settings()["model"] == b.settings()["model"]
    got_a, got_b = a.judge(PAIRS), b.judge(PAIRS)
    assert got_b == Rank1.from_model(second, tok, **OPTIONS).judge(PAIRS)  # judged with its own weights
    assert [j.score for j in got_a] != [j.score for j in got_b]
    assert store.count(settings_key(a.settings())) == store.count(settings_key(b.settings())) == 2
    # One weight nudged in place: a new ranker over that model sees other weights.
    with torch.no_grad():
        first.model.layers[1].self_attn.v_proj.weight[7, 3] += 1e-3
    assert Rank1.from_model(first, tok, **OPTIONS).settings()["weights"] != a.settings()["weights"]
    store.close()


def test_local_directory_replaced_in_place_is_judged_again(tok, tmp_path):
    path, store_path = tmp_path / "model", tmp_path / "s.sqlite"
    old, new = tiny_model(tok, seed=0), tiny_model(tok, seed=2)
    old.save_pretrained(path)
    tok.save_pretrained(path)
    before = Rank1(str(path), store=store_path, **OPTIONS).judge(PAIRS)
    new.save_pretrained(path)  # same name, same config, other weights
    after = Rank1(str(path), store=store_path, **OPTIONS).judge(PAIRS)
    assert after == Rank1.from_model(new, tok, **OPTIONS).judge(PAIRS)
    assert [j.score for j in after] != [j.score for j in before]


def test_hub_checkpoints_are_keyed_by_their_resolved_commit(tok, model, monkeypatch):
    hub = copy.deepcopy(model)
    hub.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr("rank1_hf.model.loading.load_model", lambda name, **kw: (hub, tok))

    def never(model):
        raise AssertionError("a hub checkpoint is keyed by its commit, not by hashing its tensors")

    monkeypatch.setattr(ranker_module, "tensors_fingerprint", never)
    settings = Rank1("jhu-clsp/rank1-7b", revision="main", **OPTIONS).settings()
    assert settings["weights"] == "commit:0123456789abcdef0123456789abcdef01234567"
    assert (settings["model"], settings["revision"]) == ("jhu-clsp/rank1-7b", "main")


def test_large_weight_files_are_sampled_throughout(tmp_path):
    """Files above 17 MiB are read in samples: the header and chunks spread over the whole file."""
    path = tmp_path / "model.safetensors"
    size = 40 << 20
    with open(path, "wb") as f:
        f.truncate(size)
    base = fingerprint.files_fingerprint(tmp_path)
    middle = (1 << 20) + 128 * (size - (1 << 20) - (1 << 16)) // 255  # where the 129th sample starts
    for offset in (10, (1 << 20) + 100, middle + 5, size - 1):
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01")
        assert fingerprint.files_fingerprint(tmp_path) != base, offset
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x00")
    assert fingerprint.files_fingerprint(tmp_path) == base
    (tmp_path / "notes.txt").write_text("not weights")
    assert fingerprint.files_fingerprint(tmp_path) == base


def test_device_checksum_sees_every_word_and_every_move():
    """The accelerator path (run here on CPU tensors): one changed word, two swapped words, two swapped
    blocks of 2**20 words, one odd trailing byte each change the checksum."""
    torch.manual_seed(0)
    words = torch.randint(-(1 << 15), 1 << 15, (1 << 21,), dtype=torch.int16)
    base = fingerprint._checksum(words)
    one = words.clone()
    one[123_456] += 1
    swapped = words.clone()
    swapped[[5, 9]] = swapped[[9, 5]]
    blocks = torch.cat([words[1 << 20 :], words[: 1 << 20]])
    for other in (one, swapped, blocks):
        assert fingerprint._checksum(other) != base
    odd = torch.zeros(7, dtype=torch.uint8)
    assert fingerprint._checksum(odd) != fingerprint._checksum(torch.cat([odd[:6], torch.ones(1, dtype=torch.uint8)]))
    half = torch.randn(1000).to(torch.bfloat16)
    assert fingerprint._checksum(half) == fingerprint._checksum(half.clone())


# Every weight file name transformers 5 loads from a directory (its WEIGHTS_NAME, SAFE_WEIGHTS_NAME,
# their shards and indexes, PEFT adapters, Mistral's consolidated format, gguf_file=), and the files that
# decide what those weights compute.
WEIGHT_FILES = [
    "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin", "consolidated.safetensors", "model-q4.gguf",
    "model.pt", "config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "modeling_custom.py",
]


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_every_weight_format_is_in_the_directory_fingerprint(tmp_path, name):
    """Replacing any one of these files (same name, same size) changes the fingerprint; other files do not."""
    for other in ("model.safetensors", "README.md", "notes.txt", "generation_config.json"):
        (tmp_path / other).write_bytes(b"x" * 64)
    (tmp_path / name).write_bytes(b"a" * 4096)
    before = fingerprint.files_fingerprint(tmp_path)
    (tmp_path / name).write_bytes(b"a" * 4095 + b"b")
    assert fingerprint.files_fingerprint(tmp_path) != before, name
    for other in ("README.md", "notes.txt", "generation_config.json"):
        (tmp_path / other).write_bytes(b"y" * 64)
    assert fingerprint.files_fingerprint(tmp_path) == fingerprint.files_fingerprint(tmp_path)


def test_bin_weights_replaced_in_place_are_judged_again(tok, tmp_path):
    """A checkpoint saved as pytorch_model.bin (no safetensors), replaced by other weights under the same
    name: the store must not hand back the old model's judgements."""
    path, store_path = tmp_path / "model", tmp_path / "s.sqlite"
    old, new = tiny_model(tok, seed=0), tiny_model(tok, seed=2)

    def save_bin(model):  # transformers 5 saves safetensors only, but still loads pytorch_model.bin
        path.mkdir(exist_ok=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")

    save_bin(old)
    tok.save_pretrained(path)
    assert not list(path.glob("*.safetensors"))
    before = Rank1(str(path), store=store_path, **OPTIONS).judge(PAIRS)
    save_bin(new)
    after = Rank1(str(path), store=store_path, **OPTIONS).judge(PAIRS)
    assert after == Rank1.from_model(new, tok, **OPTIONS).judge(PAIRS)
    assert [j.score for j in after] != [j.score for j in before]
