#!/usr/bin/env bash
# The main job: set up .venv, then train both VAEs with the same flags (any flag passes through,
# e.g. --data-dir DIR to work offline). Results land in outputs/pytorch and outputs/keras.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python sample_pytorch.py "$@"
.venv/bin/python sample_keras.py "$@"
