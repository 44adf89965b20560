"""AWQ GEMM checkpoints on torch alone (rank1_hf.model.awq), on CPU and offline.

The checkpoints are packed by hand (tests/awq_fixture.py, written independently of rank1_hf.model.awq) and
come with their float32 twin: the same model holding exactly the weights the int4 codes stand for. So
every difference between the AWQ model and its twin is arithmetic, and the bounds below say which.
Measured differences are printed (run with ``-s``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rank1_hf.model import awq
from rank1_hf.errors import Rank1Error
from rank1_hf.model.devices import input_device
from rank1_hf.model.loading import load_model

sys.path.insert(0, str(Path(__file__).parent))
from awq_fixture import (  # noqa: E402
    build_awq_checkpoint,
    dequantize_int4,
    pack_awq_gemm,
    quantize_int4,
    unpack_awq_gemm,
)

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
    "Query: what is a cat\nPassage: Cats are small carnivorous mammals.\n<think>",
    "Query: rank1 reranker\nPassage: A passage about something else entirely.\n<think>",
]
PAIRS = [
    ("what is a cat", "Cats are small carnivorous mammals kept as pets."),
    ("rank1 reranker", "The weather today is sunny with light winds."),
    ("capital of france", "Paris is the capital and largest city of France."),
]


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
def checkpoint(tokenizer, tmp_path_factory):
    """(directory, float32 twin holding the dequantized weights)."""
    target = tmp_path_factory.mktemp("awq") / "tiny-awq"
    return target, build_awq_checkpoint(tokenizer, target, seed=0)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint[0]))[0]


def _logits(model, batch) -> torch.Tensor:
    device = input_device(model)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits[:, -1, :].float().cpu()


def _max_diff(label: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - want).abs().max().item()
    print(f"\n{label}: max |dlogit| = {diff:.4g} (logit std {want.std().item():.3g})")
    return diff


def _random_layer(n_out: int, n_in: int, seed: int = 0):
    """AWQ tensors of a random [n_out, n_in] weight, packed by the fixture, and the float32 weight."""
    torch.manual_seed(seed)
    codes, zeros, scales = quantize_int4(torch.randn(n_out, n_in) * 0.1, 128)
    return pack_awq_gemm(codes), pack_awq_gemm(zeros), scales, codes, zeros, dequantize_int4(codes, zeros, scales, 128)


# ---- the packing conversion ----------------------------------------------------------------------------


def test_unpack_reads_awq_order():
    # Columns 0..7 holding codes 0..7: AWQ puts column [0, 2, 4, 6, 1, 3, 5, 7][s] in bits 4s..4s+3,
    # so the word is 0x75316420 (transcribed by hand from the AutoAWQ packing order).
    codes = torch.arange(8).reshape(1, 8)
    word = pack_awq_gemm(codes)
    assert word.item() == 0x75316420
    assert torch.equal(awq.unpack_awq(word).long(), codes)
    # and on random codes, including words with the top bit set (negative int32)
    torch.manual_seed(0)
    many = torch.randint(0, 16, (64, 256))
    packed = pack_awq_gemm(many)
    assert (packed < 0).any()
    assert torch.equal(awq.unpack_awq(packed).long(), many)
    assert torch.equal(unpack_awq_gemm(packed), many)  # the fixture agrees with itself


def test_kernel_layout_is_exact():
    """The CPU kernel, fed float32 (scale, offset) and the identity, returns the weight bit for bit.

    (q - 8) * s + (8 - z) * s is exact in float32 for float16 scales and 4-bit codes, so any packing
    or zero-point mistake shows as inequality, not as noise.
    """
    qweight, qzeros, scales, codes, zeros, weight = _random_layer(64, 256)
    layer = awq.AwqLinear(256, 64, bias=False, group_size=128, dtype=torch.bfloat16)
    layer.load_awq(qweight, qzeros, scales, None, run_on=torch.device("cpu"))
    assert layer.layout == "cpu"
    s = scales.float()
    sz32 = torch.stack([s, (8 - zeros.float()) * s], dim=-1).contiguous()
    w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(256), layer.packed, 128, sz32)
    assert torch.equal(w_t.t(), weight)


@pytest.mark.parametrize("n_out, layout", [(64, "cpu"), (24, "dequant")])  # 24 rows do not suit the CPU kernel
def test_layer_matches_dequantized_weight(n_out, layout):
    """bfloat16 bound: scale and offset are rounded to bfloat16 (2**-9 relative each), which moves a
    weight by at most 2**-9 (|w| + 8 s); the output is rounded to bfloat16 (2**-9 |y|). Checked with
    a factor 2 of room: a wrong code moves a weight by a whole step s or more."""
    qweight, qzeros, scales, codes, zeros, weight = _random_layer(n_out, 256, seed=1)
    bias = torch.randn(n_out).half()
    layer = awq.AwqLinear(256, n_out, bias=True, group_size=128, dtype=torch.bfloat16)
    layer.load_awq(qweight, qzeros, scales, bias, run_on=torch.device("cpu"))
    assert layer.layout == layout
    x = torch.randn(5, 3, 256).to(torch.bfloat16)
    got = layer(x).float()
    assert got.shape == (5, 3, n_out) and got.dtype == torch.float32
    want = x.float() @ weight.t() + bias.float()
    step = scales.float().repeat_interleave(128, dim=0).t()  # [out, in]
    bound = 2**-8 * (x.float().abs() @ (weight.abs() + 8 * step).t() + want.abs())
    excess = (got - want).abs() - bound
    print(f"\n{layout}: max |dy| {(got - want).abs().max().item():.3g}, worst margin {excess.max().item():.3g}")
    assert (excess <= 0).all()


def test_float16_activations_come_back_as_float16():
    qweight, qzeros, scales, *_ , weight = _random_layer(32, 128)
    layer = awq.AwqLinear(128, 32, bias=False, group_size=128, dtype=torch.float16)
    layer.load_awq(qweight, qzeros, scales, None, run_on=torch.device("cpu"))
    x = torch.randn(2, 128).half()
    got = layer(x)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), x.float() @ weight.t(), rtol=0.02, atol=0.05)


# ---- checkpoints ---------------------------------------------------------------------------------------


def test_checkpoint_loads_by_path_without_gptqmodel_and_quietly(checkpoint, batch, tmp_path):
    """A fresh interpreter where gptqmodel and torchao cannot be imported (as on a plain install):
    the checkpoint loads by path with no flag, and importing and loading print nothing."""
    path, twin = checkpoint
    out = tmp_path / "logits.pt"
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import sys
        for blocked in ("gptqmodel", "torchao", "awq"):
            sys.modules[blocked] = None  # import raises ImportError; find_spec says "not installed"
        import torch
        import rank1_hf
        from rank1_hf.model.loading import load_model
        model, tok = load_model({str(path)!r})
        layer = model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "AwqLinear" and layer.layout == "cpu", layer
        assert model.dtype == torch.bfloat16, model.dtype
        assert not [m for m, v in sys.modules.items() if v is not None and m.startswith(("gptqmodel", "torchao"))]
        b = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            logits = model(**b).logits[:, -1, :].float()
        torch.save(logits, {str(out)!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout + proc.stderr)[-3000:]
    got = torch.load(out)
    assert _max_diff("AWQ in a gptqmodel-free interpreter vs twin", got, _logits(twin, batch)) < 0.2


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_logits_match_dequantized_twin(checkpoint, loaded, batch, dtype):
    """The AWQ model is its twin with bfloat16 scales/offsets and bfloat16 activations into each int4
    matmul, so it must sit within the twin's own bfloat16 noise: measured here as the twin run in
    bfloat16 against the twin in float32 (0.08 on logits of std 0.9). Bound: twice that. A wrong packing
    order reads about 6."""
    path, twin = checkpoint
    model = loaded if dtype is None else load_model(str(path), dtype=dtype)[0]
    assert model.dtype == (torch.bfloat16 if dtype is None else torch.float16)
    want = _logits(twin, batch)
    noise = _max_diff("bfloat16 twin vs float32 twin", _logits(copy.deepcopy(twin).to(torch.bfloat16), batch), want)
    diff = _max_diff(f"AWQ ({model.dtype}) vs float32 twin", _logits(model, batch), want)
    assert diff <= 2 * noise, f"AWQ differs from its dequantized twin by {diff} (bfloat16 noise {noise})"


def test_weights_stay_packed(checkpoint, loaded):
    """Each AWQ layer holds about its checkpoint bytes (0.5 byte per weight + 4 per group and output
    against AWQ's 2.5), and no float weight."""
    from safetensors import safe_open

    path, _ = checkpoint
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        stored = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, awq.AwqLinear)}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name, layer in layers.items():
        held = sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if n != "bias")
        checkpoint_bytes = sum(torch.Size(stored[f"{name}.{t}"]).numel() * 4 for t in ("qweight", "qzeros")) + \
            torch.Size(stored[f"{name}.scales"]).numel() * 2
        assert 1.0 <= held / checkpoint_bytes < 1.05, (name, held, checkpoint_bytes)
        assert not any(p.is_floating_point() and p.dim() == 2 for p in layer.parameters())


