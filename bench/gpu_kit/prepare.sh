#!/usr/bin/env bash
# Download, here, the wheels the GPU checks need on the GPU image (Python 3.12, manylinux x86_64, no
# network there) into one ignored folder, repack ray to fit, and print the size against one device call.
#
#   bash bench/gpu_kit/prepare.sh                        # -> bench/gpu_kit/wheels (cp312, for the GPU image)
#   bash bench/gpu_kit/prepare.sh --python 3.11 --dest /tmp/kit311   # same versions for this machine's Python
#
# What: bench/gpu_kit/kit.txt (ray repacked by repack.py) plus DeepSpeed built as a pure-Python wheel
# (DS_BUILD_OPS=0; PyPI ships only its sdist; ops JIT-build on the GPU if ever used). Needs `make setup`
# (DeepSpeed's setup.py imports torch, so it builds in .venv without build isolation).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=3.12
DEST=bench/gpu_kit/wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    *) echo "prepare.sh: unknown argument $1 (use --python X.Y, --dest DIR)" >&2; exit 2 ;;
  esac
done
PY=.venv/bin/python
[ -x "$PY" ] || { echo "prepare.sh: run 'make setup' first (.venv builds the DeepSpeed wheel)" >&2; exit 2; }
DS_VERSION=$(sed -n 's/^ *"deepspeed==\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$DS_VERSION" ] || { echo "prepare.sh: pyproject.toml: no deepspeed==X pin found" >&2; exit 2; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do PLATFORMS+=(--platform "${p}_x86_64"); done

echo "== downloading kit.txt for cp${PYVER/./} manylinux x86_64"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$TMP/dl" -r bench/gpu_kit/kit.txt
echo "== building deepspeed==$DS_VERSION (DS_BUILD_OPS=0, pure Python)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$TMP/dl" "deepspeed==$DS_VERSION"

rm -rf "$DEST"
mkdir -p "$DEST"
for whl in "$TMP"/dl/*.whl; do
  case "$(basename "$whl")" in
    ray-*) "$PY" bench/gpu_kit/repack.py "$whl" "$DEST" ;;
    *) cp "$whl" "$DEST/" ;;
  esac
done

"$PY" - "$DEST" <<'EOF'
import subprocess, sys
from pathlib import Path
dest = Path(sys.argv[1])
wheels = sorted(dest.glob("*.whl"))
names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
dup = sorted({n for n in names if names.count(n) > 1})
if dup:
    sys.exit(f"prepare.sh: {dest}: more than one version of {', '.join(dup)}")
kit = sum(w.stat().st_size for w in wheels)
files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
project = sum(Path(f.decode()).stat().st_size for f in files if f and Path(f.decode()).is_file())
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
total = kit + project
print(f"kit {kit / 2**20:.1f} MiB ({len(wheels)} wheels) + project {project / 2**20:.1f} MiB = "
      f"{total / 2**20:.1f} MiB of one device call's 64 MiB"
      + ("" if total <= 64 * 2**20 else "  -- TOO LARGE for one call"))
sys.exit(0 if total <= 64 * 2**20 else 1)
EOF
echo "kit ready in $DEST; on the GPU machine: bash bench/gpu_kit/run.sh \$OUT   (device run with carry: [$DEST])"
