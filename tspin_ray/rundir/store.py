"""The run directory: resolved config, manifest of committed work, checkpoints, generations, metrics.

    .venv/bin/pytest tests/unit/rundir/test_rundir.py

Layout (all under `output_dir`):
    config.yaml             resolved config (written once; a different config hash is refused on resume)
    manifest.json           what is committed, with sha256 + size of every checkpoint file; written last
    checkpoints/pi_0 ...    HF checkpoints (safetensors) of pi_0 .. pi_T
    generations/iter_T/     Parquet shards of iteration T's synthetic responses (one per generation batch)
    proto/                  Parquet shards of y0, when T-SPIN samples them in a phase of their own (controller/y0.py)
    .../stale/              shards set aside because other weights made them (the manifest says why)
    metrics.jsonl           one row per logging step and per iteration
Every directory is committed by writing it under a temporary name, fsyncing, and renaming; the manifest
(the pointer) is replaced last, so a crash leaves either the old state or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import yaml

from tspin_ray.checksums import checksum_dir, verify_dir
from tspin_ray.config.resume import RETIRED
from tspin_ray.config.schema import from_dict
from tspin_ray.errors import UserError
from tspin_ray.models.checkpoints import MERGED
from tspin_ray.rundir.metrics import append_metrics


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file under a temporary name, fsync it, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory; on success fsync its files and rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # an uncommitted leftover of an interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def identity(files: dict[str, dict]) -> str:
    """sha256 naming a checkpoint by its files' recorded sha256 and sizes (what commit_checkpoint stores)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def listing_identity(path: Path) -> str:
    """sha256 of every file's name, size and mtime under `path`: the identity of an external model.path,
    taken once when the run commits it (a 7B is 14.5 GB to hash; a copy of it has new mtimes)."""
    path = Path(path)
    stats = {str(f.relative_to(path)): [f.stat().st_size, f.stat().st_mtime_ns]
             for f in sorted(path.rglob("*")) if f.is_file()}
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()


