#!/usr/bin/env bash
# The tests: set up .venv, then run the whole suite (offline; it makes its own small data).
# Extra arguments go to pytest, e.g. -k parity or tests/test_common.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
