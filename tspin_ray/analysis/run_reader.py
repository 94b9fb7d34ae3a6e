"""Reading a run directory for reports: config, metrics rows (deduplicated, torn lines skipped) and the
response lengths of each iteration's generation shards.

    .venv/bin/pytest tests/unit/analysis/test_report.py
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from tspin_ray.errors import UserError

PI0 = -1  # the metrics.jsonl iteration number of the evaluation of pi_0, before self-play


@dataclasses.dataclass
class Run:
    root: Path
    objective: str
    planned: int | None  # iterations in the config
    complete: bool
    sft: list[dict]
    train: list[dict]
    iterations: dict[int, dict]  # iteration -> its row, ascending; -1 = pi_0
    lengths: dict[int, tuple[float, float]]  # iteration -> (mean generated tokens, mean real tokens)
    notes: list[str]
    label: str = ""
    best: dict | None = None  # the manifest's best iterate: {"iterate": "pi_1", "metric": "eval/nll", ...}
    answers: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # pi_k -> eval/pi_k.jsonl rows

    def value(self, t: int, key: str) -> float | None:
        return finite(self.iterations.get(t, {}).get(key))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(iterations, values) of an iteration-row key, skipping rows where it is missing or NaN."""
        pts = [(t, self.value(t, key)) for t in self.iterations]
        pts = [(t, v) for t, v in pts if v is not None]
        return [t for t, _ in pts], [v for _, v in pts]

    @property
    def completed(self) -> int:
        return sum(1 for t in self.iterations if t >= 0)

    def final(self, key: str) -> tuple[int, float] | None:
        ts, vs = self.series(key)
        return (ts[-1], vs[-1]) if ts else None


def finite(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def load_run(root: str | Path) -> Run:
    root = Path(root)
    metrics = root / "metrics.jsonl"
    if not root.is_dir() or not (metrics.exists() or (root / "config.yaml").exists()):
        raise UserError(f"{root} is not a run directory (no metrics.jsonl or config.yaml)")
    notes: list[str] = []
    cfg = _read_config(root, notes)
    rows = _read_rows(metrics, notes)
    sft = _dedup([r for r in rows if r.get("phase") == "sft"], ("step",))
    train = _dedup([r for r in rows if r.get("phase") == "train"], ("iteration", "epoch", "step"))
    iterations = {}
    for r in rows:  # a resumed run may log an iteration twice: the last row wins
        if r.get("phase") == "iteration" and isinstance(r.get("iteration"), int):
            iterations[r["iteration"]] = r
    manifest = _read_json(root / "manifest.json")
    return Run(root=root, objective=str((cfg.get("objective") or {}).get("name", "unknown")),
               planned=cfg.get("iterations"), complete="complete" in manifest.get("entries", {}),
               sft=sft, train=train, iterations=dict(sorted(iterations.items())),
               lengths=_read_lengths(root, notes), notes=notes, best=manifest.get("entries", {}).get("best"),
               answers=_read_answers(root))


def _read_answers(root: Path) -> dict[str, list[dict]]:
    """Every iterate's greedy held-out answers (eval/pi_k.jsonl), pi_0 first; torn lines skipped."""
    out = {}
    files = sorted((root / "eval").glob("pi_*.jsonl"), key=lambda f: int(f.stem.split("_")[1]))
    for f in files:
        rows = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        out[f.stem] = rows
    return out


def _read_config(root: Path, notes: list[str]) -> dict:
    import yaml

    path = root / "config.yaml"
    if not path.exists():
        notes.append("no config.yaml: objective unknown")
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        notes.append(f"config.yaml unreadable ({e.__class__.__name__})")
        return {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_rows(path: Path, notes: list[str]) -> list[dict]:
    if not path.exists():
        notes.append("no metrics.jsonl")
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1  # e.g. the torn last line of a killed driver
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        notes.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    return rows


def _dedup(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Drop repeated steps (re-logged after a resume): first position, last value."""
    out: dict[tuple, dict] = {}
    for i, r in enumerate(rows):
        key = tuple(r.get(k) for k in keys)
        out[key if None not in key else (i,)] = r
    return list(out.values())


def _read_lengths(root: Path, notes: list[str]) -> dict[int, tuple[float, float]]:
    """Mean tokens per generated sample and per real response, from generations/iter_T shards."""
    out = {}
    dirs = [(_int_suffix(d.name), d) for d in (root / "generations").glob("iter_*") if d.is_dir()]
    for t, d in sorted((t, d) for t, d in dirs if t is not None):
        totals = [0, 0, 0, 0]  # generated tokens, samples, real tokens, rows
        for f in sorted(d.glob("*.parquet")):
            try:
                totals = [a + b for a, b in zip(totals, _shard_lengths(f, t), strict=True)]
            except Exception as e:  # a foreign or damaged file must not sink the whole report
                notes.append(f"{f.relative_to(root)} unreadable ({e.__class__.__name__})")
        if totals[1] and totals[3]:
            out[t] = (totals[0] / totals[1], totals[2] / totals[3])
    return out


def _shard_lengths(path: Path, t: int) -> list[int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    ids = "generated_ids" in names  # token ids when present; else gen_tokens over the sample count
    table = pq.read_table(path, columns=["source_iteration", "real_ids",
                                         *(["generated_ids"] if ids else ["gen_tokens", "generated"])])
    # SPIN mixes in last iteration's pairs; only this iteration's samples show pi_t's lengths.
    table = table.filter(pc.equal(table["source_iteration"], t))
    if ids:
        per_sample = pc.list_value_length(pc.list_flatten(table["generated_ids"]))
        gen_tokens, samples = pc.sum(per_sample).as_py() or 0, len(per_sample)
    else:
        gen_tokens = pc.sum(table["gen_tokens"]).as_py() or 0
        samples = pc.sum(pc.list_value_length(table["generated"])).as_py() or 0
    real = pc.list_value_length(table["real_ids"])
    return [gen_tokens, samples, pc.sum(real).as_py() or 0, len(real)]


def _int_suffix(name: str) -> int | None:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None
