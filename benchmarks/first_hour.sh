#!/usr/bin/env bash
# A new user's first mistakes, timed: seconds until `rank1-hf` answers each bad input, and its answer.
#   benchmarks/first_hour.sh [TREE ...]   # default: this checkout; give an older checkout too to compare
# Each TREE is put first on PYTHONPATH; the hub is unreachable here (no network), as on an offline machine.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${PYTHON:-}" in /*|"") ;; *) PYTHON="$PWD/$PYTHON" ;; esac
PY=${PYTHON:-python3}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
: > "$TMP/empty.jsonl"
S=rank1_hf/data/sample
case_() {  # name, args...
    local name=$1; shift
    local start end out
    start=$(date +%s.%N)
    # python -m puts the working directory first on sys.path: run from TREE itself.
    out=$(cd "$TREE" && PYTHONPATH="$TREE" timeout 120 "$PY" -m rank1_hf "$@" 2>&1 | grep -v '^note:' | tail -1)
    end=$(date +%s.%N)
    printf '%-18s %6.1f s  %s\n' "$name" "$(echo "$end - $start" | bc)" "${out:0:150}"
}
for TREE in "${@:-$PWD}"; do
    echo "== $TREE"
    case_ corpus-as-run rerank --model demo --run $S/corpus.jsonl --queries $S/queries.jsonl --corpus $S/corpus.jsonl --output "$TMP/o.trec"
    case_ empty-queries rerank --model demo --run $S/run.trec --queries "$TMP/empty.jsonl" --corpus $S/corpus.jsonl --output "$TMP/o.trec"
    case_ kv-memory-2G rerank --model demo --sample --kv-memory 2G --output "$TMP/o.trec"
    case_ topk rerank --model demo --sample --topk 2 --output "$TMP/o.trec"
    case_ unknown-model rerank --model nosuch-org/nosuch-model --sample --output "$TMP/o.trec"
done
