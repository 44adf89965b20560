"""AutoAWQ GEMM checkpoints (the jhu-clsp ``-awq`` variants) on torch alone: int4 weights kept packed.

An AWQ GEMM Linear is stored as

* ``qweight`` int32 [in, out/8] and ``qzeros`` int32 [in/group, out/8]: eight 4-bit codes per word,
  lowest bits first, the columns of each block of eight in AWQ's order [0, 2, 4, 6, 1, 3, 5, 7] (bits
  4s..4s+3 hold column ``AWQ_ORDER[s]`` of the block);
* ``scales`` float16 [in/group, out]; the weight a code q stands for is ``(q - zero) * scale``.

torch's int4 weight-only kernels (``aten._weight_int4pack_mm`` on CUDA, ``_weight_int4pack_mm_for_cpu``
on CPU; the kernels gpt-fast and torchao use) compute ``(q - 8) * scale + offset`` per (group, output)
from a [in/group, out, 2] ``scales_and_zeros`` tensor. With ``offset = (8 - zero) * scale`` that is
``(q - zero) * scale`` again, so the conversion only re-orders codes (exactly) and folds each zero point
into an offset. The kernels take bfloat16 (CUDA accepts nothing else; on CPU float16/float32 measured
3-50x slower), so scales and offsets are rounded to bfloat16 (2**-9 relative, the same size as rounding
the weights themselves to bfloat16) and activations are cast to bfloat16 around each int4 matmul.

Where a kernel is missing, fails its probe, or a shape does not suit it, a layer keeps natural-order
nibbles and dequantizes before an ordinary matmul (correct everywhere, not fast).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rank1_hf.errors import Rank1Error

__all__ = [
    "AWQ_ORDER",
    "AwqLinear",
    "awq_checkpoint_files",
    "check_awq_config",
    "empty_awq_model",
    "load_awq_weights",
    "unpack_awq",
]

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Bit offset of column j of a block of eight: column j sits in slot AWQ_ORDER.index(j).
_SHIFTS = tuple(4 * AWQ_ORDER.index(j) for j in range(8))

#: The dtype torch's int4 kernels compute in (activations, scales and offsets).
KERNEL_DTYPE = torch.bfloat16

_CUDA_GROUP_SIZES = (32, 64, 128, 256)
_kernel_ok: dict[str, bool] = {}  # device type -> the kernel ran and matched a plain dequantization


def check_awq_config(quantization_config: Any) -> int:
    """The group size of a supported AWQ config (4-bit GEMM with zero points); Rank1Error otherwise."""
    qc = quantization_config if isinstance(quantization_config, Mapping) else quantization_config.to_dict()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    version = str(qc.get("version", "gemm")).lower().rsplit(".", 1)[-1]
    zero_point = bool(qc.get("zero_point", True))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if bits != 4 or version != "gemm" or not zero_point or group <= 0:
        raise Rank1Error(
            f"unsupported AWQ checkpoint (bits={bits}, version={version}, zero_point={zero_point}, "
            f"group_size={group}); rank1-hf loads AutoAWQ 4-bit GEMM checkpoints with zero points"
        )
    return group


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [rows, cols/8] in AWQ's order -> 4-bit codes [rows, cols] (uint8, natural order)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then mask
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> uint8 [N, K/2], even k in the high nibble (the input CUDA's converter takes)."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4) | codes[:, 1::2]


def _codes_from_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    return torch.stack([nibbles >> 4, nibbles & 0xF], dim=-1).reshape(nibbles.shape[0], -1)


def _scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[in/g, out] scales and zero codes -> the kernels' [in/g, out, 2] (scale, offset) in bfloat16."""
    scale = scales.to(KERNEL_DTYPE).float()  # the offset is built from the scale the kernel will use
    offset = (8.0 - zeros.float()) * scale
    return torch.stack([scale, offset], dim=-1).to(KERNEL_DTYPE).contiguous()


def _cuda_inner_k_tiles(n_in: int, n_out: int, group_size: int) -> int | None:
    if n_out % 8 or group_size not in _CUDA_GROUP_SIZES:
        return None
    return next((t for t in (8, 4, 2) if n_in % (16 * t) == 0), None)


def _pack_for(device: torch.device, codes: torch.Tensor, group_size: int) -> tuple[str, torch.Tensor]:
    """(layout, packed weight) for codes [N, K] (uint8) running on ``device``."""
    n_out, n_in = codes.shape
    if device.type == "cpu" and n_out % 16 == 0 and _kernel_works("cpu"):
        return "cpu", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).cpu(), 8)
    if device.type == "cuda" and _kernel_works("cuda", device):
        tiles = _cuda_inner_k_tiles(n_in, n_out, group_size)
        if tiles is not None:
            return "cuda", torch.ops.aten._convert_weight_to_int4pack(_nibbles(codes).to(device), tiles)
    return "dequant", _nibbles(codes)


