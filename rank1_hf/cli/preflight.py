"""The checks the CLI makes before torch or transformers are imported, so that a mistake is answered in a
second: the loading and judging flags, and whether ``--model`` can be found at all (a local folder, the hub
cache, or a reachable hub). Messages name the command-line flag, never the Python parameter behind it."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import Rank1Error
from ..model.names import DEVICE_MAP_STRATEGIES, DTYPE_NAMES, hub_offline, looks_like_path
from ..options import LoadOptions, parse_max_memory

# A device torch would parse: cpu, cuda, cuda:1, mps, xpu:0, ... or a bare GPU index; torch itself has the
# last word once the model loads.
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|mlu|xla|meta|disk)(:\d+)?|\d+")
# The Python parameter names a library message may carry, and the flag each is given by.
_PARAMETERS = re.compile(r"\b(max_new_tokens|context_size|batch_size|kv_memory|dataset_prompt|engine|top_k|"
                         r"max_memory|device_map|offload_folder|flush_every|flush_seconds)\b")
_HUB = "https://huggingface.co"
_PROBE_TIMEOUT_S = 3.0


def as_flags(message: str, prefix: str = "") -> str:
    """``message`` with each Python parameter name written as its flag (``kv_memory`` -> ``--kv-memory``)."""
    return _PARAMETERS.sub(lambda m: f"--{prefix}{m.group(1).replace('_', '-')}", message)


def check_load_flags(load: LoadOptions, prefix: str = "") -> None:
    """--dtype, --device-map, --max-memory and --offload-folder (``--b-dtype``... with ``prefix="b-"``),
    checked as text; the CLI turns --max-memory into the dict the library takes."""
    flag = f"--{prefix}"
    if load.dtype is not None and str(load.dtype).strip().lower() not in DTYPE_NAMES:
        raise Rank1Error(f"{flag}dtype: unknown dtype {load.dtype!r}; use auto, float16, bfloat16 or float32")
    if load.max_memory is not None:
        try:
            parse_max_memory(load.max_memory)
        except Rank1Error as e:
            raise Rank1Error(f"{flag}max-memory: {e}") from None
    if load.device_map is not None and load.device_map not in DEVICE_MAP_STRATEGIES \
            and not _DEVICE.fullmatch(str(load.device_map)):
        raise Rank1Error(f"{flag}device-map: bad value {load.device_map!r}; use a device (cpu, cuda:0) or one of "
                         + ", ".join(DEVICE_MAP_STRATEGIES))
    folder = load.offload_folder
    if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
        raise Rank1Error(f"{flag}offload-folder {folder}: not a directory")
    if load.tensor_parallel:
        from ..model.tensor_parallel import layout_from_env

        given = [f"{flag}{name.replace('_', '-')}" for name in ("device_map", "max_memory", "offload_folder", "quantization")
                 if getattr(load, name) is not None]
        if given:
            raise Rank1Error(f"{flag}tensor-parallel splits every layer over the processes itself: drop "
                             + ", ".join(given))
        layout_from_env()  # torchrun's environment is there, on one node


def check_model(name: str, flag: str = "--model", revision: str | None = None) -> None:
    """``name`` must be a model folder, a hub id in the local hub cache, or a hub id while the hub answers.

    Without this, transformers retries an unreachable hub for about 30 s before saying so. Behind a proxy
    (HTTPS_PROXY, ALL_PROXY) the hub is not probed: a direct connection says nothing there.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise Rank1Error(f"{flag} {name}: a folder without config.json, not a Hugging Face model folder")
        return
    if path.exists():
        raise Rank1Error(f"{flag} {name}: is a file; give the model's folder (holding config.json) or a hub id")
    if looks_like_path(name):
        raise Rank1Error(f"{flag} {name}: no such folder")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise Rank1Error(f"{flag} {name!r}: neither a local folder nor a hub id such as jhu-clsp/rank1-7b")
    if _in_hub_cache(name, revision):
        return
    if hub_offline():
        raise Rank1Error(f"{flag} {name}: not a local folder and not in the hub cache, and HF_HUB_OFFLINE is set; "
                         "download it where the hub is reachable or pass a local folder")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or _HUB
    problem = _unreachable(endpoint)
    if problem:
        raise Rank1Error(f"{flag} {name}: not a local folder, not in the hub cache, and the hub {endpoint} cannot "
                         f"be reached ({problem}); pass a local folder, download it where the hub is reachable, "
                         "or set HF_HUB_OFFLINE=1 to load from the cache only")


def _in_hub_cache(name: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # transformers needs it; without it the load fails with its own message
        return True
    try:
        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except Exception:  # an odd id or cache layout: let transformers decide
        return False


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` fails within a few seconds, or None when it connects."""
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"bad HF_ENDPOINT {endpoint!r}"
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None
