"""Planning a device-map split without loading weights: how many decoder layers land on each device.

The model is built on the meta device from its config, quantized Linear layers are replaced by
stand-ins of the right byte size, and the split is computed the way ``from_pretrained`` computes it.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from rank1_hf.devices import mapped_device
from rank1_hf.errors import Rank1Error
from rank1_hf.loading import (
    DEVICE_MAP_STRATEGIES,
    DeviceKey,
    DtypeLike,
    MaxMemory,
    _checkpoint_dtype,
    _infer_device_map,
    _load_config,
    _parse_dtype,
    _size_to_bytes,
    is_awq_config,
    parse_max_memory,
    resolve_dtype,
)
from rank1_hf.options import QUANTIZATIONS

__all__ = ["Plan", "format_plan", "plan_device_map"]

class _QuantizedLinearShape(nn.Module):
    """A stand-in for a quantized Linear on the meta device: only its tensors' shapes and dtypes.

    accelerate sizes a module by the bytes of its parameters and buffers, so giving the stand-in the
    tensors the real quantized layer holds makes the plan count the quantized bytes.
    """

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        for name, (shape, dtype) in tensors.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))


def _quantized_tensors(linear: nn.Linear, scheme: str, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors a bitsandbytes-quantized version of ``linear`` holds.

    bnb-4bit: packed uint8 (0.5 byte per weight) + one float32 absmax per 64 weights (~0.56 B/weight).
    bnb-8bit: int8 weight + one float32 scale per output row (~1 byte per weight).
    """
    n_in, n_out = linear.in_features, linear.out_features
    if scheme == "bnb-4bit":
        tensors = {
            "weight": ((n_in * n_out // 2, 1), torch.uint8),
            "absmax": (((n_in * n_out + 63) // 64,), torch.float32),
        }
    else:  # bnb-8bit
        tensors = {"weight": ((n_out, n_in), torch.int8), "SCB": ((n_out,), torch.float32)}
    if linear.bias is not None:
        tensors["bias"] = ((n_out,), dtype)
    return tensors


@dataclass(frozen=True)
class Plan:
    """Where each part of a model would go, computed from its config alone (no weights read).

    device_map: accelerate's map, module prefix -> device (GPU index, "cpu" or "disk").
    layers: device -> indices of the decoder layers it holds (each layer lies whole on one device).
    bytes_per_device: device -> bytes of weights placed there.
    total_bytes: bytes of all weights.
    max_memory: the budget per device, in bytes.
    dtype: dtype of the unquantized weights.
    quantization: "awq", "bnb-4bit", "bnb-8bit" or None; quantized sizes are counted from the real
        quantized layouts (exact for AWQ, within a few percent for bitsandbytes).
    """

    device_map: dict[str, DeviceKey]
    layers: dict[DeviceKey, list[int]]
    bytes_per_device: dict[DeviceKey, int]
    total_bytes: int
    max_memory: dict[DeviceKey, int]
    dtype: torch.dtype
    quantization: str | None


def _meta_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the plain architecture; quantized layers are swapped in below
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def plan_device_map(
    model_name_or_path_or_config: str | os.PathLike[str] | PretrainedConfig,
    *,
    max_memory: MaxMemory | str,
    dtype: DtypeLike = "bfloat16",
    quantization: str | None = None,
    device_map: str = "auto",
) -> Plan:
    """Plan how a model would be split over devices, without loading or even allocating weights.

    The model is built on the meta device from its config, quantized Linear layers are replaced by
    stand-ins of the right byte size (AWQ from the config, or ``quantization="bnb-4bit"/"bnb-8bit"``),
    and the split is computed the way ``from_pretrained`` does it: ``get_balanced_memory`` for
    "auto"/"balanced"/"balanced_low_0", then ``infer_auto_device_map`` with the model's
    ``_no_split_modules`` (e.g. Qwen2DecoderLayer), so no decoder layer is ever cut in two.
    GPU indices in ``max_memory`` need not exist on this machine.
    """
    if isinstance(model_name_or_path_or_config, PretrainedConfig):
        config = model_name_or_path_or_config
    else:
        config = _load_config(os.fspath(model_name_or_path_or_config))
    budget = parse_max_memory(max_memory)
    if device_map not in DEVICE_MAP_STRATEGIES:
        raise Rank1Error(f"bad device_map '{device_map}' for planning; use one of {', '.join(DEVICE_MAP_STRATEGIES)}")

    scheme: str | None = None
    if is_awq_config(config):
        if quantization:
            raise Rank1Error(f"this checkpoint is already AWQ-quantized; drop quantization={quantization!r}")
        scheme, torch_dtype = "awq", resolve_dtype(dtype, config, on_gpu=True)
    else:
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise Rank1Error(f"unknown quantization '{quantization}'; use one of: {', '.join(QUANTIZATIONS)}")
        scheme = quantization
        torch_dtype = _parse_dtype(dtype) or _checkpoint_dtype(config)

    model = _meta_model(config, torch_dtype)
    if scheme is not None:
        from rank1_hf.awq import AwqLinear, check_awq_config

        head = model.get_output_embeddings()
        group = check_awq_config(config.quantization_config) if scheme == "awq" else 0
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or module is head:
                continue
            if scheme == "awq":  # the very layer loading builds, still empty
                stand_in: nn.Module = AwqLinear(
                    module.in_features, module.out_features, bias=module.bias is not None, group_size=group, dtype=torch_dtype
                )
            else:
                stand_in = _QuantizedLinearShape(_quantized_tensors(module, scheme, torch_dtype))
            model.set_submodule(name, stand_in)

    from transformers.integrations.accelerate import compute_module_sizes

    placed = _infer_device_map(model, device_map, budget)

    sizes, _ = compute_module_sizes(model)
    per_device: dict[DeviceKey, int] = {}
    for prefix, device in placed.items():
        per_device[device] = per_device.get(device, 0) + int(sizes.get(prefix, 0))
    layers: dict[DeviceKey, list[int]] = {}
    layer_re = re.compile(r"(?:^|\.)layers\.(\d+)$")
    for name, _module in model.named_modules():
        match = layer_re.search(name)
        if match:
            device = mapped_device(name, placed)
            layers.setdefault(device, []).append(int(match.group(1)))
    return Plan(
        device_map=placed,
        layers={d: sorted(ix) for d, ix in layers.items()},
        bytes_per_device=per_device,
        total_bytes=int(sizes[""]),
        max_memory={k: _size_to_bytes(v) for k, v in budget.items()},
        dtype=torch_dtype,
        quantization=scheme,
    )


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5,6] -> "0-2, 5-6"."""
    parts: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(parts)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A readable table: device | layers | other modules | size | budget."""
    devices = list(dict.fromkeys(list(plan.bytes_per_device) + list(plan.layers)))
    order = {d: (0, d) if isinstance(d, int) else (1, ["mps", "cpu", "disk"].index(d) if d in ("mps", "cpu", "disk") else 9) for d in devices}
    devices.sort(key=lambda d: order[d])
    rows = [("device", "layers", "other modules", "size", "budget")]
    for device in devices:
        idx = plan.layers.get(device, [])
        others = [p for p, d in plan.device_map.items() if d == device and not re.search(r"layers\.\d+$", p)]
        budget = plan.max_memory.get(device)
        rows.append(
            (
                f"cuda:{device}" if isinstance(device, int) else str(device),
                f"{_ranges(idx)} ({len(idx)})" if idx else "-",
                ", ".join(o.rsplit(".", 1)[-1] if o else "(all)" for o in others) or "-",
                _gib(plan.bytes_per_device.get(device, 0)),
                _gib(budget) if budget is not None else "-",
            )
        )
    n_layers = sum(len(v) for v in plan.layers.values())
    rows.append(("total", str(n_layers), "", _gib(plan.total_bytes), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    title = f"plan: {plan.quantization or str(plan.dtype).removeprefix('torch.')} weights"
    return title + "\n" + "\n".join(lines)
