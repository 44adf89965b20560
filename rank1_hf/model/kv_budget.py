"""The KV budget: what one token's keys and values cost, how big the pool is by default, and how a pool
is cut into pages and rows. Used by the engine (kv_cache.py, continuous.py) and by ``rank1-hf plan``
(model/planning.py), so both count alike. torch is imported only where a model is asked about, so the
scheduler (which counts pages) stays free of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Tokens per page: the measured candidates and the choice are in benchmarks/RESULTS.md (issue 23).
PAGE_SIZE = 32

#: The KV pool on a CPU when none is asked for.
CPU_KV_MEMORY = 2 * 2**30
#: Share of each GPU's total memory kept free of the pool, for activations, captured decode steps and the
#: (rows, vocab) logits: the default pool takes the rest of the memory free once the weights are loaded,
#: so weights + pool stay at 90% of the card, as vLLM's default gpu_memory_utilization=0.9 does.
GPU_RESERVE = 0.10


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token takes in all layers (at the model's floating dtype), on one card:
    a tensor-parallel process holds its share of the KV heads."""
    import torch

    from .tensor_parallel import tp_size

    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(model, "dtype", torch.float32)
    itemsize = dtype.itemsize if dtype.is_floating_point else 2
    return 2 * config.num_hidden_layers * (kv_heads // tp_size(model)) * head_dim * itemsize


def pages_for(tokens: int, page_size: int = PAGE_SIZE) -> int:
    """Pages that hold ``tokens`` tokens (the last one may be partly filled)."""
    return -(-tokens // page_size)


def pool_pages(pool_bytes: int, bytes_per_token: int, page_size: int = PAGE_SIZE) -> tuple[int, int]:
    """(tokens, whole pages) a pool of ``pool_bytes`` holds."""
    tokens = pool_bytes // bytes_per_token
    return tokens, tokens // page_size


def pool_tokens(model: torch.nn.Module, kv_memory: int | None) -> int:
    """The engine's pool in tokens: ``kv_memory`` bytes (:func:`default_kv_memory` when None; per card under
    tensor parallel) over :func:`kv_bytes_per_token`."""
    from .tensor_parallel import agree_min, tp_size

    tokens = max(1, pool_pages(kv_memory or default_kv_memory(model), kv_bytes_per_token(model))[0])
    # Tensor-parallel processes schedule alike only with pools of one size: the least card's.
    return agree_min(tokens) if tp_size(model) > 1 else tokens


def default_kv_memory(model: torch.nn.Module) -> int:
    """Bytes for the KV pool: on CUDA what is free after loading (memory torch's allocator holds unused
    counts as free) less :data:`GPU_RESERVE` of each card (a
    device-map split is bounded by its fullest card, in proportion to the layers it holds); else
    :data:`CPU_KV_MEMORY`."""
    import torch

    from .devices import free_memory, module_device

    layers: dict[torch.device, int] = {}
    for name, module in model.named_modules():
        if name.endswith("k_proj"):  # its keys and values live where it computes (an offloaded layer: a GPU)
            device = module_device(module)
            layers[device] = layers.get(device, 0) + 1
    gpus = {d: n for d, n in layers.items() if d.type == "cuda"}
    if not gpus:
        return CPU_KV_MEMORY
    total_layers = sum(layers.values())
    return min(card_pool(*free_memory(device), held, total_layers) for device, held in gpus.items())


def card_pool(free: float, total: float, held: int, total_layers: int) -> int:
    """The whole pool one card allows: its ``free`` bytes less :data:`GPU_RESERVE` of its ``total``, which
    holds the keys and values of the ``held`` layers it has out of ``total_layers`` (every layer gets an
    equal share of the pool, on its own device). The pool of a split is the least of its cards'."""
    return int(max(0.0, free - GPU_RESERVE * total) * total_layers / held)
