"""Loading on CPU, offline: bitsandbytes, disk offload, device-map plans, errors (AWQ: test_awq.py).

Tiny random Qwen2 models with the real Qwen2.5 tokenizer stand in for the rank1 checkpoints; the
planning tests use the real 7B/14B/32B shapes on the meta device (no weights allocated).
Measured differences are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rank1_hf.model.devices import input_device, output_device
from rank1_hf.errors import Rank1Error
from rank1_hf.model.loading import load_model, parse_max_memory
from rank1_hf.model.planning import Plan, format_kv_plan, format_plan, kv_plan, plan_device_map

sys.path.insert(0, str(Path(__file__).parent))
from awq_fixture import (  # noqa: E402
    bnb_twin,
    build_awq_checkpoint,
    save_float_checkpoint,
    tiny_qwen2,
)

PROMPTS = [
    "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
    "Query: what is a cat\nPassage: Cats are small carnivorous mammals.\n<think>",
    "Query: rank1 reranker\nPassage: A passage about something else entirely.\n<think>",
]


# ---- shared fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    # A missing offline extra or a broken tokenizer build is a failure here, not a skip.
    from rank1_hf.testing import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    return tok(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def awq_checkpoint(tokenizer, tmp_path_factory):
    """(directory, float32 twin holding the dequantized weights)."""
    target = tmp_path_factory.mktemp("awq") / "tiny-awq"
    return target, build_awq_checkpoint(tokenizer, target, seed=0)


@pytest.fixture(scope="module")
def float_checkpoint(tokenizer, tmp_path_factory):
    """(directory, the float32 model saved there)."""
    model = tiny_qwen2(tokenizer, seed=1)
    return save_float_checkpoint(model, tokenizer, tmp_path_factory.mktemp("float") / "tiny"), model


def _logits(model: nn.Module, batch) -> torch.Tensor:
    """Logits of the last position of every row (where rank1 reads its answer), as float32."""
    device = input_device(model)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits[:, -1, :].float().cpu()


def _report(label: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - want).abs().max().item()
    print(f"\n{label}: max |dlogit| = {diff:.4g} (logit std {want.std().item():.3g})")
    return diff


# ---- bitsandbytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantization, twin_tol, float_tol",
    [
        # 4-bit: the kernel uses exactly its dequantized nf4 weights, but bitsandbytes' CPU kernel
        # does not reproduce float32 matmuls bit for bit (measured 0.056 max on logits of std 0.9,
        # like AWQ's float16 noise); nf4 itself moves random-weight logits a lot (~1.9 max), so
        # against the original only the direction is checked (cosine).
        ("bnb-4bit", 0.15, None),
        # 8-bit: LLM.int8 also quantizes activations to int8 per row (and casts them to float16 on
        # CPU), so the twin is close but not exact; measured ~0.2 against the original float model.
        ("bnb-8bit", 0.5, 0.5),
    ],
)
def test_bnb_quantization_on_cpu(float_checkpoint, batch, quantization, twin_tol, float_tol):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the [bnb] extra)")
    path, original = float_checkpoint
    model, _ = load_model(str(path), quantization=quantization)
    assert model.dtype == torch.float32  # CPU default; 4-bit computes in it too
    # The twin is read before the first forward: bitsandbytes repacks 4-bit weights into a CPU
    # kernel layout on first use, after which weight.data is no longer the plain nf4 layout.
    twin = _logits(bnb_twin(model, original), batch)
    got, want = _logits(model, batch), _logits(original, batch)
    assert _report(f"{quantization} vs its dequantized twin", got, twin) < twin_tol
    diff = _report(f"{quantization} vs the float32 original", got, want)
    if float_tol is not None:
        assert diff < float_tol
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    print(f"{quantization} vs float32 original: cosine {cosine.tolist()}")
    assert (cosine > 0.9).all()


def test_bnb_config_passes_through(float_checkpoint):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the [bnb] extra)")
    from transformers import BitsAndBytesConfig

    model, _ = load_model(str(float_checkpoint[0]), quantization=BitsAndBytesConfig(load_in_8bit=True))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"


def test_unknown_quantization_lists_valid_ones(float_checkpoint):
    with pytest.raises(Rank1Error, match="bnb-4bit, bnb-8bit"):
        load_model(str(float_checkpoint[0]), quantization="gptq-3bit")


def test_quantizing_an_awq_checkpoint_is_refused(awq_checkpoint):
    with pytest.raises(Rank1Error, match="already quantized"):
        load_model(str(awq_checkpoint[0]), quantization="bnb-4bit")


# ---- placement and offload -----------------------------------------------------------------------------


def test_default_load_is_float32_on_cpu(float_checkpoint, batch):
    path, original = float_checkpoint
    model, tok = load_model(str(path))
    assert model.dtype == torch.float32 and not model.training
    assert input_device(model) == output_device(model) == torch.device("cpu")
    assert torch.equal(_logits(model, batch), _logits(original, batch))
    assert tok.padding_side == "left"


# The tiny model is mostly its embedding (151,667 x 128 float32 = 78 MB, tied to lm_head), so a budget
# either fits it whole or not at all: a tight budget sends everything to disk, and an explicit map
# gives a CPU/disk mix.
MIXED_MAP = {
    "model.embed_tokens": "cpu",
    "lm_head": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
}


@pytest.mark.parametrize(
    "placement",
    [dict(device_map="auto", max_memory={"cpu": "20MB"}), dict(device_map=MIXED_MAP)],
    ids=["tight-budget", "cpu-disk-map"],
)
def test_cpu_and_disk_offload_match_in_memory(float_checkpoint, batch, tmp_path, placement):
    path, _ = float_checkpoint
    in_memory, _ = load_model(str(path))
    offloaded, _ = load_model(str(path), offload_folder=tmp_path / "offload", **placement)
    print(f"\noffload device map: {offloaded.hf_device_map}")
    assert "disk" in set(offloaded.hf_device_map.values())
    assert input_device(offloaded) == output_device(offloaded) == torch.device("cpu")
    diff = _report("disk/cpu offload vs in memory", _logits(offloaded, batch), _logits(in_memory, batch))
    assert diff < 1e-5  # same float32 weights, same kernels: offload only moves them


def test_disk_map_without_folder_is_a_rank1_error(float_checkpoint):
    with pytest.raises(Rank1Error, match="offload_folder"):
        load_model(str(float_checkpoint[0]), device_map={"": "disk"})


def test_pad_token_prefers_reserved_token():
    from rank1_hf.model.loading import _choose_pad_token
    from rank1_hf.testing import llama3_tokenizer

    llama = llama3_tokenizer()
    assert llama.pad_token is None
    assert _choose_pad_token(llama) == "<|finetune_right_pad_id|>"


# ---- errors ---------------------------------------------------------------------------------------------


def test_missing_bitsandbytes_is_actionable(float_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(Rank1Error, match=r"rank1-hf\[bnb\]"):
        load_model(str(float_checkpoint[0]), quantization="bnb-4bit")


def test_missing_local_path_is_a_rank1_error(tmp_path):
    with pytest.raises(Rank1Error, match="no such local directory"):
        load_model(str(tmp_path / "nope" / "model"))


def test_unknown_hub_id_offline_is_a_rank1_error(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so set the constant too (else it retries
    # the network for ~20 s before failing).
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Rank1Error) as info:
        load_model("no-such-org/no-such-rank1-model")
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "no-such-org/no-such-rank1-model" in message


def test_bad_dtype_and_device_map(float_checkpoint):
    with pytest.raises(Rank1Error, match="dtype"):
        load_model(str(float_checkpoint[0]), dtype="int3")
    with pytest.raises(Rank1Error, match="device_map"):
        load_model(str(float_checkpoint[0]), device_map="everywhere")


# ---- max_memory parsing -----------------------------------------------------------------------------------


def test_parse_max_memory():
    assert parse_max_memory("0=40GiB,1=40GiB,cpu=100GiB") == {0: "40GiB", 1: "40GiB", "cpu": "100GiB"}
    assert parse_max_memory(" cuda:1 = 2GB , disk=1000 ") == {1: "2GB", "disk": 1000}
    assert parse_max_memory({0: "1GiB", "cpu": 5}) == {0: "1GiB", "cpu": 5}


@pytest.mark.parametrize("bad", ["0:40GiB", "gpu0=40GiB", "0=forty", "0=40 parsecs", "", "0=40GiB,,x"])
def test_parse_max_memory_rejects_bad_syntax(bad):
    with pytest.raises(Rank1Error, match="max_memory"):
        parse_max_memory(bad)


# ---- device-map plans on the meta device ------------------------------------------------------------------

QWEN_SHAPES = {
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064),
    "14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064),
    "32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064),
}
# Per-GPU budgets that force a split: about 1.3x an even share of the bfloat16 weights.
GPU_BUDGET_GIB = {("7b", 2): 10, ("7b", 4): 5, ("14b", 2): 20, ("14b", 4): 10, ("32b", 2): 44, ("32b", 4): 22}


def _qwen_config(size: str, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN_SHAPES[size], tie_word_embeddings=False, dtype="bfloat16", **extra)


def _check_plan(plan: Plan, n_layers: int) -> None:
    # every decoder layer whole on exactly one device
    assert sorted(i for ix in plan.layers.values() for i in ix) == list(range(n_layers))
    assert not [k for k in plan.device_map if ".layers." in k and not k.split(".")[-1].isdigit()]
    placed = {k: v for k, v in plan.device_map.items()}
    for needed in ("model.embed_tokens", "lm_head"):
        assert any(needed == k or needed.startswith(k + ".") or k == "" for k in placed), needed
    for device, used in plan.bytes_per_device.items():
        assert used <= plan.max_memory[device], f"{device}: {used} > {plan.max_memory[device]}"
    assert sum(plan.bytes_per_device.values()) == plan.total_bytes


@pytest.mark.parametrize("size", ["7b", "14b", "32b"])
@pytest.mark.parametrize("n_gpus", [2, 4])
def test_plan_splits_qwen_over_fake_gpus(size, n_gpus):
    budget = GPU_BUDGET_GIB[(size, n_gpus)]
    spec = ",".join(f"{i}={budget}GiB" for i in range(n_gpus)) + ",cpu=200GiB"
    plan = plan_device_map(_qwen_config(size), max_memory=spec)
    _check_plan(plan, QWEN_SHAPES[size]["num_hidden_layers"])
    assert set(plan.bytes_per_device) == set(range(n_gpus))  # all GPUs used, nothing offloaded
    assert plan.device_map["model.embed_tokens"] == 0 and plan.device_map["lm_head"] == n_gpus - 1
    table = format_plan(plan)
    print("\n" + table)
    assert f"cuda:{n_gpus - 1}" in table and "total" in table


def test_plan_sizes_match_the_paper():
    """bf16 7B ~15.2 GB; its AWQ twin ~5.6 GB (paper sizes, which include the unquantized head)."""
    full = plan_device_map(_qwen_config("7b"), max_memory="0=80GiB")
    awq_config = _qwen_config(
        "7b", quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    )
    awq = plan_device_map(awq_config, max_memory="0=80GiB")
    bnb4 = plan_device_map(_qwen_config("7b"), max_memory="0=80GiB", quantization="bnb-4bit")
    assert awq.quantization == "awq" and awq.dtype == torch.bfloat16
    assert abs(full.total_bytes / 1e9 - 15.2) < 0.3
    assert abs(awq.total_bytes / 1e9 - 5.6) < 0.3
    assert 5.0 < bnb4.total_bytes / 1e9 < 6.0
    print(f"\n7B: bf16 {full.total_bytes/1e9:.2f} GB, awq {awq.total_bytes/1e9:.2f} GB, bnb-4bit {bnb4.total_bytes/1e9:.2f} GB")


def test_awq_32b_fits_one_24gb_gpu():
    config = _qwen_config(
        "32b", quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    )
    plan = plan_device_map(config, max_memory="0=22GiB,cpu=64GiB", device_map="sequential")
    _check_plan(plan, 64)
    assert set(plan.bytes_per_device) == {0}
    print("\n" + format_plan(plan))


def test_plan_offloads_to_cpu_when_gpus_are_full():
    plan = plan_device_map(_qwen_config("14b"), max_memory="0=8GiB,1=8GiB,cpu=64GiB")
    _check_plan(plan, 48)
    assert "cpu" in plan.layers and 0 in plan.layers and 1 in plan.layers


def test_plan_from_a_checkpoint_directory(float_checkpoint):
    plan = plan_device_map(float_checkpoint[0], max_memory={"cpu": "1GiB"}, dtype="float32")
    _check_plan(plan, 2)
    assert plan.layers == {"cpu": [0, 1]}


# ---- the KV pool a plan leaves: rows that fit ----------------------------------------------------------------

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def _tiny_config():
    """4 layers, 2 KV heads of 16 (hidden 64 / 4 heads): 2 (K, V) x 4 x 2 x 16 x 2 bytes = 512 bytes a token."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=1000, tie_word_embeddings=False, dtype="bfloat16")


