"""Where a model computes: the device its inputs go to, the one its logits come out on, and where a
device map puts a module.

With an accelerate device map a module may keep its weights offloaded (on the meta device or the CPU) and
run on its hook's execution device, so the hook is asked first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from torch import nn
from transformers import PreTrainedModel


def module_device(module: nn.Module) -> torch.device:
    """Where a module computes: its accelerate hook's execution device, else its weights' (or, for a
    quantized layer holding only buffers, its buffers') device.

    Offloaded (cpu/disk) modules keep their weights on the meta device or on cpu and run on the
    hook's execution device, so the hook has to be asked first.
    """
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", ())) or ([hook] if hook is not None else [])
    for h in hooks:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (nothing for other devices).

    Whichever thread drives an engine, its steps and captures must run on the engine's device: a thread's
    current device starts as cuda:0, where a rank on cuda:1 would capture on the wrong stream (and open a
    context). Set, not restored: restoring cuda:0 would open that context after all."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device)


def input_device(model: PreTrainedModel) -> torch.device:
    """The device input ids must be on: the one the token embeddings compute on."""
    return module_device(model.get_input_embeddings())


def output_device(model: PreTrainedModel) -> torch.device:
    """The device logits come out on: the one ``lm_head`` computes on."""
    head = model.get_output_embeddings()
    return module_device(head) if head is not None else input_device(model)


def mapped_device(module_name: str, device_map: Mapping[str, Union[int, str]]) -> Union[int, str, None]:
    """The device a module lands on: the entry of its longest prefix in the map."""
    best, best_len = None, -1
    for prefix, device in device_map.items():
        if prefix == "" or module_name == prefix or module_name.startswith(prefix + "."):
            if len(prefix) > best_len:
                best, best_len = device, len(prefix)
    return best


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, counting as free what torch's caching allocator holds
    without using (an earlier engine's pool, a model converted in place): ``mem_get_info`` alone sees
    that as taken, so a pool sized from it would come out too small."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(0, cached), total
