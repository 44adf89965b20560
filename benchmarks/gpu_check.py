"""One-GPU smoke checks for rank1_hf.loading, a few minutes on one CUDA GPU (needs no hub access).

    python benchmarks/gpu_check.py            # all checks
    python benchmarks/gpu_check.py --skip 7b  # skip the 7B-shaped forward (needs ~16 GB of GPU memory)

Checks (each in its own try/except; a failure is reported and the next check runs):

1. a 7B-shaped Qwen2 (random weights, bfloat16, on cuda:0): batched left-padded forward vs each row
   alone - no NaN, last-position logits agree;
2. bitsandbytes 4-bit and 8-bit through ``load_model`` on a small saved model, vs float;
3. a tiny AWQ GEMM checkpoint (packed by tests/awq_fixture.py) through ``load_model`` on CUDA, vs its
   dequantized twin;
4. a device map split across cuda:0 and cpu, vs the model on cuda:0 alone.

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
    from rank1_hf.offline import qwen_tokenizer

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
    from rank1_hf.loading import input_device, load_model

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


def check_awq(root: Path) -> str:
    from awq_fixture import build_awq_checkpoint
    from rank1_hf.loading import input_device, load_model

    tok = _tokenizer()
    twin = build_awq_checkpoint(tok, root / "awq")
    model, _ = load_model(str(root / "awq"))
    kernel = type(model.model.layers[0].mlp.up_proj).__name__
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    got = _last_logits(model, batch, input_device(model))
    want = _last_logits(twin, batch, "cpu")
    diff = (got - want).abs().max().item()
    if torch.isnan(got).any() or diff > 0.2:
        raise AssertionError(f"AWQ ({kernel}) vs dequantized twin differ by {diff:.3g}")
    return f"{kernel} on {input_device(model)}, {model.dtype}, max |dlogit| vs dequantized twin {diff:.3g}"


def check_split(root: Path) -> str:
    from rank1_hf.loading import input_device, load_model, output_device

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
    parser.add_argument("--skip", nargs="*", default=[], choices=["7b", "bnb", "awq", "split"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "7b" not in args.skip:
            run("7B-shaped Qwen2 bf16: left-padded batch vs single rows", check_7b_padding)
        if "bnb" not in args.skip:
            run("bitsandbytes 4-bit / 8-bit via load_model", lambda: check_bnb(root))
        if "awq" not in args.skip:
            run("tiny AWQ GEMM checkpoint via load_model", lambda: check_awq(root))
        if "split" not in args.skip:
            run("device_map split cuda:0 + cpu", lambda: check_split(root))
    print("\n| check | status | seconds | detail |\n|---|---|---|---|")
    for name, status, seconds, detail in RESULTS:
        print(f"| {name} | {status} | {seconds:.1f} | {detail.replace('|', '/')} |")
    return 0 if all(status == "PASS" for _, status, _, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