class RunDir:
    """Paths of one run and its manifest. The manifest maps names ("pi_0", "proto", "iter_0", ...) to
    committed entries; only the driver writes it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {
            "entries": {}}

    @classmethod
    def open(cls, cfg) -> RunDir:
        """Create or resume the run directory for `cfg`, refusing a changed config unless allowed."""
        if not Path(cfg.output_dir).is_absolute() and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            raise UserError(f"output_dir {cfg.output_dir} is relative: inside a Ray job it would land in the "
                            f"job's temporary working dir; use an absolute path on shared storage")
        root = Path(cfg.output_dir).expanduser().resolve()  # actors must see the same absolute path
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{uuid.uuid4().hex[:6]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output_dir {root} is not writable: {e.strerror or e}") from None
        for stale in list(root.glob("checkpoints/.*.tmp-*")) + list(root.glob(".*.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
        run = cls(root)
        stored = run.manifest.get("config_hash")
        if not run.config_matches(cfg) and not cfg.allow_config_change:
            raise UserError(f"{root} holds a run with a different config (hash {stored} != {cfg.hash()}); "
                            f"use a new output_dir or set allow_config_change=true")
        if not stored or stored != cfg.hash():
            try:
                write_atomic(root / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
                run.manifest["config_hash"] = cfg.hash()
                run.save()
            except OSError:
                if created:  # leave nothing half-written behind (e.g. the disk is full)
                    shutil.rmtree(root, ignore_errors=True)
                raise
        return run

    def config_matches(self, cfg) -> bool:
        """Whether this run was made with `cfg`. A run from an older tspin-ray lacks keys added since:
        its stored config.yaml read with today's defaults decides (a new key's default keeps old behaviour)."""

        stored = self.manifest.get("config_hash")
        if not stored or stored == cfg.hash():
            return True
        try:
            raw = yaml.safe_load((self.root / "config.yaml").read_text())
            for section, keys in RETIRED.items():  # never read, so they never changed a result
                for key in keys:
                    (raw.get(section) or {}).pop(key, None)
            old = from_dict(raw)
        except (OSError, UserError, yaml.YAMLError):
            return False
        return old.hash() == cfg.hash()

    def save(self) -> None:
        write_atomic(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------ paths
    def checkpoint(self, t: int) -> Path:
        return self.root / "checkpoints" / f"pi_{t}"

    def generations(self, t: int) -> Path:
        return self.root / "generations" / f"iter_{t}"

    @property
    def proto(self) -> Path:
        return self.root / "proto"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    # ------------------------------------------------------------ commits
    def done(self, name: str) -> bool:
        return name in self.manifest["entries"]

    def entry(self, name: str) -> dict | None:
        return self.manifest["entries"].get(name)

    def commit(self, name: str, **info) -> None:
        self.manifest["entries"][name] = info
        self.save()

    def commit_checkpoint(self, t: int, files: dict | None = None, **info) -> None:
        """Commit pi_t with `files`, the checksums its writer took (Trainer.export), or else read here."""
        self.commit(f"pi_{t}", path=str(self.checkpoint(t).relative_to(self.root)),
                    files=checksum_dir(self.checkpoint(t), skip=(MERGED,)) if files is None else files, **info)

    def checkpoint_id(self, t: int) -> str:
        """The identity of committed pi_t, recorded in every generation row it makes: `identity` of the
        files the run wrote, or the `listing_identity` an external model.path had when it was committed."""
        e = self.entry(f"pi_{t}")
        if e.get("files"):
            return identity(e["files"])
        if "identity" not in e:  # committed by an older tspin-ray: taken now, kept from now on
            self.commit(f"pi_{t}", **e, identity=listing_identity(self.root / e["path"]))
        return self.entry(f"pi_{t}")["identity"]

    def write_answers(self, label: str, rows: list[dict]) -> None:
        """eval/<label>.jsonl: the greedy answer to every held-out prompt (the report's table of answers)."""
        (self.root / "eval").mkdir(exist_ok=True)
        write_atomic(self.root / "eval" / f"{label}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    def mark_best(self, t: int, **info) -> None:
        """checkpoints/best -> pi_t (relative inside the run; an external pi_0's own path), and the manifest's
        `best` entry: which iterate, by which metric."""
        target = self.root / self.entry(f"pi_{t}")["path"]
        link, tmp = self.root / "checkpoints" / "best", self.root / "checkpoints" / f".best.tmp-{uuid.uuid4().hex[:8]}"
        link.parent.mkdir(parents=True, exist_ok=True)
        inside = target.resolve().is_relative_to(self.root.resolve())
        os.symlink(os.path.relpath(target, link.parent) if inside else target.resolve(), tmp)
        os.replace(tmp, link)
        self.commit("best", iterate=f"pi_{t}", path=str(link.relative_to(self.root)), **info)

    def uncommit(self, name: str) -> None:
        self.manifest["entries"].pop(name, None)
        self.save()

    def latest_good_checkpoint(self, upto: int) -> int | None:
        """Highest t <= upto whose committed checkpoint verifies; corrupt ones are uncommitted and reported."""
        for t in range(upto, -1, -1):
            e = self.entry(f"pi_{t}")
            if e is None:
                continue
            problem = verify_dir(self.root / e["path"], e["files"])
            if problem is None:
                return t
            print(f"warning: checkpoint pi_{t} is corrupt ({problem}); falling back to an earlier one")
            for name in [n for n in self.manifest["entries"] if _iteration_of(n) is not None
                         and _iteration_of(n) >= t]:
                self.manifest["entries"].pop(name)
            self.save()
        return None

    def prune_metrics(self, keep) -> None:
        """Drop metrics rows of uncommitted work, so a resumed run logs each step exactly once."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
            if keep(row):
                kept.append(line)
        if len(kept) != len(lines):
            write_atomic(self.metrics_path, "".join(k + "\n" for k in kept).encode())

    def append_metrics(self, rows: list[dict]) -> None:
        """Append rows to metrics.jsonl (fsync'd) and mirror them to `tensorboard/` (see rundir/metrics.py)."""

        append_metrics(self.root, rows)


def _iteration_of(name: str) -> int | None:
    """pi_3 -> 3, iter_2 -> 3 (iteration 2 produces pi_3); other entries -> None."""
    if name.startswith("pi_"):
        return int(name[3:])
    if name.startswith("iter_"):
        return int(name[5:]) + 1
    return None
