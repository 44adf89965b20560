"""Loading rank1 checkpoints on plain transformers: dtype, device placement, quantization.

Everything a user can get wrong here (a missing path, a missing optional extra, a bad ``max_memory``
string, an unknown quantization name) becomes a one-line :class:`Rank1Error`, not a traceback.

Three kinds of weights are handled:

* full precision checkpoints (rank1-7b/-14b/-32b, rank1-llama3-8b, rank1-mistral-2501-24b);
* the ``-awq`` variants: AutoAWQ int4 GEMM (group 128, zero point). They are recognised from
  ``config.json``'s ``quantization_config`` and need no flag nor extra package: :mod:`rank1_hf.model.awq`
  keeps their weights packed and runs torch's own int4 kernels;
* on-the-fly bitsandbytes quantization of a full precision checkpoint (``quantization="bnb-4bit"`` or
  ``"bnb-8bit"``; ``pip install 'rank1-hf[bnb]'``).

Several GPUs are used model-parallel (whole decoder layers per device) through accelerate's device
maps; :func:`rank1_hf.model.planning.plan_device_map` shows such a split without loading any weights.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rank1_hf.errors import Rank1Error
from rank1_hf.options import QUANTIZATIONS, DeviceKey, MaxMemory, parse_max_memory

from .names import DEVICE_MAP_STRATEGIES, DTYPE_NAMES, hub_offline, looks_like_path

__all__ = [
    "is_awq_config",
    "load_model",
    "parse_max_memory",
    "resolve_dtype",
]

DtypeLike = Union[str, torch.dtype, None]


# Every accepted dtype name but "auto" (names.py) as a torch dtype.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items() if dtype != "auto"
}

# Pad token candidates, most preferred first. A pad token only ever fills left-padding that the
# attention mask hides, so any token works; a dedicated or reserved one keeps pads from being mistaken
# for a real end of text (eos) when outputs are post-processed.
_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",  # Llama 3.1: reserved for exactly this
    "<pad>",  # Mistral (Tekken, SentencePiece)
    "[PAD]",
    "<|pad|>",
    "<|endoftext|>",  # Qwen2.5's own pad
)

# --------------------------------------------------------------------------------------------------
# small helpers


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (transformers' messages run to paragraphs)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _require(module: str, extra: str, why: str) -> None:
    """Import an optional dependency or raise a Rank1Error that says which extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise Rank1Error(f"{why}; install the extra: pip install 'rank1-hf[{extra}]'") from None


def _cannot_load(name: str, error: BaseException) -> Rank1Error:
    """Turn a config/tokenizer/weights loading failure into a one-line Rank1Error."""
    if os.path.isdir(name):
        return Rank1Error(f"cannot load model '{name}': {_first_line(error)}")
    if looks_like_path(name):
        return Rank1Error(f"cannot load model '{name}': no such local directory")
    if hub_offline():
        return Rank1Error(
            f"cannot load model '{name}': not a local directory and the Hugging Face hub is unreachable (offline)"
        )
    return Rank1Error(
        f"cannot load model '{name}': not a local directory and not fetched from the Hugging Face hub "
        f"({_first_line(error)})"
    )


def _load_config(name: str, *, trust_remote_code: bool = False, revision: str | None = None) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, KeyError) as error:  # HFValidationError is a ValueError
        raise _cannot_load(name, error) from None


def _quant_method(config: PretrainedConfig) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def is_awq_config(config: PretrainedConfig) -> bool:
    """True for a checkpoint whose config.json declares an AWQ ``quantization_config``."""
    return _quant_method(config) == "awq"


def _checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the weights were saved in (config ``dtype``/``torch_dtype``); float32 if unstated."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _TORCH_DTYPES:
        return _TORCH_DTYPES[value]
    return torch.float32


