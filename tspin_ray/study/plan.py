"""`tspin-ray study`: every method from one pi_0, over several seeds, in one table with its claim checks.

    tspin-ray study --config jobs/study-sorting.yaml
    tspin-ray study --config jobs/study-sorting.yaml --seeds 0 --iterations 1 --methods sft_continued tspin \
        --output-dir runs/study-smoke                   (a narrowed smoke run)
    .venv/bin/pytest tests/unit/study/test_study.py

Per seed s, all under `output_dir`:
    seed{s}/pi0        base config, data.fraction = fraction, iterations 0: SFT of pi_0 and its evaluation
    seed{s}/sft_full   the same on data.fraction = full_fraction: the "SFT on 100%" baseline
    seed{s}/{method}   model.path = seed{s}/pi0/checkpoints/pi_0, the method's sections, `iterations`
Then results.json (every number), results.md (tables and claim checks) and results_em.png /
results_nll.png (mean over seeds with a +-1 std band; SFT-100% dashed).

With `distribution:` set (a task with enumerable answers, e.g. jobs/study-paths.yaml), every checkpoint
is also scored by tspin_ray/study/distribution.py into <run>/distribution.json; `claims:` declares the
comparisons to judge before any run (tspin_ray/study/claims.py).

Every run is an ordinary run directory made by `tspin_ray.controller.driver.train`, run one after another in this
process (one local Ray for all). Rerunning the study skips complete runs without starting Ray and resumes
unfinished ones. T-SPIN runs take y0 from their own iteration 0 (tspin_ray/controller/y0.py); those with a proto
phase of their own (beta != 0 in iteration 0) that sample y0 identically (same pi_0, data, generation
settings and seed) share one proto cache: a later one gets the earlier one's `proto/` shards hard-linked
in, and the driver then generates nothing for it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from tspin_ray.analysis.run_reader import PI0  # noqa: F401 - the study's modules take it from here
from tspin_ray.config.schema import RunConfig, from_dict, read_yaml_mapping
from tspin_ray.errors import UserError
from tspin_ray.rundir.store import write_atomic
from tspin_ray.study.claims import Claim, parse_claims, parse_distribution
from tspin_ray.study.distribution import DistributionSpec

STUDY_KEYS = ("base", "seeds", "iterations", "fraction", "full_fraction", "output_dir", "methods", "distribution",
              "claims", "keep_checkpoints")
DEFAULTS = {"iterations": 5, "fraction": 0.25, "full_fraction": 1.0, "output_dir": "runs/study",
            "keep_checkpoints": "final"}
KEEP_CHECKPOINTS = ("final", "all")  # final: a finished method run keeps pi_0, its last and its best iterate
# The study owns these keys of every run; a value in `base` or a method would be silently overwritten.
STUDY_OWNED = ("output_dir", "iterations", "seed", "data.fraction", "data.seed", "objective.name")
METHOD_FORBIDDEN = ("model", "output_dir", "iterations", "seed", "data.fraction", "data.seed", "sft")
RESERVED_RUNS = ("pi0", "sft_full")
EXECUTION_ONLY = ("persistent", "weight_sync", "sync_bucket_mb", "colocate", "timeout_s", "max_attempts")
VERDICTS = ("holds", "does not hold", "inconclusive", "not measured")


# ------------------------------------------------------------ the study config
@dataclasses.dataclass(frozen=True)
class Study:
    base: dict
    seeds: tuple[int, ...]
    iterations: int
    fraction: float
    full_fraction: float
    output_dir: str
    methods: dict  # name -> section overrides, in config order (that is also the run order)
    source: str = "study config"  # the YAML path, for messages and the command line
    distribution: DistributionSpec | None = None  # score every checkpoint's answer distribution
    claims: tuple[Claim, ...] = ()  # declared in the config before any run
    keep_checkpoints: str = "final"  # or "all": every iterate of every run stays on disk

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


def _nearest(key: str, valid: Sequence[str]) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _get(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(raw: dict, key: str, lo: float, hi: float) -> float:
    v = raw.get(key, DEFAULTS.get(key))
    if isinstance(v, str):  # YAML 1.1 reads 1e-1 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo < v <= hi:
        raise UserError(f"{key}: expected a number in ({lo:g}, {hi:g}], got {v!r}")
    return float(v)


def parse_study(raw, source: str = "study config") -> Study:
    """Validate a study mapping; every problem is a one-line UserError naming the key."""
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping with keys " + ", ".join(STUDY_KEYS))
    for key in raw:
        if key not in STUDY_KEYS:
            raise UserError(f"unknown study key '{key}'{_nearest(str(key), STUDY_KEYS)}")
    for key in ("base", "seeds", "methods"):
        if key not in raw:
            raise UserError(f"{key}: required")
    base = raw["base"]
    if not isinstance(base, dict):
        raise UserError(f"base: expected a run config mapping, got {base!r}")
    for dotted in STUDY_OWNED:
        if _get(base, dotted) is not None:
            raise UserError(f"base.{dotted}: set by the study (seeds, fraction, iterations, output_dir or the "
                            f"methods); remove it from base")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds: expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    iterations = raw.get("iterations", DEFAULTS["iterations"])
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UserError(f"iterations: expected an integer >= 1, got {iterations!r}")
    output_dir = raw.get("output_dir", DEFAULTS["output_dir"])
    if not isinstance(output_dir, str) or not output_dir:
        raise UserError(f"output_dir: expected a path, got {output_dir!r}")

    keep = raw.get("keep_checkpoints", DEFAULTS["keep_checkpoints"])
    if keep not in KEEP_CHECKPOINTS:
        raise UserError(f"keep_checkpoints: expected one of {', '.join(KEEP_CHECKPOINTS)}, got {keep!r}")

    methods = _parse_methods(raw["methods"])
    distribution = parse_distribution(raw.get("distribution"))
    if distribution is not None and _get(base, "data.task") is None:
        raise UserError("distribution: scores answers with a built-in task's answer sets: set base.data.task")
    study = Study(base=base, seeds=tuple(seeds), iterations=iterations, fraction=_number(raw, "fraction", 0, 1),
                  full_fraction=_number(raw, "full_fraction", 0, 1), output_dir=output_dir, methods=methods,
                  source=source, distribution=distribution,
                  claims=parse_claims(raw.get("claims"), methods, distribution, iterations), keep_checkpoints=keep)
    check_runs(study)
    return study


def _parse_methods(methods) -> dict:
    if not isinstance(methods, dict) or not methods:
        raise UserError("methods: expected a non-empty mapping of name -> {objective: {name: ...}, ...}")
    for name, sections in methods.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise UserError(f"methods.{name}: a method name must be a plain directory name (letters, digits, _-.)")
        if name in RESERVED_RUNS:
            raise UserError(f"methods.{name}: '{name}' is the name of a study run; choose another")
        if not isinstance(sections, dict):
            raise UserError(f"methods.{name}: expected a mapping of config sections, got {sections!r}")
        for dotted in METHOD_FORBIDDEN:
            if _get(sections, dotted) is not None:
                raise UserError(f"methods.{name}.{dotted}: set by the study (every method starts from the "
                                f"same pi_0 with the same data and seed); remove it")
        if _get(sections, "objective.name") is None:
            raise UserError(f"methods.{name}.objective.name: required (sft, spin, tspin, space or rft)")
    return dict(methods)


def load_study(path: str | Path) -> Study:
    raw = read_yaml_mapping(path, "study config")
    try:
        return parse_study(raw, source=str(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def narrow(study: Study, seeds: Sequence[int] | None = None, iterations: int | None = None,
           methods: Sequence[str] | None = None, output_dir: str | None = None,
           fraction: float | None = None) -> Study:
    """The study restricted or varied by command-line flags (smoke runs; another annotated fraction);
    unknown method names are an error."""
    changes: dict = {}
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"--fraction: expected a number in (0, 1], got {fraction}")
        changes["fraction"] = fraction
    if seeds:
        changes["seeds"] = tuple(dict.fromkeys(seeds))
        if any(s < 0 for s in changes["seeds"]):
            raise UserError("--seeds: seeds must be >= 0")
    if iterations is not None:
        if iterations < 1:
            raise UserError(f"--iterations: expected an integer >= 1, got {iterations}")
        changes["iterations"] = iterations
    if methods:
        for m in methods:
            if m not in study.methods:
                raise UserError(f"--methods: unknown method '{m}'{_nearest(m, list(study.methods))}; the config "
                                f"has {', '.join(study.methods)}")
        # config order, not flag order: T-SPIN proto sharing and the tables follow the config
        changes["methods"] = {m: s for m, s in study.methods.items() if m in methods}
    if output_dir:
        changes["output_dir"] = output_dir
    narrowed = dataclasses.replace(study, **changes)
    check_runs(narrowed)
    return narrowed


def command_line(study: Study, full: Study | None = None) -> str:
    """The `tspin-ray study` command that reproduces `study` (narrowing flags only where it differs)."""
    parts = ["tspin-ray", "study", "--config", study.source]
    ref = full or study
    if study.seeds != ref.seeds:
        parts += ["--seeds", *map(str, study.seeds)]
    if study.iterations != ref.iterations:
        parts += ["--iterations", str(study.iterations)]
    if study.fraction != ref.fraction:
        parts += ["--fraction", f"{study.fraction:g}"]
    if list(study.methods) != list(ref.methods):
        parts += ["--methods", *study.methods]
    if study.output_dir != ref.output_dir:
        parts += ["--output-dir", study.output_dir]
    return shlex.join(parts)


# ------------------------------------------------------------ the runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    seed: int
    name: str  # "pi0", "sft_full" or a method name
    raw: dict  # the run config mapping given to from_dict

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.name}"

    @property
    def root(self) -> Path:
        return Path(self.raw["output_dir"])

    def config(self) -> RunConfig:
        return from_dict(self.raw)


def _merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _sft_run(study: Study, seed: int, name: str, fraction: float) -> RunSpec:
    raw = _merge(study.base, {"data": {"fraction": fraction, "seed": seed}, "iterations": 0, "seed": seed,
                              "output_dir": str(study.out / f"seed{seed}" / name)})
    if isinstance(raw["model"].get("tiny"), dict):
        # a different random initialisation per seed: seed-to-seed spread should include it
        raw["model"]["tiny"] = {**raw["model"]["tiny"], "seed": seed}
    raw.setdefault("objective", {})["name"] = "sft"  # iterations=0: no self-play; keeps the hash readable
    return RunSpec(seed, name, raw)


def pi0_path(study: Study, seed: int) -> Path:
    return study.out / f"seed{seed}" / "pi0" / "checkpoints" / "pi_0"


def _method_run(study: Study, seed: int, name: str) -> RunSpec:
    base = copy.deepcopy(study.base)
    model = {k: v for k, v in base.pop("model", {}).items() if k not in ("tiny", "path")}
    base["model"] = {**model, "path": str(pi0_path(study, seed))}
    base["sft"] = {**base.get("sft", {}), "enabled": False}  # pi_0 is the seed's pi0 run's checkpoint
    raw = _merge(base, study.methods[name])
    raw = _merge(raw, {"data": {"fraction": study.fraction, "seed": seed}, "iterations": study.iterations,
                       "seed": seed, "output_dir": str(study.out / f"seed{seed}" / name)})
    return RunSpec(seed, name, raw)


def plan(study: Study) -> list[RunSpec]:
    """All runs in execution order: per seed, pi0, sft_full, then the methods in config order."""
    specs = []
    for s in study.seeds:
        specs.append(_sft_run(study, s, "pi0", study.fraction))
        specs.append(_sft_run(study, s, "sft_full", study.full_fraction))
        specs += [_method_run(study, s, m) for m in study.methods]
    return specs


def check_runs(study: Study) -> None:
    """Build every run config up front, so a bad base or method section fails before any work."""
    for spec in plan(study)[: 2 + len(study.methods)]:  # one seed's runs: the others differ only in seeds
        where = "base" if spec.name in RESERVED_RUNS else f"methods.{spec.name}"
        try:
            cfg = spec.config()
        except UserError as e:
            raise UserError(f"{where} (run {spec.name}): {e}") from None
        if spec.name == "pi0" and not cfg.data.eval_path and cfg.data.eval_size == 0:
            raise UserError("base.data.eval_size: the study compares held-out exact match; set it > 0 "
                            "(or set base.data.eval_path)")
        if spec.name == "pi0" and not cfg.needs_sft_stage:
            raise UserError("base.model: the study trains pi_0 and the SFT baseline by SFT: set base.model.tiny, "
                            "or base.model.path with base.sft.enabled: true")


class Timings:
    """Wall seconds per run, summed over the study invocations that did work on it (timings.json)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.seconds, indent=1, sort_keys=True).encode())


