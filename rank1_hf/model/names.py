"""What a user's model, dtype and device-map names mean, without torch: the CLI checks them before anything heavy is
imported, and loading.py reads them the same way."""

from __future__ import annotations

import os

#: The device_map strategies accelerate computes from ``max_memory``.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

#: Each dtype name load_model accepts (lower case, "torch." prefix allowed) and the dtype it means;
#: "auto" means the checkpoint's own.
DTYPE_NAMES: dict[str, str] = {
    "auto": "auto",
    **{name: "float16" for name in ("float16", "fp16", "half", "torch.float16")},
    **{name: "bfloat16" for name in ("bfloat16", "bf16", "torch.bfloat16")},
    **{name: "float32" for name in ("float32", "fp32", "float", "torch.float32")},
}


def looks_like_path(name: str) -> bool:
    """A name the user meant as a folder rather than a hub id ("org/model")."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
