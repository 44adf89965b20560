#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh), then run the test suite (a test marked slow would be
# excluded by default; none exists now). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# OpenMP threads that sleep instead of spinning when they wait: on a shared 2-core machine spinning
# threads made torch 4x slower (docs/how-it-works.md, "CPU speed").
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m pytest -q "$@"
