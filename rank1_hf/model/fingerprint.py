"""What identifies the weights a ranker judges with: part of the judgement store's key.

Two rankers whose weights differ must never share stored judgements, even when their names agree (two
in-memory models, a local directory whose files were replaced in place). The fingerprint is:

- a hub checkpoint: the commit its files were resolved to, ``"commit:<sha>"`` (the hub already names
  the exact bytes);
- a local directory: ``"files:<hash>"`` over its weight files, in every format transformers loads
  (``model*.safetensors`` and ``consolidated*.safetensors``, ``pytorch_model*.bin``, PEFT's
  ``adapter_model.*``, ``*.gguf``, and ``*.pt``/``*.pth``; the shard indexes), and the files that decide
  what those weights compute: ``config.json``, ``adapter_config.json``, the tokenizer's files and any
  ``*.py`` (code run with ``trust_remote_code``). Of each: its name and size, its first MiB (a safetensors
  header lists every tensor's name, dtype, shape and offset) and 256 chunks of 64 KiB spread evenly over
  the rest; a file of up to 17 MiB is read whole. That reads at most ~17 MiB per file, whatever the model
  size or how it is placed (offloaded and quantized loads included). A change confined to bytes between
  the samples of a large file goes unseen; retraining or fine-tuning changes nearly every byte;
- an in-memory model (``Rank1.from_model``): ``"tensors:<hash>"`` over every parameter and buffer: its
  name, dtype, shape and *all* its bytes: hashed as they are on the CPU (about 0.05 s for the 78 MB of
  the tests' tiny model); on an accelerator a checksum computed on the tensor's own device (no copy to
  the host): for each block of 2**20 16-bit words, their plain and position-weighted sums, exact
  integers, so any changed word changes a plain sum and any moved word a weighted one. A tensor on the meta device (offloaded by accelerate) counts by
  name, dtype and shape only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".py")
# Not weights, but they change what the weights compute (architecture, quantization, adapter scaling) or
# what the model reads (the tokenizer): a directory with any of them replaced is judged again.
_COMPUTE_FILES = frozenset({
    "config.json", "adapter_config.json", "quantization_config.json", "quant_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tekken.json", "chat_template.jinja",
})
_HEAD = 1 << 20
_CHUNK = 1 << 16
_SAMPLES = 256
# 16-bit words per checksum block: word < 2**16 and weight <= 2**20, so a block's weighted sum stays
# below 2**56 and never overflows int64.
_BLOCK = 1 << 20


def hub_fingerprint(commit: str) -> str:
    return f"commit:{commit}"


def files_fingerprint(directory: str | os.PathLike[str]) -> str:
    """``"files:<hash>"`` of the weight files directly inside ``directory`` (sampled; see the module doc)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name in _COMPUTE_FILES))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _HEAD + _SAMPLES * _CHUNK:
                h.update(f.read())
                continue
            h.update(f.read(_HEAD))
            span = size - _HEAD - _CHUNK  # the last sample ends at the file's last byte
            for k in range(_SAMPLES):
                f.seek(_HEAD + k * span // (_SAMPLES - 1))
                h.update(f.read(_CHUNK))
    return f"files:{h.hexdigest()[:32]}"


@torch.inference_mode()
def tensors_fingerprint(model: torch.nn.Module) -> str:
    """``"tensors:<hash>"`` of every parameter and buffer of ``model`` (all bytes; see the module doc)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.device.type == "cpu":
            h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif tensor.device.type != "meta":
            h.update(",".join(map(str, _checksum(tensor))).encode())
    return f"tensors:{h.hexdigest()[:32]}"


def _checksum(tensor: torch.Tensor) -> list[int]:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    odd = data.numel() % 2
    words = data[: data.numel() - odd].view(torch.int16)
    sums = []
    weights = torch.arange(1, min(_BLOCK, words.numel()) + 1, device=words.device, dtype=torch.int64)
    for start in range(0, words.numel(), _BLOCK):
        block = words[start : start + _BLOCK].to(torch.int64) & 0xFFFF
        sums.append(torch.stack([block.sum(), (block * weights[: block.numel()]).sum()]))
    # Per block (summing the weighted sums across blocks could overflow), so moving blocks shows too.
    out = [int(v) for v in torch.stack(sums).reshape(-1).tolist()] if sums else []
    if odd:
        out.append(int(data[-1]))
    return out
