#!/usr/bin/env bash
# A stand-in for the GPU image on this machine: a clean venv with only torch, transformers and the image's
# packages the checks import (image.txt), none of the kit's (no ray, deepspeed, pydantic, jsonschema).
#
#   bash bench/gpu_kit/standin.sh /tmp/standin          # ~2.5 min; then:
#   bash bench/gpu_kit/prepare.sh --python 3.11 --dest /tmp/kit311
#   KIT=/tmp/kit311 PYTHON=/tmp/standin/bin/python bash bench/gpu_kit/run.sh /tmp/kit-out
#
# The image has Python 3.12 and torch 2.11.0+cu130; here it is this machine's Python 3.11 and its CPU torch
# 2.13.0 (the one torch on disk), transformers at the image's 5.17.0, the rest at the versions `make setup`
# resolves (huggingface-hub at the image's 1.33.0, which transformers 5.17 needs).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:?usage: bash bench/gpu_kit/standin.sh VENV_DIR}
[ -x .venv/bin/pip ] || { echo "standin.sh: run 'make setup' first (its versions pin the stand-in's)" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$DEST"
python3.11 -m venv "$DEST"
PIP=("$DEST/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0  # first: the CPU build on disk, so nothing later pulls a CUDA one
"${PIP[@]}" transformers==5.17.0 huggingface-hub==1.33.0
.venv/bin/pip freeze 2>/dev/null | grep -v -i -E '^(torch|transformers|huggingface-hub|huggingface_hub)==|^-e |@ ' \
  > "$TMP/constraints.txt"
grep -v -E '^\s*(#|$)|^transformers' bench/gpu_kit/image.txt > "$TMP/image.txt"
"${PIP[@]}" -r "$TMP/image.txt" -c "$TMP/constraints.txt" huggingface-hub==1.33.0
# typer (transformers' CLI) pulls pydantic in; the image has typer but not pydantic, which the kit brings.
"$DEST/bin/pip" uninstall -y -q pydantic pydantic-core
if "$DEST/bin/pip" list 2>/dev/null | grep -i -E '^(nvidia|ray|deepspeed|pydantic|jsonschema) '; then
  echo "standin.sh: the stand-in holds packages the image lacks (above)" >&2; exit 1
fi
echo "stand-in venv ready: $DEST ($("$DEST/bin/python" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'))"
