#!/usr/bin/env bash
# The tests: set up .venv, then run the whole suite (offline; it makes its own small data).
# Extra arguments go to pytest, e.g. -k resume or tests/test_maths.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (pytest-xdist): the framework imports and the scripts' start-ups of one overlap
# the other's work; tests/conftest.py gives each, and the scripts they start, one thread.
.venv/bin/python -m pytest -n 2 "$@"
