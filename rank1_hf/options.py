"""The options of a ranker, as data: how to load the model, and how to judge with it.

Both are frozen and checked when made, so a bad value fails at the input boundary (a call, the command
line) and everything below trusts them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .errors import Rank1Error

ENGINES = ("auto", "continuous", "generate")
#: ``speculate``: drafts by prompt lookup verified in the continuous engine, or none; "auto" speculates
#: where decode steps run eager and not where they replay captured CUDA graphs (a verification step runs
#: eager: unmeasured against a captured step so far).
SPECULATE = ("auto", "prompt-lookup", "off")
#: The quantization names ``load_model(quantization=...)`` accepts (besides a BitsAndBytesConfig).
QUANTIZATIONS = ("bnb-4bit", "bnb-8bit")

DeviceKey = Union[int, str]
MaxMemory = dict[DeviceKey, Union[int, str]]

_SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)$", re.IGNORECASE)


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`rank1_hf.model.loading.load_model` loads a checkpoint.

    dtype: "auto" / None (the checkpoint's), "float16", "bfloat16", "float32" or a torch dtype.
    device_map: None (one device), "auto", "balanced", "balanced_low_0", "sequential", a device, or a dict.
    max_memory: per-device budget for a device map, e.g. ``{0: "40GiB", "cpu": "64GiB"}``.
    offload_folder: where weights offloaded to disk go.
    quantization: None, "bnb-4bit", "bnb-8bit" or a ``BitsAndBytesConfig`` (AWQ is read from the checkpoint).
    trust_remote_code: run code shipped with the checkpoint.
    revision: hub branch, tag or commit.
    tensor_parallel: split every layer over the processes of a ``torchrun`` job (model/tensor_parallel.py).
    """

    dtype: Any = None
    device_map: Any = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    quantization: Any = None
    trust_remote_code: bool = False
    revision: str | None = None
    tensor_parallel: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`~rank1_hf.model.loading.load_model`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class JudgeOptions:
    """How a ranker judges: what determines a judgement besides the model and the pair, and batching.

    max_new_tokens: reasoning cap, 8192 as the reference.
    context_size: prompt + max_new_tokens must fit in it (16000 as the reference); longer passages are cut
        (only the passage) and flagged ``truncated``.
    batch_size: most pairs decoded together (None: 32 on GPU, 16 on CPU).
    kv_memory: bytes for the keys and values of the pairs in flight, an int or a string such as "12GiB" or
        "500MB" (None: on CUDA the memory free once the weights are loaded, less 10% of the card kept for
        activations; on CPU 2 GiB). Pairs take it page by page as their reasoning grows.
    token_budget: retired (a pair no longer reserves prompt + max_new_tokens); use kv_memory.
    dataset_prompt: a template with ``FILL_QUERY_HERE`` applied to every query.
    engine: "continuous", "generate" or "auto" (continuous where the model's cache allows it).
    speculate: "prompt-lookup" (the continuous engine guesses each pair's next tokens from its own prompt
        and reasoning and verifies them in one step; judgements are unchanged), "off", or "auto" (the
        default: prompt lookup where decode steps run eager, on a CPU, a device map or tensor parallel;
        off on one GPU, whose plain steps are captured CUDA graphs).
    """

    max_new_tokens: int = 8192
    context_size: int = 16000
    batch_size: int | None = None
    kv_memory: int | str | None = None
    token_budget: int | None = None
    dataset_prompt: str | None = None
    engine: str = "auto"
    speculate: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise Rank1Error(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.speculate not in SPECULATE:
            raise Rank1Error(f"unknown speculate {self.speculate!r}: choose one of {', '.join(SPECULATE)}")
        if self.token_budget is not None:
            raise Rank1Error("token_budget is retired: pairs no longer reserve prompt + max_new_tokens each; give "
                             "the memory for keys and values instead, kv_memory (bytes, or a string like '12GiB')")
        for name in ("max_new_tokens", "context_size", "batch_size"):
            check_count(name, getattr(self, name))
        if self.kv_memory is not None:
            object.__setattr__(self, "kv_memory", parse_bytes(self.kv_memory, "kv_memory"))
        check_dataset_prompt(self.dataset_prompt)
        if self.context_size <= self.max_new_tokens:
            raise Rank1Error(
                f"need max_new_tokens < context_size, got {self.max_new_tokens} and {self.context_size}"
            )


def check_count(name: str, value: Any, *, optional: bool = True) -> None:
    """A count: a whole number >= 1 (or None, when ``optional``)."""
    if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise Rank1Error(f"{name} must be a whole number >= 1, got {value!r}")


def check_dataset_prompt(value: Any) -> None:
    """A dataset prompt (None allowed): a string."""
    if value is not None and not isinstance(value, str):
        raise Rank1Error(f"dataset_prompt must be a string with FILL_QUERY_HERE, got {type(value).__name__}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, name: str) -> int:
    """A size: a whole number of bytes, or a string such as ``"12GiB"``, ``"1.5 GB"``, ``"500MB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if unit not in _UNITS:
            raise Rank1Error(f"{name} must be bytes or a size such as '12GiB' or '500MB', got {value!r}")
        number = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise Rank1Error(f"{name} must be bytes or a size such as '12GiB' or '500MB', got {value!r}")
    if number < 1:
        raise Rank1Error(f"{name} must be at least 1 byte, got {value!r}")
    return number


def parse_max_memory(spec: str | Mapping[Any, Any]) -> MaxMemory:
    """Parse ``"0=40GiB,1=40GiB,cpu=100GiB"`` (or check a dict) into accelerate's ``max_memory``.

    Keys: GPU index (``0``, ``cuda:1``), ``cpu``, ``disk`` or ``mps``. Values: a size with a unit
    (``40GiB``, ``500MB``; binary units are powers of 1024, decimal ones of 1000) or a byte count.
    """
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise Rank1Error(f"bad max_memory entry '{part.strip()}'; write DEVICE=SIZE, e.g. 0=40GiB,cpu=100GiB")
            items.append((key, value))
    if not items:
        raise Rank1Error("empty max_memory; write DEVICE=SIZE pairs, e.g. 0=40GiB,cpu=100GiB")
    result: MaxMemory = {}
    for raw_key, raw_value in items:
        key_text, value = raw_key.strip().lower(), raw_value.strip()
        key: DeviceKey
        if key_text.isdigit():
            key = int(key_text)
        elif key_text.startswith("cuda:") and key_text[5:].isdigit():
            key = int(key_text[5:])
        elif key_text in ("cpu", "disk", "mps"):
            key = key_text
        else:
            raise Rank1Error(f"bad max_memory device '{raw_key.strip()}'; use a GPU index (0, 1, ...), cpu or disk")
        if value.isdigit():
            result[key] = int(value)
        elif _SIZE_RE.match(value):
            result[key] = value.replace(" ", "")
        else:
            raise Rank1Error(f"bad max_memory size '{value}' for device {key}; write e.g. 40GiB, 500MB or a byte count")
    return result
