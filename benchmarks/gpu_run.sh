#!/usr/bin/env bash
# The whole lent-GPU session in one call (see benchmarks/RESULTS.md): install the carried wheels
# (this project's transformers, the Qwen tokenizer assets, bitsandbytes) over the machine's image,
# then run the loading checks and the decode-step / throughput benchmark. Logs go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RANK1_HF_CACHE=/tmp/rank1-hf-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# Engine v2 at rank1's lengths first (the figure that matters most), then the loading/quantization checks.
timeout "${LONG_TIMEOUT:-210}" python3 benchmarks/gpu_throughput.py --long --batches 1 16 64 128 --repeats 1 \
  --engines continuous continuous-eager \
  --skip-workload ${LONG_ARGS:-} 2>&1 | tee "$OUT/gpu_long.log"
# Graphed v2 against eager v2 on workload 1: pairs/s and the share of rows reasoning identically (bf16).
timeout "${WORKLOAD_TIMEOUT:-90}" python3 benchmarks/gpu_throughput.py --pairs 64 --skip-steps --engines continuous \
  2>&1 | tee "$OUT/gpu_workload.log"
timeout "${CHECK_TIMEOUT:-130}" python3 benchmarks/gpu_check.py ${CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log"
