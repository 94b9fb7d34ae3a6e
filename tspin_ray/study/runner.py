"""Running a study: every planned run in this process, sharing pi_0, its evaluation and y0 caches.

    tspin-ray study --config jobs/study-sorting.yaml
    .venv/bin/pytest tests/unit/study/test_study.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from tspin_ray.config.schema import RunConfig
from tspin_ray.controller.driver import train
from tspin_ray.controller.y0 import separate_phase
from tspin_ray.errors import UserError
from tspin_ray.hub import resolve_hub_ids
from tspin_ray.rundir.store import RunDir, atomic_dir, write_atomic
from tspin_ray.study.distribution import evaluate_run
from tspin_ray.study.plan import (
    EXECUTION_ONLY,
    PI0,
    RESERVED_RUNS,
    RunSpec,
    Study,
    Timings,
    command_line,
    pi0_path,
    plan,
)
from tspin_ray.study.results import write_results


def run_config(spec: RunSpec) -> RunConfig:
    """The run's config as its run directory records it: a hub id as its cached snapshot (what train()
    resolves it to), so a rerun of the study compares like with like and resumes."""
    return resolve_hub_ids(spec.config())


def is_complete(spec: RunSpec, cfg: RunConfig) -> bool:
    """A committed, finished run of exactly this config (a different config is an error, not a skip)."""
    run = RunDir(spec.root)
    if not run.config_matches(cfg):
        raise UserError(f"{spec.root} holds a run made with a different config (other --iterations or base "
                        f"settings?); choose another --output-dir or remove that directory")
    return run.done("complete")


def proto_key(cfg: RunConfig) -> str | None:
    """What y0 depends on: pi_0, the training prompts, the sampling settings and the seed. Only for T-SPIN
    runs with a proto phase of their own (the others take y0 from their iteration 0: tspin_ray/controller/y0.py)."""

    if not separate_phase(cfg):
        return None
    d = cfg.to_dict()
    # How generators run (per phase or long-lived, how weights reach them) does not change a sample.
    gen = {k: v for k, v in d["generation"].items() if k not in EXECUTION_ONLY}
    key = {"model": d["model"], "data": d["data"], "generation": gen, "seed": cfg.seed,
           "samples": cfg.samples_per_prompt, "max_length": cfg.training.max_length}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def link_pi0(spec: RunSpec, pi0: Path) -> None:
    """Put the seed's pi_0 at <run>/checkpoints/pi_0 (hard links, atomically) when it is not there yet.

    Needed while the driver, given an external pi_0 (model.path, no SFT stage), still trains iteration 0
    from run.checkpoint(0) instead of model.path; harmless afterwards (no extra disk, never read).
    """
    dest = spec.root / "checkpoints" / "pi_0"
    if (dest / "config.json").exists():
        return
    with atomic_dir(dest) as tmp:
        for f in sorted(pi0.rglob("*")):
            if f.is_file():
                (tmp / f.relative_to(pi0)).parent.mkdir(parents=True, exist_ok=True)
                _link(f, tmp / f.relative_to(pi0))


def reuse_proto(target: Path, source: Path) -> int:
    """Hard-link (copy across file systems) the committed proto shards of `source` into `target`.

    The driver only generates the (source_iteration, prompt_id) rows a directory lacks, and shards are
    write-once, so sharing the files is safe; each link goes in under a temporary name and is renamed.
    """
    dest = target / "proto"
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted((source / "proto").glob("part-*.parquet")):
        final = dest / f.name
        if final.exists():
            continue
        tmp = dest / f".{f.name}.tmp-{uuid.uuid4().hex[:8]}"
        _link(f, tmp)
        os.replace(tmp, final)
        n += 1
    return n


def eval_key(cfg: RunConfig) -> str:
    """What an evaluation of a given checkpoint depends on besides the checkpoint: the held-out rows (data
    minus fraction/limit), greedy decoding settings and the NLL computation."""
    d = cfg.to_dict()
    key = {"data": {k: v for k, v in d["data"].items() if k not in ("fraction", "limit")}, "eval": d["eval"],
           "model": {k: d["model"][k] for k in ("dtype", "trust_remote_code")},
           "generation": {k: d["generation"][k] for k in ("backend", "gpu_memory_utilization",
                                                          "tensor_parallel_size")},
           "training": {k: d["training"][k] for k in ("backend", "precision", "max_length")}}
    return json.dumps(key, sort_keys=True, default=str)


def reuse_pi0_eval(spec: RunSpec, cfg: RunConfig, pi0: RunSpec) -> bool:
    """Commit the pi0 run's evaluation of pi_0 as this run's `eval_0`, so the driver does not evaluate the
    same checkpoint on the same rows again (a generator and a trainer start-up per method and seed).

    Only when everything the evaluation depends on is equal. Same order as the driver (metrics row, then
    the manifest entry): a crash in between leaves a row the driver prunes as uncommitted.
    """
    src = RunDir(pi0.root).entry("eval_0")
    if src is None or eval_key(cfg) != eval_key(run_config(pi0)):
        return False
    run = RunDir.open(cfg)  # creates the run directory (config.yaml, hash) exactly as the driver would
    if run.done("eval_0"):
        return False
    run.append_metrics([{"phase": "iteration", "iteration": PI0, **src, "copied_from": str(pi0.root)}])
    run.commit("eval_0", **src)
    return True


def share_work(study: Study, spec: RunSpec, cfg: RunConfig, pi0: RunSpec, proto_src: RunSpec | None,
               say) -> None:
    """Before a method's run starts: give it the seed's pi_0, pi_0's evaluation and a sibling's y0 cache."""
    if spec.name in RESERVED_RUNS:
        return
    link_pi0(spec, pi0_path(study, spec.seed))
    if reuse_pi0_eval(spec, cfg, pi0):
        say(f"{spec.key}: pi_0's evaluation taken from {pi0.key}")
    if proto_src is not None and RunDir(proto_src.root).done("proto") and not RunDir(spec.root).done("proto"):
        n = reuse_proto(spec.root, proto_src.root)
        record_reuse(study.out / "proto_reuse.json", {spec.key: proto_src.key})  # now: a crash must not lose it
        say(f"{spec.key}: reusing the proto cache of {proto_src.key} ({n} shards linked)")


def execute(study: Study, quiet: bool = False, say=print) -> None:
    """Run (or resume, or skip) every run in order."""
    specs = plan(study)
    timings = Timings(study.out / "timings.json")
    proto_sources: dict[tuple[int, str], RunSpec] = {}  # (seed, proto key) -> the first run with that y0
    pi0 = specs[0]
    for i, spec in enumerate(specs, 1):
        cfg = run_config(spec)
        pkey = proto_key(cfg)
        pi0 = spec if spec.name == "pi0" else pi0
        if is_complete(spec, cfg):
            say(f"[study {i}/{len(specs)}] {spec.key}: complete, skipped")
        else:
            share_work(study, spec, cfg, pi0, proto_sources.get((spec.seed, pkey)) if pkey else None,
                       lambda msg, i=i: say(f"[study {i}/{len(specs)}] {msg}"))
            say(f"[study {i}/{len(specs)}] {spec.key}: running")

            t0 = time.time()
            try:
                train(cfg, quiet=quiet)
            finally:  # an interrupted attempt's time counts too: the table reports the cost of the run
                timings.add(spec.key, time.time() - t0)
        if study.distribution is not None:
            t0 = time.time()
            if evaluate_run(spec.root, cfg, study.distribution, first=0 if spec.name in RESERVED_RUNS else 1):
                timings.add(spec.key + ":distribution", time.time() - t0)
        if study.keep_checkpoints == "final" and spec.name not in RESERVED_RUNS:
            prune_iterates(spec.root)
        if pkey:
            proto_sources.setdefault((spec.seed, pkey), spec)


def prune_iterates(root: Path) -> list[str]:
    """Remove a finished run's iterates other than pi_0 (hard links to the seed's), the final one and the
    best: the study reads metrics and evaluations, and 48 runs of a 135M model kept 62 GB otherwise.
    The manifest's `pruned` entry names what went."""
    run = RunDir(root)
    done = run.entry("complete")
    keep = {"pi_0", Path(done["checkpoint"]).name, done.get("best")}
    gone = sorted(p.name for p in (root / "checkpoints").glob("pi_*")
                  if p.name not in keep and p.is_dir() and not p.is_symlink())
    if gone:
        run.commit("pruned", iterates=sorted({*(run.entry("pruned") or {}).get("iterates", []), *gone}))
        for name in gone:
            shutil.rmtree(root / "checkpoints" / name)
    return gone


def record_reuse(path: Path, reused: dict[str, str]) -> None:
    """Reuse happens once (the shards then belong to the run): keep the record across invocations."""
    old = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({**old, **reused}, indent=1, sort_keys=True).encode())


def run_study(study: Study, quiet: bool = False, command: str | None = None, say=print) -> Path:
    """Run/resume every run of `study`, then write the results; return results.md's path."""
    study.out.mkdir(parents=True, exist_ok=True)
    execute(study, quiet=quiet, say=say)

    return write_results(study, command or command_line(study))
