#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh), then run the default test suite (slow tests excluded;
# add "-m slow" to run only those). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
