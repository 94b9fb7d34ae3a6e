"""sha256 and size of a checkpoint's files: taken by the trainer rank that writes them, checked on resume.

    .venv/bin/pytest tests/unit/rundir/test_rundir.py -k "verify or checksum"
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_dir(path: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """sha256 and size of every file under `path`, keyed by relative path; top-level folders in `skip`
    are left out (a LoRA iterate's merged/ export: deleting it leaves the checkpoint intact)."""
    out = {}
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and rel.parts[0] not in skip:
            out[str(rel)] = {"sha256": _sha256(f), "size": f.stat().st_size}
    return out


def verify_dir(path: Path, expected: dict[str, dict]) -> str | None:
    """None if `path` matches its recorded checksums, else a one-line description of the first problem."""
    path = Path(path)
    for rel, meta in expected.items():
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != meta["size"]:
            return f"{f}: size {f.stat().st_size} != recorded {meta['size']} (truncated?)"
    for rel, meta in expected.items():  # the recorded files only: an export beside them is not read
        if _sha256(path / rel) != meta["sha256"]:
            return f"{path / rel}: sha256 mismatch (corrupted)"
    return None
