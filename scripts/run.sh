#!/usr/bin/env bash
# The main job: set up .venv, then train both VAEs with the same flags (any flag passes
# through). Results land in outputs/pytorch and outputs/keras; with --out-dir DIR, in
# DIR/pytorch and DIR/keras, so that neither run writes over the other's. Run again, it goes on
# from the checkpoints there (more epochs if --epochs asks for them; else it redraws the results).
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
declare -A checkpoint=([pytorch]=checkpoint.pt [keras]=checkpoint.keras)
for framework in pytorch keras; do
  dir="${out:-outputs}/$framework" resume=()
  if [ -f "$dir/${checkpoint[$framework]}" ]; then resume=(--resume); fi
  .venv/bin/python "sample_$framework.py" "${args[@]}" "${resume[@]}" --out-dir "$dir"
done