def test_auto_device_map_and_explicit_map_load_the_same(checkpoint, loaded, batch):
    path, _ = checkpoint
    want = _logits(loaded, batch)
    auto, _ = load_model(str(path), device_map="auto", max_memory={"cpu": "2GiB"})
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}
    explicit, _ = load_model(str(path), device_map=split)
    assert set(auto.hf_device_map.values()) == {"cpu"} and explicit.hf_device_map == split
    assert torch.equal(_logits(auto, batch), want) and torch.equal(_logits(explicit, batch), want)


def test_disk_offload_is_refused(checkpoint, tmp_path):
    with pytest.raises(Rank1Error, match="disk"):
        load_model(str(checkpoint[0]), device_map={"": "disk"}, offload_folder=tmp_path)


def test_float32_is_refused(checkpoint):
    with pytest.raises(Rank1Error, match="bfloat16"):
        load_model(str(checkpoint[0]), dtype="float32")


@pytest.mark.parametrize("change", [{"version": "gemv"}, {"bits": 3}, {"zero_point": False}, {"group_size": 0},
                                    {"group_size": -128}])
def test_other_awq_variants_are_refused(checkpoint, tmp_path, change):
    copy_dir = tmp_path / "variant"
    shutil.copytree(checkpoint[0], copy_dir)
    config = json.loads((copy_dir / "config.json").read_text())
    config["quantization_config"].update(change)
    (copy_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(Rank1Error, match="unsupported AWQ checkpoint"):
        load_model(str(copy_dir))


def test_fixture_packing_matches_gptqmodel():
    """The fixture's hand packing read back by gptqmodel's own AWQ dequantization (when installed)."""
    packing = pytest.importorskip("gptqmodel.quantization.awq.utils.packing_utils",
                                  reason="the cross-check against gptqmodel needs gptqmodel")
    qweight, qzeros, scales, _, _, weight = _random_layer(64, 256)
    theirs = packing.dequantize_gemm(qweight, qzeros, scales, 4, 128)  # [in, out], float16 arithmetic
    assert torch.equal(theirs.t(), weight.half())


# ---- Rank1 end to end -----------------------------------------------------------------------------------


def test_rank1_judgements_agree_with_dequantized_twin(checkpoint, tokenizer):
    """Greedy reasoning may fork on bfloat16 noise; where both runs reasoned the same tokens, the scores
    (a softmax over two logits, each within ~0.1 of the twin's) must be within 0.05."""
    from rank1_hf.ranker import Rank1  # an import error must fail, not skip

    path, twin = checkpoint
    got = Rank1(str(path), max_new_tokens=8).judge(PAIRS)
    want = Rank1.from_model(twin, copy.deepcopy(tokenizer), max_new_tokens=8).judge(PAIRS)
    same = [(g, w) for g, w in zip(got, want) if g.reasoning == w.reasoning]
    diffs = [abs(g.score - w.score) for g, w in same]
    print(f"\nRank1 AWQ vs twin: {len(same)}/{len(want)} identical reasoning, score diffs {[round(d, 4) for d in diffs]}")
    assert len(same) >= 2
    assert max(diffs) < 0.05
    assert [g.score > 0.5 for g, _ in same] == [w.score > 0.5 for _, w in same]


# ---- group sizes other than 128 -------------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64])
def test_other_group_sizes_load_and_match_their_twin(tokenizer, batch, tmp_path, group):
    """Every rank1 AWQ checkpoint uses group 128, but AutoAWQ writes others: a checkpoint packed with
    ``group`` (its scales and zero points per ``group`` input rows) loads with that group size and matches
    its dequantized twin as closely as the group-128 one does (a layer that assumed 128 reads the wrong
    scales for half the rows or more, and misses by whole quantization steps)."""
    path = tmp_path / f"awq-g{group}"
    twin = build_awq_checkpoint(tokenizer, path, seed=3, group_size=group)
    model = load_model(str(path))[0]
    layers = [m for m in model.modules() if isinstance(m, awq.AwqLinear)]
    assert layers and {m.group_size for m in layers} == {group}
    want = _logits(twin, batch)
    noise = _max_diff("bfloat16 twin vs float32 twin", _logits(copy.deepcopy(twin).to(torch.bfloat16), batch), want)
    diff = _max_diff(f"AWQ group {group} vs float32 twin", _logits(model, batch), want)
    assert diff <= 2 * noise, f"group {group}: AWQ differs from its twin by {diff} (bfloat16 noise {noise})"
