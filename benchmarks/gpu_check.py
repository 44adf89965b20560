"""One-GPU smoke checks for rank1_hf.model.loading, a few minutes on one CUDA GPU (needs no hub access).

    python benchmarks/gpu_check.py            # all checks
    python benchmarks/gpu_check.py --skip 7b  # skip the 7B-shaped forward (needs ~16 GB of GPU memory)
    python benchmarks/gpu_check.py --cpu-smoke  # no GPU: the AWQ checks on CPU with a small shape

Checks (each in its own try/except; a failure is reported and the next check runs):

1. a 7B-shaped Qwen2 (random weights, bfloat16, on cuda:0): batched left-padded forward vs each row
   alone - no NaN, last-position logits agree;
2. bitsandbytes 4-bit and 8-bit through ``load_model`` on a small saved model, vs float;
3. a tiny AWQ GEMM checkpoint (packed by tests/awq_fixture.py) through ``load_model`` on CUDA, vs its
   dequantized twin, on cuda:0 alone and split cuda:0 + cpu (the cpu layers offloaded);
4. a device map split across cuda:0 and cpu, vs the model on cuda:0 alone;
5. a 7B-shaped random Qwen2 packed as AWQ int4 (rank1_hf.model.awq on torch's CUDA int4 kernel) against its
   dequantized bfloat16 twin: ms per decode step at batch 1 and 16, max logit difference.

Prints a markdown table of what ran, passed or failed, with timings and measured differences.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RESULTS: list[tuple[str, str, float, str]] = []  # (check, status, seconds, detail)


def run(name: str, check: Callable[[], str]) -> None:
    """Run one check, recording PASS/FAIL, its time and its one-line detail."""
    print(f"--- {name}", flush=True)
    start = time.perf_counter()
    try:
        detail = check()
        status = "PASS"
    except Exception as error:  # report and carry on: one broken check must not hide the others
        traceback.print_exc()
        detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        status = "FAIL"
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - start
    RESULTS.append((name, status, seconds, detail))
    print(f"    {status} in {seconds:.1f}s: {detail}", flush=True)


def _tokenizer():
    from rank1_hf.testing import qwen_tokenizer

    tok = copy.deepcopy(qwen_tokenizer())
    tok.padding_side = "left"
    return tok


PROMPTS = [
    "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
    "Query: what is a cat\nPassage: Cats are small carnivorous mammals kept as pets worldwide.\n<think>",
    "Query: capital of france\nPassage: Paris.\n<think>",
    "Query: x\nPassage: y\n<think>",
]


def _last_logits(model, batch, device) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits[:, -1, :].float().cpu()


def check_7b_padding() -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer()
    config = Qwen2Config(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda:0"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    build = time.perf_counter() - t0
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    t1 = time.perf_counter()
    together = _last_logits(model, batch, "cuda:0")
    batched = time.perf_counter() - t1
    alone = torch.cat([_last_logits(model, tok([p], return_tensors="pt"), "cuda:0") for p in PROMPTS])
    nan = bool(torch.isnan(together).any() or torch.isnan(alone).any())
    diff = (together - alone).abs().max().item()
    same_top = bool(torch.equal(together.argmax(-1), alone.argmax(-1)))
    del model
    if nan:
        raise AssertionError("NaN logits in the left-padded batch")
    # bfloat16 with different padding/kernels: a few bf16 ulps of the logit scale is expected.
    if diff > 0.25 * together.std().item() + 0.1:
        raise AssertionError(f"batched vs single rows differ by {diff:.3g}")
    return f"build {build:.1f}s, batched fwd {batched:.2f}s, max |dlogit| batched vs alone {diff:.3g}, same argmax {same_top}"


def _small_float_checkpoint(root: Path):
    from awq_fixture import save_float_checkpoint, tiny_qwen2

    tok = _tokenizer()
    model = tiny_qwen2(tok, seed=1, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2)
    return save_float_checkpoint(model, tok, root / "small"), model, tok


def check_bnb(root: Path) -> str:
    """Each quantized model against its twin: the float model holding the weights bitsandbytes stores.

    Against the original float model nf4 rounding alone moves a random tiny model's logits far (a first
    H200 run read a cosine of 0.75 there), so that comparison is printed, not checked.
    """
    from awq_fixture import bnb_twin
    from rank1_hf.model.devices import input_device
    from rank1_hf.model.loading import load_model

    path, original, tok = _small_float_checkpoint(root)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    want = _last_logits(original, batch, "cpu")
    parts = []
    # Bounds in units of the logits' spread. On CPU this model reads 0.15 (4-bit) and 0.36 (8-bit, which
    # also quantizes activations); a wrong packing or scale reads well above 1.
    for quantization, tolerance in (("bnb-4bit", 0.3), ("bnb-8bit", 0.6)):
        t0 = time.perf_counter()
        model, _ = load_model(str(path), quantization=quantization)
        twin = _last_logits(bnb_twin(model, original), batch, "cpu")
        got = _last_logits(model, batch, input_device(model))
        diff = (got - twin).abs().max().item() / twin.std().item()  # in units of the logits' spread
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
        parts.append(f"{quantization}: {model.dtype}, {input_device(model)}, max |dlogit| / std vs dequantized twin "
                     f"{diff:.3g}, min cosine vs float {cos:.3f}, {time.perf_counter() - t0:.1f}s")
        if torch.isnan(got).any() or diff > tolerance:
            raise AssertionError("; ".join(parts))
        del model
    return "; ".join(parts)


def check_awq(root: Path, device: str = "cuda:0") -> str:
    """Bound 0.2 on logits of std ~0.9: on CPU the same check reads 0.06 (bfloat16 noise; the twin run
    in bfloat16 reads 0.07); a wrong packing reads ~6."""
    from awq_fixture import build_awq_checkpoint
    from rank1_hf.model.devices import input_device
    from rank1_hf.model.loading import load_model

    tok = _tokenizer()
    twin = build_awq_checkpoint(tok, root / "awq")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    want = _last_logits(twin, batch, "cpu")
    parts = []
    split = {"model.embed_tokens": device, "lm_head": device, "model.layers.0": device, "model.layers.1": "cpu",
             "model.norm": device, "model.rotary_emb": device}
    for label, device_map in (("one device", device), ("split", split)):
        model, _ = load_model(str(root / "awq"), device_map=device_map)
        layers = model.model.layers
        layouts = sorted({layers[0].mlp.up_proj.layout, layers[1].mlp.up_proj.layout})
        got = _last_logits(model, batch, input_device(model))
        diff = (got - want).abs().max().item()
        parts.append(f"{label}: layouts {layouts}, {model.dtype}, max |dlogit| vs dequantized twin {diff:.3g}")
        if torch.isnan(got).any() or diff > 0.2:
            raise AssertionError("; ".join(parts))
        del model
    return "; ".join(parts)


def _decode_step_ms(model, device: str, batch_size: int, steps: int = 10, context: int = 64) -> float:
    """Median ms of one decode step (one token per row) after a ``context``-token prefill."""
    ids = torch.randint(100, 1000, (batch_size, context), device=device)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cache = out.past_key_values
    times.sort()
    return 1000 * times[len(times) // 2]


AWQ_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
              intermediate_size=18944, vocab_size=152064)
AWQ_SMOKE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=152064)


def check_awq_7b(device: str = "cuda:0", shape: dict | None = None) -> str:
    """A random Qwen2 whose decoder Linears are int4-quantized (group 128) and held twice: as AwqLinear
    (packed, torch's int4 kernel) and as their dequantized bfloat16 weights in the twin. Same model
    object, Linears swapped between the two measurements, so only one copy of the rest is held.

    Targets: AWQ's decode step at batch 1 <= 0.5x the bfloat16 step (a quarter of the weight bytes);
    max logit difference within bfloat16 noise (checked: < 0.1 x the logits' std + 0.1).
    """
    from awq_fixture import dequantize_int4, pack_awq_gemm, quantize_int4
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rank1_hf.model.awq import AwqLinear

    shape = shape or AWQ_7B
    config = Qwen2Config(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    target = torch.device(device)
    packed: dict[str, torch.nn.Module] = {}
    floats: dict[str, torch.nn.Module] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, module in list(model.model.layers.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            full = f"model.layers.{name}"
            codes, zeros, scales = quantize_int4(module.weight, 128)
            module.weight.copy_(dequantize_int4(codes, zeros, scales, 128).to(torch.bfloat16))
            layer = AwqLinear(module.in_features, module.out_features, bias=module.bias is not None,
                              group_size=128, dtype=torch.bfloat16)
            layer.load_awq(pack_awq_gemm(codes), pack_awq_gemm(zeros), scales,
                           None if module.bias is None else module.bias.half(), run_on=target)
            packed[full], floats[full] = layer, module
            del codes, zeros, scales
    pack_s = time.perf_counter() - t0
    layouts = sorted({m.layout for m in packed.values()})
    ids = torch.randint(100, 1000, (4, 48), device=device)

    def measure() -> tuple[torch.Tensor, float, float]:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :].float().cpu()
        return logits, _decode_step_ms(model, device, 1), _decode_step_ms(model, device, 16)

    want, bf16_b1, bf16_b16 = measure()
    weight_bytes = {"bf16": sum(p.numel() * p.element_size() for m in floats.values() for p in m.parameters())}
    for name, layer in packed.items():
        model.set_submodule(name, layer)
    del floats
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    weight_bytes["awq"] = sum(p.numel() * p.element_size() for m in packed.values() for p in m.parameters())
    got, awq_b1, awq_b16 = measure()
    diff = (got - want).abs().max().item()
    std = want.std().item()
    detail = (f"layouts {layouts}, packed in {pack_s:.0f}s; decoder Linear bytes awq/bf16 "
              f"{weight_bytes['awq'] / weight_bytes['bf16']:.3f}; ms/step b1 awq {awq_b1:.2f} vs bf16 {bf16_b1:.2f} "
              f"({awq_b1 / bf16_b1:.2f}x), b16 awq {awq_b16:.2f} vs bf16 {bf16_b16:.2f} ({awq_b16 / bf16_b16:.2f}x); "
              f"max |dlogit| vs dequantized twin {diff:.3g} (logit std {std:.3g})")
    del model, packed
    if torch.isnan(got).any() or diff > 0.1 * std + 0.1:
        raise AssertionError(detail)
    return detail


def check_split(root: Path) -> str:
    from rank1_hf.model.devices import input_device, output_device
    from rank1_hf.model.loading import load_model

    path, _, tok = _small_float_checkpoint(root)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    whole, _ = load_model(str(path), dtype="float32")
    want = _last_logits(whole, batch, input_device(whole))
    del whole
    split_map = {"model.embed_tokens": 0, "lm_head": 0, "model.layers.0": 0, "model.layers.1": 0,
                 "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": 0}
    split, _ = load_model(str(path), dtype="float32", device_map=split_map)
    got = _last_logits(split, batch, input_device(split))
    diff = (got - want).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"cuda:0+cpu split differs from cuda:0 by {diff:.3g}")
    return f"map {sorted(set(map(str, split.hf_device_map.values())))}, in {input_device(split)}, out {output_device(split)}, max |dlogit| {diff:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=["7b", "bnb", "awq", "split", "awq7b"])
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the AWQ checks on CPU, small shape")
    args = parser.parse_args()
    if args.cpu_smoke:
        print(f"CPU smoke run, torch {torch.__version__}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run("tiny AWQ GEMM checkpoint via load_model (cpu)", lambda: check_awq(Path(tmp), "cpu"))
            run("small random Qwen2 packed as AWQ int4 vs bf16 twin (cpu)", lambda: check_awq_7b("cpu", AWQ_SMOKE))
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check (try --cpu-smoke)")
        return 1
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if "7b" not in args.skip:
                run("7B-shaped Qwen2 bf16: left-padded batch vs single rows", check_7b_padding)
            if "bnb" not in args.skip:
                run("bitsandbytes 4-bit / 8-bit via load_model", lambda: check_bnb(root))
            if "awq" not in args.skip:
                run("tiny AWQ GEMM checkpoint via load_model (cuda:0; cuda:0 + cpu)", lambda: check_awq(root))
            if "split" not in args.skip:
                run("device_map split cuda:0 + cpu", lambda: check_split(root))
            if "awq7b" not in args.skip:
                run("7B-shaped Qwen2 packed as AWQ int4 vs dequantized bf16 twin", check_awq_7b)
    print("\n| check | status | seconds | detail |\n|---|---|---|---|")
    for name, status, seconds, detail in RESULTS:
        print(f"| {name} | {status} | {seconds:.1f} | {detail.replace('|', '/')} |")
    return 0 if all(status == "PASS" for _, status, _, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
