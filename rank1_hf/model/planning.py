"""Planning a device-map split without loading weights: how many decoder layers land on each device, and
how many pairs' keys and values the KV pool left beside them would hold.

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

from rank1_hf.model.devices import mapped_device
from rank1_hf.errors import Rank1Error
from rank1_hf.model.loading import (
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
from .kv_budget import (CPU_KV_MEMORY, GPU_RESERVE, PAGE_SIZE, card_pool, kv_bytes_per_token, pages_for,
                                pool_pages)
from rank1_hf.options import QUANTIZATIONS, JudgeOptions, check_count, parse_bytes

__all__ = ["CardShare", "KvPlan", "Plan", "format_kv_plan", "format_plan", "kv_plan", "plan_device_map",
           "plan_tensor_parallel"]

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
    kv_bytes_per_token: bytes of keys and values one token takes in all layers, as the engine counts them
        (:func:`rank1_hf.model.kv_budget.kv_bytes_per_token`, at ``dtype``: quantized weights keep 16-bit keys
        and values); on one card under tensor parallel.
    tensor_parallel: the cards every layer is split over (1: a device-map split, whole layers per device).
        Each card then holds every layer's share: ``bytes_per_device`` is per card, ``layers`` lists every
        layer on every card.
    """

    device_map: dict[str, DeviceKey]
    layers: dict[DeviceKey, list[int]]
    bytes_per_device: dict[DeviceKey, int]
    total_bytes: int
    max_memory: dict[DeviceKey, int]
    dtype: torch.dtype
    quantization: str | None
    kv_bytes_per_token: int
    tensor_parallel: int = 1


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
        # "auto" as load_model resolves it: the checkpoint's dtype on GPUs, float32 on a CPU-only budget.
        torch_dtype = resolve_dtype(dtype, config, on_gpu=any(isinstance(k, int) for k in budget))

    model = _meta_model(config, torch_dtype)
    if scheme is not None:
        from rank1_hf.model.awq import AwqLinear, check_awq_config

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
        kv_bytes_per_token=kv_bytes_per_token(model),
    )