def _kernel_matmul(layout: str, x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    if layout == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


def _kernel_works(kind: str, device: torch.device | None = None) -> bool:
    """Run the int4 kernel once on a small random layer and compare it with a plain dequantization.

    Catches a missing op, a GPU the kernel does not support, and a torch whose packing differs from
    what this module assumes (that would give errors of order one, far above bfloat16 rounding).
    """
    if kind in _kernel_ok:
        return _kernel_ok[kind]
    ok = False
    try:
        generator = torch.Generator().manual_seed(0)
        n_out, n_in, group = 32, 256, 128
        codes = torch.randint(0, 16, (n_out, n_in), generator=generator).to(torch.uint8)
        zeros = torch.randint(0, 16, (n_in // group, n_out), generator=generator)
        scales = torch.rand(n_in // group, n_out, generator=generator) * 0.02 + 0.01
        x = torch.randn(3, n_in, generator=generator).to(KERNEL_DTYPE)
        target = device if device is not None else torch.device(kind)
        sz = _scales_and_zeros(scales, zeros)
        if kind == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(_nibbles(codes).to(target), 8)
        got = _kernel_matmul(kind, x.to(target), packed, group, sz.to(target)).float().cpu()
        want = x.float() @ _dequantize(codes, sz, group, torch.float32).t()
        ok = bool((got - want).abs().max() <= 0.02 * want.abs().max())
        if not ok:
            logger.warning("torch's int4 %s kernel disagrees with a plain dequantization; AWQ dequantizes instead", kind)
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        logger.info("torch's int4 %s kernel is unavailable (%s); AWQ dequantizes instead", kind, str(error).splitlines()[0])
    _kernel_ok[kind] = ok
    return ok


def _dequantize(codes: torch.Tensor, sz: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes [N, K] and (scale, offset) [K/g, N, 2] -> the weight [N, K] the kernels compute with."""
    scale = sz[..., 0].float().t().repeat_interleave(group, dim=1)
    offset = sz[..., 1].float().t().repeat_interleave(group, dim=1)
    return ((codes.float() - 8.0) * scale + offset).to(dtype)


class AwqLinear(nn.Module):
    """A Linear whose weight stays int4-packed: 0.5 byte per weight plus 4 bytes per (group, output).

    Built empty (on the meta device, for planning and for loading), then filled by :meth:`load_awq` for
    the device it will run on. ``layout`` says which kernel the packed weight is laid out for:
    ``"cpu"``, ``"cuda"`` or ``"dequant"`` (natural-order nibbles, dequantized per call). The packed
    tensors are parameters without gradients, so accelerate can offload them like any weight.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % group_size or in_features % 2 or out_features % 8:
            raise Rank1Error(
                f"AWQ layer {in_features}->{out_features} does not fit group size {group_size} and 8-column packing"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = "dequant"
        meta = torch.device("meta")
        self.packed = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=meta), requires_grad=False)
        groups = in_features // group_size
        self.scales_and_zeros = nn.Parameter(
            torch.empty(groups, out_features, 2, dtype=KERNEL_DTYPE, device=meta), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=meta), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, layout={self.layout}"

    @torch.no_grad()
    def load_awq(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        run_on: torch.device,
        store_on: torch.device | None = None,
    ) -> None:
        """Convert one AWQ GEMM layer's tensors into the layout of the kernel that runs on ``run_on``.

        ``store_on`` (default ``run_on``) is where the tensors are kept: it differs for layers that
        accelerate offloads to the CPU and runs on a GPU.
        """
        n_in, n_out, groups = self.in_features, self.out_features, self.in_features // self.group_size
        expected = {"qweight": (n_in, n_out // 8), "qzeros": (groups, n_out // 8), "scales": (groups, n_out)}
        for label, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if tuple(tensor.shape) != expected[label]:
                raise Rank1Error(f"AWQ {label} has shape {tuple(tensor.shape)}, expected {expected[label]}")
        store_on = store_on if store_on is not None else run_on
        work = run_on if run_on.type == "cuda" else torch.device("cpu")  # unpack where the data will be
        codes = unpack_awq(qweight.to(work)).t().contiguous()  # [out, in]
        zeros = unpack_awq(qzeros.to(work))  # [in/g, out]
        self.layout, packed = _pack_for(run_on, codes, self.group_size)
        self.packed = nn.Parameter(packed.to(store_on), requires_grad=False)
        self.scales_and_zeros = nn.Parameter(_scales_and_zeros(scales.to(work), zeros).to(store_on), requires_grad=False)
        if self.bias is not None:
            if bias is None:
                raise Rank1Error("AWQ layer declares a bias but the checkpoint has none")
            self.bias = nn.Parameter(bias.to(device=store_on, dtype=self.bias.dtype), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer multiplies by (only for ``layout == "dequant"``)."""
        return _dequantize(_codes_from_nibbles(self.packed), self.scales_and_zeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.layout == "dequant":
            out = F.linear(rows, self.dequantized_weight(x.dtype))
        else:
            if x.device.type != self.layout:
                raise Rank1Error(
                    f"this AWQ layer was packed for {self.layout} and cannot run on {x.device}; "
                    "load the model with the device_map it will run with"
                )
            sz = self.scales_and_zeros
            out = _kernel_matmul(self.layout, rows.to(KERNEL_DTYPE).contiguous(), self.packed, self.group_size,
                                 sz if sz.dtype == KERNEL_DTYPE else sz.to(KERNEL_DTYPE)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


# --------------------------------------------------------------------------------------------------
# checkpoints


def awq_checkpoint_files(name: str, *, revision: str | None = None) -> list[str]:
    """The safetensors files of a checkpoint (a local directory or a hub id, through the HF cache)."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(name, filename, revision=revision, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        files = [find(shard) for shard in shards]
        missing = [shard for shard, path in zip(shards, files) if path is None]
        if missing:
            raise Rank1Error(f"cannot load model '{name}': missing weight shards {missing[:3]}")
        return [f for f in files if f is not None]
    single = find("model.safetensors")
    if single is None:
        raise Rank1Error(f"cannot load model '{name}': no model.safetensors (AWQ checkpoints are read from safetensors)")
    return [single]


def _checkpoint_keys(files: Iterable[str]) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in files:
        with safe_open(path, framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def empty_awq_model(config: Any, files: list[str], dtype: torch.dtype, *, trust_remote_code: bool = False) -> nn.Module:
    """The model built without weights (parameters on the meta device), its AWQ Linears swapped in.

    The quantized modules are the ones the checkpoint holds ``qweight`` for, so whatever AutoAWQ left
    unconverted (``modules_to_not_convert``, lm_head) stays an ordinary Linear.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    group = check_awq_config(config.quantization_config)
    plain = copy.deepcopy(config)
    del plain.quantization_config  # build the float architecture; its Linears are replaced below
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(plain, dtype=dtype, trust_remote_code=trust_remote_code)
    quantized = sorted(k.removesuffix(".qweight") for k in _checkpoint_keys(files) if k.endswith(".qweight"))
    if not quantized:
        raise Rank1Error("the config says AWQ but the checkpoint has no qweight tensors")
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise Rank1Error(f"AWQ checkpoint has weights for '{name}', which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise Rank1Error(f"AWQ checkpoint quantizes '{name}', which is a {type(linear).__name__}, not a Linear")
        model.set_submodule(
            name, AwqLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group, dtype=dtype)
        )
    model.config.quantization_config = config.quantization_config  # the loaded model says what it is
    return model


def _torch_device(device: Any) -> torch.device:
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def _place(module_name: str, device_map: Mapping[str, Any]) -> torch.device:
    from rank1_hf.model.devices import mapped_device

    device = mapped_device(module_name, device_map)
    if device is None:
        raise Rank1Error(f"the device_map places no device for '{module_name}'")
    return _torch_device(device)


@torch.no_grad()
def load_awq_weights(model: nn.Module, files: list[str], device_map: Mapping[str, Any], dtype: torch.dtype) -> None:
    """Read the checkpoint into an :func:`empty_awq_model`, each tensor straight to its device.

    A module placed on "cpu" while the map also holds GPUs runs on the first GPU (that is how
    accelerate's ``dispatch_model`` offloads it), so its AWQ layers are packed for that GPU and kept on
    the CPU.
    """
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    devices = list(device_map.values())
    if "disk" in devices:
        raise Rank1Error("AWQ layers cannot be offloaded to disk; give max_memory a larger cpu budget instead")
    gpus = [d for d in devices if d not in ("cpu", "disk", "meta")]
    main = _torch_device(gpus[0]) if gpus else torch.device("cpu")
    awq_modules = {name: m for name, m in model.named_modules() if isinstance(m, AwqLinear)}
    wanted = dict(model.named_parameters())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                module_name, _, tensor_name = key.rpartition(".")
                if module_name in awq_modules:
                    pending.setdefault(module_name, {})[tensor_name] = handle.get_tensor(key)
                    parts = pending[module_name]
                    module = awq_modules[module_name]
                    if {"qweight", "qzeros", "scales"} <= parts.keys() and ("bias" in parts or module.bias is None):
                        store_on = _place(module_name, device_map)
                        run_on = main if store_on.type == "cpu" else store_on
                        module.load_awq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("bias"),
                                        run_on=run_on, store_on=store_on)
                        del pending[module_name]
                elif key in wanted:
                    tensor = handle.get_tensor(key)
                    target = _place(module_name, device_map)
                    set_module_tensor_to_device(model, key, target, value=tensor,
                                                dtype=dtype if tensor.is_floating_point() else None)
                else:
                    logger.debug("checkpoint tensor %s has no place in the model; ignored", key)
    if pending:
        raise Rank1Error(f"AWQ checkpoint is missing tensors for {sorted(pending)[:3]} (need qweight, qzeros, scales)")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise Rank1Error(f"AWQ checkpoint is missing weights: {', '.join(missing[:5])}")