def test_kv_bytes_per_token_from_the_config():
    assert plan_device_map(_tiny_config(), max_memory="cpu=1GiB").kv_bytes_per_token == 512
    assert plan_device_map(_tiny_config(), max_memory="cpu=1GiB", dtype="float32").kv_bytes_per_token == 1024
    # the rank1 shapes: 2 x layers x KV heads x head 128 x 2 bytes, quantized weights keep 16-bit keys/values
    for size, kib in (("7b", 56), ("14b", 192), ("32b", 256)):
        n = QWEN_SHAPES[size]
        assert 2 * n["num_hidden_layers"] * n["num_key_value_heads"] * 128 * 2 == kib * 1024
        for plan in (plan_device_map(_qwen_config(size), max_memory="0=200GiB"),
                     plan_device_map(_qwen_config(size, quantization_config=AWQ), max_memory="0=200GiB"),
                     plan_device_map(_qwen_config(size), max_memory="0=200GiB", quantization="bnb-4bit")):
            assert plan.kv_bytes_per_token == kib * 1024, (size, plan.quantization)


def test_rows_that_fit_on_one_gpu():
    plan = plan_device_map(_tiny_config(), max_memory="0=40000000")
    assert plan.layers == {0: [0, 1, 2, 3]}
    weights = plan.bytes_per_device[0]
    # embeddings and head 2 x 1000 x 64 x 2 bytes; a layer 37,120 parameters x 2 bytes; the final norm 64 x 2;
    # rotary's inv_freq (and its original) 2 x 8 x 4 bytes
    assert weights == 2 * 1000 * 64 * 2 + 4 * 37_120 * 2 + 64 * 2 + 2 * 8 * 4 == 553_152
    kv = kv_plan(plan, [500, 1000, 8192], prompt_tokens=500)
    # the pool: budget - weights - 10% of the budget, all on one card
    assert kv.source == "gpus" and kv.pool_bytes == 40_000_000 - 553_152 - 4_000_000 == 35_446_848
    assert kv.pool_tokens == 35_446_848 // 512 == 69_232 and kv.pages == 69_232 // 32 == 2163
    # a row of prompt + reasoning holds ceil(tokens / 32) pages: 1000 -> 32, 1500 -> 47, 8692 -> 272;
    # the old engine reserved prompt + 8192 for every row: 69,232 // 8692 = 7
    assert kv.rows == ((500, 2163 // 32, 7), (1000, 2163 // 47, 7), (8192, 2163 // 272, 7))
    assert [n for _, n, _ in kv.rows] == [67, 46, 7]


def test_rows_that_fit_on_a_two_gpu_split():
    plan = plan_device_map(_tiny_config(), max_memory="0=400000,1=2000000", device_map="sequential")
    # embeddings + layer 0 on cuda:0 (128,000 + 74,240 bytes), layers 1-3, the norm and the head on cuda:1
    assert plan.layers == {0: [0], 1: [1, 2, 3]}
    assert plan.bytes_per_device == {0: 202_240, 1: 350_912}
    kv = kv_plan(plan, [14, 100, 1000], prompt_tokens=50, max_new_tokens=200)
    # each card holds its layers' share of the pool, so it allows (budget - weights - 10%) x 4 / its layers:
    # cuda:0 (400,000 - 202,240 - 40,000) x 4/1 = 631,040; cuda:1 (2,000,000 - 350,912 - 200,000) x 4/3 = 1,932,117
    assert [c.pool for c in kv.cards] == [631_040, 1_932_117]
    assert kv.pool_bytes == 631_040 and kv.pool_tokens == 1232 and kv.pages == 38
    # rows of 50 + 14 = 64 (2 pages), 150 (5 pages), 1050 (33 pages); reserving 50 + 200: 1232 // 250 = 4
    assert kv.rows == ((14, 19, 4), (100, 7, 4), (1000, 1, 4))


def test_rows_with_kv_memory_given_or_no_gpu():
    kv = kv_plan(plan_device_map(_tiny_config(), max_memory="0=40000000"), [100], prompt_tokens=28,
                 kv_memory="64KiB")
    assert kv.source == "kv_memory" and kv.pool_tokens == 65536 // 512 == 128 and kv.rows == ((100, 1, 0),)
    cpu = kv_plan(plan_device_map(_tiny_config(), max_memory="cpu=1GiB"), [100], prompt_tokens=28)
    assert cpu.source == "cpu" and cpu.pool_bytes == 2 * 2**30 and not cpu.cards  # the CPU default
    with pytest.raises(Rank1Error, match="reasoning_tokens"):
        kv_plan(plan_device_map(_tiny_config(), max_memory="cpu=1GiB"), [0])


def test_memory_guide_rows():
    """The table of docs/loading.md's memory guide: AWQ checkpoints on a 24 GB card taken as 22.3 GiB."""
    got = {}
    for size in ("7b", "14b", "32b"):
        plan = plan_device_map(_qwen_config(size, quantization_config=AWQ), max_memory="0=22.3GiB")
        default = kv_plan(plan, [500, 1000, 8192])
        given = kv_plan(plan, [500, 1000, 8192], kv_memory=f"{22.3 - 1 - plan.total_bytes / 2**30:.2f}GiB")
        got[size] = (round(plan.total_bytes / 2**30, 2), round(default.pool_bytes / 2**30, 2),
                     [n for _, n, _ in default.rows], default.rows[0][2],
                     round(given.pool_bytes / 2**30, 2), [n for _, n, _ in given.rows], given.rows[0][2])
        print(f"\n{size}: {got[size]}\n{format_kv_plan(default)}")
    assert got == {
        "7b": (5.26, 14.81, [270, 184, 31], 31, 16.04, [293, 199, 34], 34),
        "14b": (9.44, 10.63, [56, 38, 6], 6, 11.86, [63, 43, 7], 7),
        "32b": (18.34, 1.73, [6, 4, 0], 0, 2.96, [11, 8, 1], 1),
    }


# ---- Rank1 end to end (once rank1_hf.ranker exists) ---------------------------------------------------------

PAIRS = [
    ("what is a cat", "Cats are small carnivorous mammals kept as pets."),
    ("rank1 reranker", "The weather today is sunny with light winds."),
    ("capital of france", "Paris is the capital and largest city of France."),
]


def _rank1():
    from rank1_hf.ranker import Rank1

    return Rank1


def _compare_judgements(label: str, got, want, tol: float) -> None:
    """Scores must agree where both runs reasoned the same tokens (greedy paths may fork on noise)."""
    same = [(g, w) for g, w in zip(got, want) if g.reasoning == w.reasoning]
    diffs = [abs(g.score - w.score) for g, w in same]
    print(f"\n{label}: {len(same)}/{len(want)} identical reasoning, score diffs {[round(d, 4) for d in diffs]}")
    assert len(same) >= 2
    assert max(diffs) < tol


@pytest.fixture(scope="module")
def float_scores(float_checkpoint, tokenizer):
    Rank1 = _rank1()
    ranker = Rank1(str(float_checkpoint[0]), max_new_tokens=8)
    return ranker.judge(PAIRS)


def test_rank1_bnb8_scores_close_to_float(float_checkpoint, float_scores):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the [bnb] extra)")
    got = _rank1()(str(float_checkpoint[0]), quantization="bnb-8bit", max_new_tokens=8).judge(PAIRS)
    # LLM.int8 keeps random-weight greedy paths intact here (3/3 identical); scores moved < 0.02.
    _compare_judgements("Rank1 bnb-8bit vs float32", got, float_scores, 0.05)


def test_rank1_bnb4_scores_close_to_dequantized_twin(float_checkpoint, tokenizer):
    """nf4 moves random weights too far for greedy paths to match the original, so the float
    reference is the original with bitsandbytes' own dequantized nf4 weights."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the [bnb] extra)")
    Rank1 = _rank1()
    path, original = float_checkpoint
    ranker = Rank1(str(path), quantization="bnb-4bit", max_new_tokens=8)
    twin = bnb_twin(ranker.model, original)  # before the first forward (see _bnb_twin's caller above)
    want = Rank1.from_model(twin, copy.deepcopy(tokenizer), max_new_tokens=8).judge(PAIRS)
    _compare_judgements("Rank1 bnb-4bit vs dequantized float32 twin", ranker.judge(PAIRS), want, 0.05)


def test_rank1_offload_scores_equal_float(float_checkpoint, float_scores, tmp_path):
    ranker = _rank1()(
        str(float_checkpoint[0]), device_map=MIXED_MAP, offload_folder=str(tmp_path),
        max_new_tokens=8,
    )
    got = ranker.judge(PAIRS)
    _compare_judgements("Rank1 disk offload vs in memory", got, float_scores, 1e-4)
