#!/usr/bin/env bash
# The GPU check in one command, on a machine with the GPU image (Python 3.12, torch, transformers; no ray,
# deepspeed or network): install the kit offline, then run bench/gpu_kit/check.py within 8 minutes.
#
#   bash bench/gpu_kit/run.sh OUTDIR           # kit from bench/gpu_kit/wheels (bash bench/gpu_kit/prepare.sh)
#   KIT=/tmp/kit311 PYTHON=/tmp/venv/bin/python bash bench/gpu_kit/run.sh /tmp/out   # another kit / Python
#
# Device call: run(command="bash bench/gpu_kit/run.sh $OUT", carry=["bench/gpu_kit/wheels"], timeout_s=600).
# OUTDIR gets summary.json, check.log and details.tar.gz. Exit status 0 when no step failed (GPU steps skip
# on a machine without CUDA, with a line saying so).
set -uo pipefail
T0=$(date +%s.%N)
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash bench/gpu_kit/run.sh OUTDIR}
KIT=${KIT:-bench/gpu_kit/wheels}
PY=${PYTHON:-python3}
export KIT_SITE=${KIT_SITE:-/tmp/tspin-kit-site}
mkdir -p "$OUT"
shopt -s nullglob
wheels=("$KIT"/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "run.sh: no wheels in $KIT (run bash bench/gpu_kit/prepare.sh here first)" | tee -a "$OUT/check.log"; exit 2; }

echo "== installing ${#wheels[@]} wheels from $KIT into $KIT_SITE (offline)" | tee -a "$OUT/check.log"
if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
     --upgrade --target "$KIT_SITE" "${wheels[@]}" >>"$OUT/check.log" 2>&1; then
  echo "run.sh: pip could not install the kit (see $OUT/check.log)" | tee -a "$OUT/check.log"; exit 1
fi
export PYTHONPATH="$KIT_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$KIT_SITE/bin:$PATH" PYTHONUNBUFFERED=1
echo "== installed in $(awk "BEGIN{printf \"%.0f\", $(date +%s.%N) - $T0}") s" | tee -a "$OUT/check.log"
exec "$PY" -m bench.gpu_kit.check "$OUT" --t0 "$T0" "${@:2}"