def plan_tensor_parallel(
    model_name_or_path_or_config: str | os.PathLike[str] | PretrainedConfig,
    *,
    cards: int,
    max_memory: MaxMemory | str,
    dtype: DtypeLike = "bfloat16",
) -> Plan:
    """Plan a tensor-parallel split over ``cards`` GPUs (the first ``cards`` of ``max_memory``), as transformers'
    plan does it (model/tensor_parallel.py): the parameters its ``tp_plan`` names (attention and MLP
    projections, the embeddings, ``lm_head``) are split ``cards`` ways, the rest (norms) is whole on every
    card; every card holds 1/``cards`` of the KV heads."""
    from .tensor_parallel import check_heads

    check_count("cards", cards)
    config = (model_name_or_path_or_config if isinstance(model_name_or_path_or_config, PretrainedConfig)
              else _load_config(os.fspath(model_name_or_path_or_config)))
    if is_awq_config(config):
        raise Rank1Error("tensor parallel loads no AWQ checkpoint; plan it with a device map")
    check_heads(config, cards)
    budget = parse_max_memory(max_memory)
    gpus = sorted(k for k in budget if isinstance(k, int))
    if len(gpus) < cards:
        raise Rank1Error(f"tensor parallel over {cards} cards needs {cards} GPU budgets in max_memory "
                         f"(e.g. {','.join(f'{i}=40GiB' for i in range(cards))}), got {len(gpus)}")
    gpus = gpus[:cards]
    torch_dtype = resolve_dtype(dtype, config, on_gpu=True)
    model = _meta_model(config, torch_dtype)
    # The model's whole plan, by module name: the base model's rules under its prefix, and lm_head's.
    rules = [re.compile(re.escape(rule).replace(r"\*", r"\d+") + r"\.") for rule in (model._tp_plan or {})]
    whole = split = 0
    seen: set[int] = set()
    for name, tensor in model.named_parameters(remove_duplicate=False):
        if id(tensor) in seen:  # a tied lm_head is the embedding, held whole
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        if any(rule.match(name) for rule in rules):
            split += size
        else:
            whole += size
    per_card = whole + -(-split // cards)
    layers = list(range(config.get_text_config().num_hidden_layers))
    return Plan(
        device_map={},
        layers={g: layers for g in gpus},
        bytes_per_device={g: per_card for g in gpus},
        total_bytes=whole + split,
        max_memory={g: _size_to_bytes(budget[g]) for g in gpus},
        dtype=torch_dtype,
        quantization=None,
        kv_bytes_per_token=kv_bytes_per_token(model) // cards,
        tensor_parallel=cards,
    )


@dataclass(frozen=True)
class CardShare:
    """What one GPU of a plan allows the KV pool (the rule of :func:`rank1_hf.model.kv_budget.default_kv_memory`).

    budget: its ``max_memory``, taken as the card. weights: bytes planned on it. reserve: ``GPU_RESERVE``
    of the budget. layers: decoder layers it holds, of total_layers. pool: the whole pool this card allows,
    (budget - weights - reserve) x total_layers / layers.
    """

    device: DeviceKey
    budget: int
    weights: int
    reserve: int
    layers: int
    total_layers: int
    pool: int


@dataclass(frozen=True)
class KvPlan:
    """How many pairs' keys and values the KV pool of a plan holds at a few reasoning lengths.

    bytes_per_token: K+V bytes of one token in all layers. pool_bytes: the pool (``kv_memory`` when given,
    else the least of ``cards``' shares; on a plan with no GPU layers the CPU default). pool_tokens and
    pages: the pool as the engine cuts it (``pool_bytes // bytes_per_token`` tokens, pages of ``PAGE_SIZE``).
    rows: (reasoning tokens, rows that fit, rows the old reserve-at-max engine took) per length asked: a row
    of prompt + reasoning tokens holds ceil((prompt + reasoning) / PAGE_SIZE) pages; the old engine
    reserved prompt + max_new_tokens tokens for every row however short its reasoning.
    """

    bytes_per_token: int
    dtype: torch.dtype
    pool_bytes: int
    pool_tokens: int
    pages: int
    source: str  # "kv_memory", "gpus" or "cpu"
    cards: tuple[CardShare, ...]
    prompt_tokens: int
    max_new_tokens: int
    rows: tuple[tuple[int, int, int], ...]
    tensor_parallel: int = 1


def kv_plan(plan: Plan, reasoning_tokens: list[int] | tuple[int, ...] = (1000,), *, prompt_tokens: int = 500,
            kv_memory: int | str | None = None, max_new_tokens: int = JudgeOptions.max_new_tokens) -> KvPlan:
    """The KV pool a plan leaves and the rows it holds at each of ``reasoning_tokens`` (no model needed).

    Without ``kv_memory`` the pool is what ``default_kv_memory`` would give once these weights are on
    these cards, each GPU's ``max_memory`` taken as the card: per GPU holding layers, budget - weights -
    ``GPU_RESERVE`` x budget, scaled to the whole pool by the share of layers it holds (each layer keeps its
    keys and values on its own device); the least of them. A plan with no layer on a GPU gets the CPU default.
    """
    for name, value in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
        check_count(name, value)
    if not reasoning_tokens:
        raise Rank1Error("give at least one reasoning length")
    for value in reasoning_tokens:
        check_count("reasoning_tokens", value)
    # Tensor parallel: each card holds every layer (its share of the heads), so its own pool serves them all.
    total_layers = (len(next(iter(plan.layers.values()))) if plan.tensor_parallel > 1
                    else sum(len(ix) for ix in plan.layers.values()))
    cards: list[CardShare] = []
    for device, ix in plan.layers.items():
        if isinstance(device, int) and ix:
            budget, weights = plan.max_memory[device], plan.bytes_per_device.get(device, 0)
            cards.append(CardShare(device, budget, weights, int(GPU_RESERVE * budget), len(ix), total_layers,
                                   card_pool(budget - weights, budget, len(ix), total_layers)))
    cards.sort(key=lambda c: c.device)
    if kv_memory is not None:
        pool, source = parse_bytes(kv_memory, "kv_memory"), "kv_memory"
    elif cards:
        pool, source = min(c.pool for c in cards), "gpus"
    else:
        pool, source = CPU_KV_MEMORY, "cpu"
    tokens, pages = pool_pages(pool, plan.kv_bytes_per_token)
    rows = tuple(
        (r, pages // pages_for(prompt_tokens + r), tokens // (prompt_tokens + max_new_tokens))
        for r in reasoning_tokens
    )
    return KvPlan(plan.kv_bytes_per_token, plan.dtype, pool, tokens, pages, source, tuple(cards),
                  prompt_tokens, max_new_tokens, rows, plan.tensor_parallel)


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
    if plan.tensor_parallel > 1:
        return _format_tensor_plan(plan)
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


def _format_tensor_plan(plan: Plan) -> str:
    """Tensor parallel: every card holds 1/N of every layer, the same bytes on each."""
    n = plan.tensor_parallel
    layers = len(next(iter(plan.layers.values())))
    lines = [f"plan: {str(plan.dtype).removeprefix('torch.')} weights, tensor parallel over {n} cards "
             f"(every layer's heads and projections, the embeddings and lm_head split {n} ways)"]
    rows = [("device", "layers", "size", "budget")]
    for device, size in sorted(plan.bytes_per_device.items()):
        rows.append((f"cuda:{device}", f"1/{n} of 0-{layers - 1} ({layers})", _gib(size), _gib(plan.max_memory[device])))
    rows.append(("total", str(layers), _gib(plan.total_bytes), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    body = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    body.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines + body)


def _size(n: int) -> str:
    """Bytes in KiB, MiB or GiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.2f} KiB"


def format_kv_plan(kv: KvPlan) -> str:
    """The KV pool of a plan and the rows it holds: a few lines and a small table."""
    dtype = str(kv.dtype).removeprefix("torch.")
    per = f"{_size(kv.bytes_per_token)} per token" + (" per card (its share of the KV heads)" if kv.tensor_parallel > 1 else "")
    lines = [f"KV cache: {per} (keys + values, all layers, {dtype})"]
    if kv.source == "kv_memory":
        lines.append(f"KV pool: {_size(kv.pool_bytes)} (--kv-memory)")
    elif kv.source == "cpu":
        lines.append(f"KV pool: {_size(kv.pool_bytes)} (the default with no layer on a GPU)")
    elif kv.tensor_parallel > 1:
        lines.append(f"KV pool: {_size(kv.pool_bytes)} per card (the default: budget - weights - {GPU_RESERVE:.0%} "
                     "reserve; the least card's)")
    else:
        lines.append(f"KV pool: {_size(kv.pool_bytes)} (the default: per GPU, budget - weights - "
                     f"{GPU_RESERVE:.0%} reserve, over its share of the layers; the least)")
    if kv.source == "kv_memory" and kv.cards:
        lines.append(f"  (the default here would be {_size(min(c.pool for c in kv.cards))}:)")
    for c in kv.cards:
        left = c.budget - c.weights - c.reserve
        share = "" if c.layers == c.total_layers else f" x {c.total_layers}/{c.layers} layers"
        lines.append(f"  cuda:{c.device}: {_size(c.budget)} - {_size(c.weights)} - {_size(c.reserve)} = "
                     f"{_size(max(0, left))}{share} -> {_size(c.pool)}")
    lines.append(f"  = {kv.pool_tokens:,} tokens ({kv.pages:,} pages of {PAGE_SIZE})"
                 + (f" on each of the {kv.tensor_parallel} cards, for the same rows" if kv.tensor_parallel > 1 else ""))
    lines.append(f"rows that fit, each a prompt of {kv.prompt_tokens:,} tokens + its reasoning so far:")
    head = ("reasoning", "rows", f"rows reserving prompt + {kv.max_new_tokens:,} each (the old engine)")
    table = [head] + [(f"{r:,}", f"{n:,}", f"{old:,}") for r, n, old in kv.rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    body = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    body.insert(1, "-+-".join("-" * w for w in widths))
    lines += body
    lines.append("(rows in flight are also capped by batch_size: 32 on a GPU, 16 on a CPU, unless set)")
    short = [r for r, n, _ in kv.rows if n == 0]
    if short:
        lines.append(f"0 rows: not one pair of prompt + {min(short):,} tokens fits; judging stops with an error when a "
                     f"pair reasons that long (give more --kv-memory, or a lower --max-new-tokens)")
    return "\n".join(lines)
