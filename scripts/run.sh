#!/usr/bin/env bash
# The main job: set up .venv, then train both VAEs with the same flags (any flag passes
# through). Results land in outputs/pytorch and outputs/keras; with --out-dir DIR, in
# DIR/pytorch and DIR/keras, so that neither run writes over the other's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=() out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out-dir) out="$2"; shift 2 ;;
    --out-dir=*) out="${1#--out-dir=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
for framework in pytorch keras; do
  .venv/bin/python "sample_$framework.py" "${args[@]}" ${out:+--out-dir "$out/$framework"}
done
