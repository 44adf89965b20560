"""Tiny checkpoints for the loading tests, built on CPU in a second: a float Qwen2 and its AWQ twin
(plus ``bnb_twin``: the float model holding the weights bitsandbytes actually stores).

The AWQ checkpoint is written by hand in the AutoAWQ "GEMM" layout that the real jhu-clsp/rank1-*-awq
checkpoints use (int4, zero point, group 128), so the loading path is the real one:

* each Linear weight W [out, in] is split into groups of ``group_size`` input rows; per group and
  output column: ``scale = (max - min) / 15`` (stored as float16) and ``zero = round(-min / scale)``
  in 0..15, and ``q = clamp(round(W / scale) + zero, 0, 15)``; the weight it stands for is
  ``(q - zero) * scale``;
* ``qweight`` int32 [in, out/8] and ``qzeros`` int32 [in/group, out/8] pack eight 4-bit codes per word,
  lowest bits first, with the columns of each block of eight interleaved in AWQ's order
  [0, 2, 4, 6, 1, 3, 5, 7] (the GEMM kernels unpack in that order);
* ``scales`` float16 [in/group, out]; biases stay float16; lm_head and embeddings are not quantized.

The returned reference model holds exactly those dequantized weights in float32, so AWQ logits can be
compared with a float model that differs only by the bfloat16 arithmetic of the int4 kernels.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def tiny_qwen2_config(vocab_size: int, **overrides: object) -> Qwen2Config:
    """A 2-layer Qwen2 whose Linear sizes suit AWQ group 128 (in features 128 or 256, out % 8 == 0)."""
    params: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    params.update(overrides)
    return Qwen2Config(**params)


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: object) -> Qwen2ForCausalLM:
    """A random float32 tiny Qwen2 matching ``tokenizer``; weights scaled up so logits are not flat."""
    torch.manual_seed(seed)
    config = tiny_qwen2_config(len(tokenizer), **overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = Qwen2ForCausalLM(config)
    # The default init (std 0.02) gives near-uniform logits over 150k tokens; larger weights make
    # logit differences (and so quantization errors) visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per (input group, output column).

    Args:
        weight: [out, in] float.
    Returns:
        codes int64 [in, out] in 0..15, zeros int64 [in/group, out] in 0..15, scales float16 [in/group, out].
    """
    w = weight.detach().float().t()  # [in, out]: AWQ stores the input dimension first
    n_in, n_out = w.shape
    grouped = w.reshape(n_in // group_size, group_size, n_out)
    wmin = grouped.amin(dim=1).clamp(max=0.0)
    wmax = grouped.amax(dim=1).clamp(min=0.0)
    # Scales are rounded to float16 first and the codes derived from the rounded scales, so that
    # (q - zero) * scale reproduces the stored checkpoint exactly.
    scales = ((wmax - wmin).clamp(min=1e-6) / 15.0).to(torch.float16)
    s = scales.float()
    zeros = torch.round(-wmin / s).clamp(0, 15)
    codes = torch.round(grouped / s[:, None, :] + zeros[:, None, :]).clamp(0, 15)
    return codes.reshape(n_in, n_out).long(), zeros.long(), scales


def dequantize_int4(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """The float32 [out, in] weight that int4 codes stand for."""
    z = zeros.repeat_interleave(group_size, dim=0).float()
    s = scales.repeat_interleave(group_size, dim=0).float()
    return ((codes.float() - z) * s).t().contiguous()


def pack_awq_gemm(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [rows, cols] into int32 [rows, cols/8] in AutoAWQ GEMM order."""
    rows, cols = codes.shape
    blocks = codes.long().reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64, device=codes.device)
    for slot in range(8):
        packed |= (blocks[..., slot] & 0xF) << (4 * slot)
    # int32 storage: words with the top bit set are negative (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_awq_gemm(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq_gemm` (codes [rows, cols])."""
    words = packed.long() & 0xFFFFFFFF
    slots = torch.stack([(words >> (4 * s)) & 0xF for s in range(8)], dim=-1)  # [rows, cols/8, 8]
    natural = torch.empty_like(slots)
    natural[..., list(AWQ_ORDER)] = slots
    return natural.reshape(packed.shape[0], -1)


def save_float_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> Path:
    """Save a float model and its tokenizer as a loadable checkpoint directory."""
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_awq_checkpoint(
    tokenizer: PreTrainedTokenizerBase, target: Path, *, seed: int = 0, group_size: int = 128, **overrides: object
) -> Qwen2ForCausalLM:
    """Write a tiny AWQ GEMM checkpoint to ``target`` and return its float32 dequantized twin.

    Every Linear inside the decoder layers is quantized (as AutoAWQ does; lm_head is left alone).
    ``overrides`` change the config (sizes for benchmarks: in features a multiple of ``group_size``).
    """
    model = tiny_qwen2(tokenizer, seed=seed, **overrides)
    state: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for name, module in model.model.layers.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        full = f"model.layers.{name}"
        codes, zeros, scales = quantize_int4(module.weight, group_size)
        with torch.no_grad():
            module.weight.copy_(dequantize_int4(codes, zeros, scales, group_size))
        state[f"{full}.qweight"] = pack_awq_gemm(codes)
        state[f"{full}.qzeros"] = pack_awq_gemm(zeros)
        state[f"{full}.scales"] = scales.contiguous()
        if module.bias is not None:
            state[f"{full}.bias"] = module.bias.detach().to(torch.float16).contiguous()
        quantized.add(full)
    for key, tensor in model.state_dict().items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in quantized:
            continue
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to embed_tokens; safetensors refuses shared tensors
        state[key] = tensor.detach().to(torch.float16).contiguous()

    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(target)
    return model


def bnb_twin(quantized: nn.Module, original: nn.Module) -> nn.Module:
    """A float32 copy of ``original`` whose Linear weights are the ones bitsandbytes actually stores."""
    import bitsandbytes as bnb

    twin = copy.deepcopy(original)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127.0
        else:
            continue
        twin.get_submodule(name).weight.data.copy_(weight.float())
    return twin