def _parse_dtype(dtype: DtypeLike) -> torch.dtype | None:
    """A torch dtype from a name or dtype; None for None/"auto"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _TORCH_DTYPES.values():
            raise Rank1Error(f"unsupported dtype {dtype}; use float16, bfloat16, float32 or auto")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _TORCH_DTYPES:
        raise Rank1Error(f"unknown dtype '{dtype}'; use float16, bfloat16, float32 or auto")
    return _TORCH_DTYPES[name]


def resolve_dtype(dtype: DtypeLike, config: PretrainedConfig, *, on_gpu: bool) -> torch.dtype:
    """The dtype the model will compute in.

    ``None``/``"auto"``: AWQ checkpoints -> bfloat16 (torch's int4 kernels compute in bfloat16, and it
    is the dtype rank1 was trained in); otherwise the checkpoint's own dtype when the model goes on a
    GPU, and float32 on a CPU-only placement (half precision matmuls on CPU are slow on many processors
    and lose accuracy for no memory benefit worth the risk). An explicit dtype is kept, except that AWQ
    refuses float32 (float16 works: activations are cast to bfloat16 around each int4 matmul).
    """
    wanted = _parse_dtype(dtype)
    if is_awq_config(config):
        if wanted is None:
            return torch.bfloat16
        if wanted == torch.float32:
            raise Rank1Error("AWQ checkpoints compute in bfloat16 or float16, not float32; pass dtype='bfloat16'")
        return wanted
    if wanted is not None:
        return wanted
    return _checkpoint_dtype(config) if on_gpu else torch.float32


def _resolve_device_map(device_map: Any, max_memory: MaxMemory | None) -> str | dict[str, Any]:
    """A device map transformers accepts: a strategy name or a dict (module prefix -> device)."""
    if device_map is None:
        if max_memory:
            return "auto"  # a memory budget only makes sense with a computed split
        return {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if isinstance(device_map, (int, torch.device)):
        return {"": device_map}
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_STRATEGIES:
            return device_map
        try:
            return {"": str(torch.device(device_map))}
        except RuntimeError:
            pass
    raise Rank1Error(
        f"bad device_map {device_map!r}; use None, a device ('cpu', 'cuda:0'), a dict, or one of "
        + ", ".join(DEVICE_MAP_STRATEGIES)
    )


def _map_uses_gpu(device_map: str | dict[str, Any]) -> bool:
    """Whether weights will sit on an accelerator (decides the "auto" dtype)."""
    if isinstance(device_map, str):
        return torch.cuda.is_available()
    for device in device_map.values():
        if isinstance(device, int):
            return True
        if str(device) not in ("cpu", "disk", "meta"):
            return True
    return False


def _map_uses_disk(device_map: str | dict[str, Any], max_memory: MaxMemory | None) -> bool:
    if isinstance(device_map, dict) and "disk" in device_map.values():
        return True
    return bool(max_memory) and "disk" in max_memory


def _size_to_bytes(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return int(convert_file_size_to_int(value))


def _quantization_config(quantization: Any, config: PretrainedConfig, dtype: torch.dtype) -> Any:
    """The transformers quantization config for ``load_model(quantization=...)`` (None for none)."""
    if quantization is None or (isinstance(quantization, str) and quantization.lower() in ("", "none")):
        return None
    if _quant_method(config) is not None:
        raise Rank1Error(
            f"this checkpoint is already quantized ({_quant_method(config)}); drop quantization={quantization!r}"
        )
    if not isinstance(quantization, str):
        from transformers.utils.quantization_config import QuantizationConfigMixin

        if not isinstance(quantization, QuantizationConfigMixin):
            raise Rank1Error(f"bad quantization {quantization!r}; use one of: {', '.join(QUANTIZATIONS)}")
        method = getattr(quantization, "quant_method", "")
        if str(getattr(method, "value", method)) == "bitsandbytes":
            _require("bitsandbytes", "bnb", "bitsandbytes quantization needs the bitsandbytes package")
        return quantization  # passed through untouched: the caller chose every setting
    name = quantization.strip().lower()
    if name not in QUANTIZATIONS:
        raise Rank1Error(f"unknown quantization '{quantization}'; use one of: {', '.join(QUANTIZATIONS)}")
    _require("bitsandbytes", "bnb", f"quantization='{name}' needs the bitsandbytes package")
    from transformers import BitsAndBytesConfig

    if name == "bnb-8bit":
        # LLM.int8 casts float32/bfloat16 activations to float16 and warns on every matmul of every
        # forward pass; the cast is expected, the flood of warnings is not useful.
        warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast", category=UserWarning)
        return BitsAndBytesConfig(load_in_8bit=True)
    # nf4 computing in the model's dtype: bfloat16 for the bfloat16-trained rank1 checkpoints (float16
    # could overflow their activations; bnb's kernels are as fast in either), float32 on CPU by default.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A pad token for a tokenizer that has none: a dedicated/reserved token if present, else eos."""
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab:
            return candidate
    reserved = sorted(t for t in vocab if re.fullmatch(r"<\|reserved_special_token_\d+\|>", t))
    if reserved:
        return reserved[0]
    return tokenizer.eos_token


