"""Rewrite a wheel without the parts the GPU checks never load, so the kit fits one 64 MiB device call.

    python bench/gpu_kit/repack.py IN.whl OUT_DIR [--drop PREFIX ...]     (prepare.sh runs it on ray)

The new wheel keeps its name, so pip installs it as the same distribution; RECORD lists exactly the files
left (pip checks each entry it installs against RECORD's hash and size). Dropped by default from ray:
the Java jars (Java workers only), the dashboard's web client (no dashboard is started), and the libraries
tspin-ray never imports (RLlib, Serve, ray.llm).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

RAY_DROPS = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/llm/")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(src: Path, out_dir: Path, drops: tuple[str, ...] = RAY_DROPS) -> tuple[Path, int]:
    """Write out_dir/<same name> without the members under `drops`; returns (path, members dropped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise ValueError(f"{src}: repack writes a new file; give another output folder")
    dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        records = [n for n in zin.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise ValueError(f"{src}: not a wheel (expected one .dist-info/RECORD, found {len(records)})")
        lines = []
        for info in zin.infolist():
            if info.filename == records[0]:
                continue
            if info.filename.startswith(drops):
                dropped += 1
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            if not info.is_dir():
                lines.append(_record_line(info.filename, data))
        lines.append(f"{records[0]},,")
        zout.writestr(records[0], "\n".join(lines) + "\n")
    return dst, dropped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--drop", nargs="+", help=f"path prefixes to leave out (default: {' '.join(RAY_DROPS)})")
    args = p.parse_args(argv)
    try:
        dst, dropped = repack(args.wheel, args.out_dir, tuple(args.drop) if args.drop else RAY_DROPS)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        print(f"repack: {e}", file=sys.stderr)
        return 2
    print(f"{dst.name}: {args.wheel.stat().st_size / 2**20:.1f} MiB -> {dst.stat().st_size / 2**20:.1f} MiB "
          f"({dropped} files left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