def _load_tokenizer(name: str, *, trust_remote_code: bool, revision: str | None) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, padding_side="left", trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError, KeyError) as error:
        raise _cannot_load(name, error) from None
    # Decoder-only batching needs left padding: every row's last prompt token sits at position -1.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        pad = _choose_pad_token(tokenizer)
        if pad is None:
            raise Rank1Error(f"cannot load model '{name}': its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = pad
    return tokenizer


# --------------------------------------------------------------------------------------------------
# loading


def check_load_options(
    *, dtype: DtypeLike = None, device_map: Any = None, max_memory: MaxMemory | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None, quantization: Any = None, **_: Any,
) -> None:
    """The checks :func:`load_model` makes on its options, without a config or any weights: the CLI runs
    them before reading a checkpoint, so a bad ``--b-dtype`` fails before variant A is loaded and judged.
    Takes :class:`~rank1_hf.options.LoadOptions` as keywords (``**options.as_kwargs()``)."""
    _parse_dtype(dtype)
    if max_memory is not None:
        max_memory = parse_max_memory(max_memory)
    if device_map is not None:
        _resolve_device_map(device_map, max_memory)
    if isinstance(quantization, str) and quantization not in QUANTIZATIONS:
        raise Rank1Error(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if offload_folder is not None and os.path.exists(offload_folder) and not os.path.isdir(offload_folder):
        raise Rank1Error(f"offload folder {os.fspath(offload_folder)} is not a directory")


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' progress bars (weights loading, GGUF conversion) off for the block, unless this
    package's logger is enabled for INFO (``logging.basicConfig(level=logging.INFO)`` asks for them)."""
    from transformers.utils import logging as hf_logging

    if logging.getLogger("rank1_hf").isEnabledFor(logging.INFO) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@quiet_progress_bars()
def load_model(
    model_name_or_path: str,
    *,
    dtype: DtypeLike = None,
    device_map: str | dict[str, Any] | int | torch.device | None = None,
    max_memory: MaxMemory | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantization: str | Any | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    tensor_parallel: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a rank1 checkpoint and its tokenizer, ready for inference (``model.eval()``).

    Args:
        model_name_or_path: a local directory or a hub id (hub ids need the hub to be reachable).
        dtype: ``None``/``"auto"``, ``"float16"``, ``"bfloat16"``, ``"float32"`` or a torch dtype.
            Auto: AWQ checkpoints load in bfloat16; other checkpoints in their saved dtype (bfloat16 for
            rank1) when placed on a GPU, and in **float32 on a CPU-only placement**.
        device_map: ``None`` puts the whole model on one device (``cuda:0`` if CUDA is available, else
            ``cpu``; or ``"auto"`` when ``max_memory`` is given); a device name; ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate splits whole decoder
            layers across GPUs, then CPU, then disk); or an explicit ``{module prefix: device}`` dict.
        max_memory: per-device budget, ``{0: "40GiB", 1: "40GiB", "cpu": "100GiB"}`` or the same as a
            string ``"0=40GiB,1=40GiB,cpu=100GiB"``.
        offload_folder: directory for weights offloaded to disk (needed when any go there).
        quantization: ``None``, ``"bnb-4bit"`` (nf4, computing in the model's dtype: the checkpoint's
            on GPU, float32 by default on CPU), ``"bnb-8bit"`` (LLM.int8), or a transformers ``BitsAndBytesConfig`` (or
            other quantization config) passed through. AWQ checkpoints need no flag.
        trust_remote_code: run code shipped with the checkpoint (off unless asked; rank1 needs none).
        revision: hub revision (branch, tag or commit).
        tensor_parallel: under ``torchrun --nproc-per-node N``, split every layer's heads and projections
            over the N processes (:mod:`rank1_hf.model.tensor_parallel`; heads and KV heads must divide by N;
            no device map, memory budget or quantization with it).

    Returns:
        ``(model, tokenizer)``. The tokenizer pads on the left; if it had no pad token one is set: a
        dedicated or reserved token when the vocabulary has one (``<|finetune_right_pad_id|>`` for
        Llama 3, ``<pad>`` for Mistral), else eos. Padding is always masked, so the choice never changes
        scores. Feed inputs to :func:`rank1_hf.model.devices.input_device` and read logits from :func:`rank1_hf.model.devices.output_device`.

    Raises:
        Rank1Error: unknown path/id, missing optional extra (``rank1-hf[bnb]``), bad
            dtype/device_map/max_memory/quantization, an AWQ variant other than 4-bit GEMM.
    """
    name = os.fspath(model_name_or_path)
    config = _load_config(name, trust_remote_code=trust_remote_code, revision=revision)
    if tensor_parallel:
        parallel = _tensor_parallel_arguments(config, device_map, max_memory, offload_folder, quantization)
        if parallel is None:  # a job of one process: the whole model on this process's device
            return load_model(name, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                              revision=revision)
        torch_dtype = resolve_dtype(dtype, config, on_gpu=torch.cuda.is_available())
        try:
            model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch_dtype, revision=revision,
                                                         trust_remote_code=trust_remote_code, **parallel)
        except OSError as error:
            raise _cannot_load(name, error) from None
        return model, _finish(model, name, trust_remote_code, revision)
    if max_memory is not None:
        max_memory = parse_max_memory(max_memory)  # also validates a dict
    resolved_map = _resolve_device_map(device_map, max_memory)
    on_gpu = _map_uses_gpu(resolved_map)

    torch_dtype = resolve_dtype(dtype, config, on_gpu=on_gpu)
    quant_config = _quantization_config(quantization, config, torch_dtype)

    if is_awq_config(config):
        model = _load_awq(name, config, torch_dtype, resolved_map, max_memory, trust_remote_code, revision)
        return model, _finish(model, name, trust_remote_code, revision)
    if _map_uses_disk(resolved_map, max_memory) and offload_folder is None:
        raise Rank1Error("weights offloaded to disk need a folder: pass offload_folder=...")

    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": torch_dtype,
        "device_map": resolved_map,
        "trust_remote_code": trust_remote_code,
        "revision": revision,
    }
    if max_memory:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = os.fspath(offload_folder)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as error:
        raise _cannot_load(name, error) from None
    except ValueError as error:
        # e.g. accelerate decided to offload to disk with no folder, or a device that does not exist
        if "offload" in str(error).lower():
            raise Rank1Error(
                f"cannot load model '{name}': the device map offloads to disk; pass offload_folder=..."
            ) from None
        raise
    return model, _finish(model, name, trust_remote_code, revision)


def _tensor_parallel_arguments(config: PretrainedConfig, device_map: Any, max_memory: Any, offload_folder: Any,
                               quantization: Any) -> dict[str, Any] | None:
    """Join torchrun's job and return the ``from_pretrained`` keywords that split the model over its processes
    (None for a job of one process)."""
    from . import tensor_parallel

    given = [flag for flag, value in (("device_map", device_map), ("max_memory", max_memory),
                                      ("offload_folder", offload_folder), ("quantization", quantization))
             if value is not None]
    if given or is_awq_config(config):
        what = ", ".join(given) if given else "an AWQ checkpoint"
        raise Rank1Error(f"tensor_parallel splits every layer over the processes itself: it takes no {what}")
    layout = tensor_parallel.layout_from_env()
    tensor_parallel.check_heads(config, layout.size)
    tensor_parallel.start(layout)
    return tensor_parallel.load_arguments(config) if layout.size > 1 else None


def _finish(model: PreTrainedModel, name: str, trust_remote_code: bool, revision: str | None) -> PreTrainedTokenizerBase:
    """Put a loaded model in eval mode and load its tokenizer."""
    model.eval()
    tokenizer = _load_tokenizer(name, trust_remote_code=trust_remote_code, revision=revision)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate's pad warning
    return tokenizer


def _load_awq(
    name: str,
    config: PretrainedConfig,
    dtype: torch.dtype,
    device_map: str | dict[str, Any],
    max_memory: MaxMemory | None,
    trust_remote_code: bool,
    revision: str | None,
) -> PreTrainedModel:
    """An AWQ checkpoint through :mod:`rank1_hf.model.awq`: built empty, swapped, read tensor by tensor."""
    from accelerate import dispatch_model
    from transformers import GenerationConfig

    from rank1_hf.model import awq

    try:
        files = awq.awq_checkpoint_files(name, revision=revision)
    except OSError as error:
        raise _cannot_load(name, error) from None
    model = awq.empty_awq_model(config, files, dtype, trust_remote_code=trust_remote_code)
    if isinstance(device_map, str):  # a strategy: split the empty model as from_pretrained would
        budget = max_memory or _available_memory()
        device_map = _infer_device_map(model, device_map, budget)
    awq.load_awq_weights(model, files, device_map, dtype)
    devices = set(device_map.values())
    if len(devices) > 1:
        dispatch_model(model, device_map=device_map)  # hooks move activations between devices
    else:
        model.to(_torch_device(devices.pop()))  # parameters are there already; this moves the buffers
    model.hf_device_map = dict(device_map)
    try:
        model.generation_config = GenerationConfig.from_pretrained(name, revision=revision)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
    return model


def _torch_device(device: DeviceKey) -> torch.device:
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def _available_memory() -> MaxMemory:
    from accelerate.utils import get_max_memory

    return dict(get_max_memory())


@contextmanager
def _quiet(logger_names: tuple[str, ...]) -> Iterator[None]:
    """Silence warnings such as accelerate's "Device 1 is not available" while planning fake GPUs."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _infer_device_map(model: nn.Module, strategy: str, budget: MaxMemory) -> dict[str, DeviceKey]:
    """accelerate's split of an (empty) model for a strategy, whole decoder layers per device."""
    from transformers.integrations.accelerate import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = model._no_split_modules
    with _quiet(("accelerate", "accelerate.utils.modeling", "transformers.integrations.accelerate")):
        if strategy == "sequential":
            memory = get_max_memory(dict(budget))
        else:
            memory = get_balanced_memory(
                model, max_memory=dict(budget), no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0"
            )
        return dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split))
