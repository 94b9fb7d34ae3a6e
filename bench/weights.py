"""Weight sync: reloading a new checkpoint into a running engine vs starting a cold engine; checkpoint I/O.

    .venv/bin/python -m bench --only weight_sync [--quick]

The generators get pi_{t+1} from the HF checkpoint the trainers export (docs/concepts.md, "Weight sync"). This
measures, per model size:
- `HFEngine.reload` and `VLLMEngine.reload` (vLLM's collective_rpc("reload_weights")) into a running
  engine vs constructing a new engine from the same checkpoint (what a fresh generator actor pays on top
  of its process start and imports; the vLLM import time is reported apart), both up to the first token
  generated with the new weights;
- checkpoint export (`save_pretrained`, safetensors, as `Trainer.export` does) and load (`load_model`),
  in GB/s, against writing / reading the same number of bytes as one plain file in the same directory
  (the "link": here the page cache and disk).
- the broadcast fast path for long-lived generators (`GeneratorPool.sync`, workers/weight_broadcast.py: gloo here, NCCL
  on GPUs) against export + reload, in seconds, and its GB/s against one whole-model bucket.
"""

from __future__ import annotations

import os

from bench.common import (
    Context,
    compare,
    free_gpu,
    gpu_count,
    make_checkpoint,
    median,
    now,
    skipped,
    weights_bytes,
)

SIZES = {
    "quick": dict(models={"tiny": {}}, repeats=2, cold_repeats=1),
    "full": dict(models={"tiny": {}, "medium": dict(hidden_size=768, num_layers=8, num_heads=12,
                                                    intermediate_size=2048, max_position_embeddings=512)},
                 repeats=5, cold_repeats=2),
    "gpu": dict(models={"tiny": {}, "1B": dict(hidden_size=2048, num_layers=16, num_heads=16,
                                               intermediate_size=5632, max_position_embeddings=1024)},
                repeats=3, cold_repeats=2),  # 3 of a 1B checkpoint: the GPU kit's 8-minute budget
}


def raw_io(directory, nbytes: int, repeats: int) -> dict:
    """Seconds to write (+fsync) and read back one plain file of nbytes: the baseline for checkpoint I/O."""
    blob = os.urandom(min(nbytes, 1 << 24)) * max(1, nbytes // (1 << 24))
    blob += os.urandom(nbytes - len(blob))
    path = directory / "raw.bin"
    writes, fsyncs, reads = [], [], []
    for _ in range(repeats):
        t0 = now()
        with open(path, "wb") as f:
            f.write(blob)
            t1 = now()
            f.flush()
            os.fsync(f.fileno())
        writes.append(t1 - t0)
        fsyncs.append(now() - t0)
        t0 = now()
        with open(path, "rb") as f:
            f.read()
        reads.append(now() - t0)
    path.unlink()
    return {"write_s": median(writes), "write_fsync_s": median(fsyncs), "read_s": median(reads)}


def touch_pages(model) -> None:
    """Read one float per 4 KiB page of every weight: load_model memory-maps the safetensors file, so the
    bytes are only read when first used; this makes a load time cover the reading."""
    for p in model.parameters():
        p.detach().reshape(-1)[::1024].sum()


def checkpoint_io(path, out_dir, repeats: int) -> dict:
    """save_pretrained (safetensors) of a loaded model, with and without fsync, and load_model (plus a first
    read of every weight page), seconds."""
    from transformers.utils import logging as hf_logging

    from tspin_ray.models.checkpoints import load_model

    hf_logging.disable_progress_bar()
    model = load_model(path)
    saves, synced, loads = [], [], []
    for i in range(repeats):
        target = out_dir / f"export-{i}"
        t0 = now()
        model.save_pretrained(target, safe_serialization=True)
        t1 = now()
        for f in target.iterdir():  # the run directory fsyncs every exported file (rundir.atomic_dir)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        saves.append(t1 - t0)
        synced.append(now() - t0)
        t0 = now()
        touch_pages(load_model(target))
        loads.append(now() - t0)
    return {"save_s": median(saves), "save_fsync_s": median(synced), "load_s": median(loads)}


def first_token(engine) -> None:
    """One token for one prompt: the engine has now read every weight it serves with (both engines map
    the checkpoint lazily, so a start or reload is only done once a forward has run)."""
    engine.generate([[4, 5, 6]], [0], max_new_tokens=1, temperature=1.0, top_p=1.0)


def engine_times(backend: str, path_a, path_b, s: dict, dtype: str) -> dict:
    """Cold construction of an engine from checkpoint A (after its imports), then reloads A <-> B; each
    timed up to the first token generated with the new weights."""
    from tspin_ray.workers.engines import make_engine

    import_s = 0.0
    if backend == "vllm":
        t0 = now()
        import vllm  # noqa: F401  (a new actor pays this too; reported apart from the engine start)
        import_s = now() - t0
    kwargs = dict(dtype=dtype, seed=0, **({"gpu_memory_utilization": 0.4} if backend == "vllm" else {}))
    cold, engine = [], None
    repeats = s["cold_repeats"] if backend == "hf" else 1  # a vLLM start costs 5-30 s of compilation on CPU
    for _ in range(repeats):
        engine = None  # drop the previous engine before timing the next start
        free_gpu()
        t0 = now()
        engine = make_engine(backend, str(path_a), **kwargs)
        first_token(engine)
        cold.append(now() - t0)
    reloads = []
    for i in range(s["repeats"]):
        target = path_b if i % 2 == 0 else path_a  # alternate, so every reload really changes the weights
        t0 = now()
        engine.reload(str(target))
        first_token(engine)
        reloads.append(now() - t0)
    engine = None
    free_gpu()
    return {"import_s": import_s, "cold_start_s": median(cold), "cold_starts": cold, "reload_s": median(reloads),
            "reloads": reloads}


def broadcast_times(path, out_dir, s: dict, backend: str, gpus: float) -> dict:
    """A 1-rank trainer group and one long-lived generator, both on pi at `path`: the fast path
    (GeneratorPool.sync: bucketed broadcast, gloo on CPU / NCCL on GPU) against the checkpoint path the
    default pipeline takes (trainer export + engine reload), and against one whole-model bucket (the
    most the link gives to this code path). Each timed to the new weights being in the engine."""
    import ray

    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare
    from tspin_ray.controller.trainer_group import TrainerGroup
    from tspin_ray.rollout.phases import prompt_rows
    from tspin_ray.workers.generator_pool import GeneratorPool

    raw = {"model": {"path": str(path)}, "data": {"task": "addition", "task_size": 40, "eval_size": 8},
           "generation": {"backend": backend, "persistent": True, "weight_sync": "broadcast", "max_new_tokens": 1},
           "training": {"backend": "torch", "max_length": 64},
           "resources": {"trainers": 1, "trainer_cpus": 1, "trainer_gpus": gpus, "generators_max": 1,
                         "generator_cpus": 1, "generator_gpus": gpus}, "output_dir": str(out_dir / "run")}
    driver = Driver(prepare(from_dict(raw)), quiet=True)
    phase = driver.phase(path, "eval", samples=1, temperature=0.0, max_new_tokens=1)
    trainers, pool = TrainerGroup(driver.cfg), GeneratorPool(driver.cfg)
    try:
        trainers.load(path)
        pool.dataset(prompt_rows(driver.prep.eval[:1], 0), phase, 1, 1).take_all()  # start the engine
        pool.sync(trainers, path)  # warm-up: the first group in a process pays imports and gloo setup
        syncs, checkpoints, whole = [], [], []
        for _ in range(s["repeats"]):  # each kind back to back: an export between syncs churns the page cache
            out = pool.sync(trainers, path)
            if not out.ok:
                raise RuntimeError(out.error)
            syncs.append(out.seconds)
        for i in range(s["repeats"]):
            t0 = now()
            trainers.export(out_dir / f"export-{i}")
            ray.get(pool.actors[0].__ray_call__.remote(lambda self, p=str(out_dir / f"export-{i}"):
                                                       self.stage.engine.reload(p)))
            checkpoints.append(now() - t0)
        bucket_mb = pool.cfg.generation.sync_bucket_mb
        pool.cfg = from_dict({**raw, "generation": {**raw["generation"], "sync_bucket_mb": 1e6}})
        for _ in range(s["repeats"]):
            whole.append(pool.sync(trainers, path).seconds)
        return {"broadcast_s": median(syncs), "checkpoint_s": median(checkpoints), "one_bucket_s": median(whole),
                "bytes": out.bytes, "bucket_mb": bucket_mb, "broadcasts": syncs}
    finally:
        trainers.shutdown()
        pool.shutdown()
        driver.close()


def broadcast_comparisons(ctx: Context, label: str, path, d: dict, backend: str) -> list[dict]:
    from bench.common import ray_session

    s = ctx.sizes(SIZES)
    link = "NCCL" if ctx.gpu else "gloo over loopback TCP"
    if ctx.gpu and gpu_count() < 2:
        return [skipped(f"{label}: broadcast", "seconds", "export + reload", None, "broadcast",
                        "NCCL needs the trainer rank and the vLLM worker on two GPUs; this machine has one")]
    try:
        with ray_session():
            b = broadcast_times(path, ctx.work / label / "sync", s, backend, 1.0 if ctx.gpu else 0.0)
    except Exception as exc:  # report the failure, keep measuring the rest
        return [skipped(f"{label}: broadcast", "seconds", "export + reload", None, "broadcast",
                        f"{type(exc).__name__}: {str(exc).strip()[:200]}")]
    d["broadcast"] = b
    gb = b["bytes"] / 1e9
    return [
        compare(f"{label}: weight sync ({link})", "seconds", "export + reload", b["checkpoint_s"],
                f"broadcast, {b['bucket_mb']:g} MiB buckets", b["broadcast_s"], higher_is_better=False),
        compare(f"{label}: broadcast ({link})", "GB/s", "one whole-model bucket", gb / b["one_bucket_s"],
                f"{b['bucket_mb']:g} MiB buckets", gb / b["broadcast_s"]),
    ]


def run(ctx: Context) -> dict:
    import importlib.util

    s = ctx.sizes(SIZES)
    dtype = "bfloat16" if ctx.gpu else "float32"
    comparisons, details, rows = [], {}, []
    has_vllm = importlib.util.find_spec("vllm") is not None
    for label, spec in s["models"].items():
        a = make_checkpoint(ctx.work / label / "a", seed=0, **spec)
        b = make_checkpoint(ctx.work / label / "b", seed=1, **spec)
        nbytes = weights_bytes(a)
        gb = nbytes / 1e9
        raw = raw_io(ctx.work / label, nbytes, s["repeats"])
        io = checkpoint_io(a, ctx.work / label, s["repeats"])
        d = {"bytes": nbytes, "raw_io": raw, "checkpoint_io": io}
        comparisons += [
            compare(f"{label}: export", "GB/s", "plain file write", gb / raw["write_s"], "save_pretrained",
                    gb / io["save_s"]),
            compare(f"{label}: export + fsync", "GB/s", "plain file write + fsync", gb / raw["write_fsync_s"],
                    "save_pretrained + fsync", gb / io["save_fsync_s"]),
            compare(f"{label}: load", "GB/s", "plain file read", gb / raw["read_s"], "load_model", gb / io["load_s"]),
        ]
        for backend, name in (("hf", "HFEngine"), ("vllm", "VLLMEngine")):
            if backend == "vllm" and not has_vllm:
                comparisons.append(skipped(f"{label}: {name}", "seconds", "cold engine start", None, "reload",
                                           "vllm is not installed"))
                continue
            try:
                e = engine_times(backend, a, b, s, dtype)
            except Exception as exc:  # report the failure, keep measuring the rest
                comparisons.append(skipped(f"{label}: {name}", "seconds", "cold engine start", None, "reload",
                                           f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
                continue
            d[backend] = e
            comparisons.append(compare(f"{label}: {name}", "seconds", "cold engine start", e["cold_start_s"],
                                       "reload", e["reload_s"], higher_is_better=False))
            rows.append([label, name, e["import_s"] or None, e["cold_start_s"], e["reload_s"], gb / e["reload_s"]])
        details[label] = d
        comparisons += broadcast_comparisons(ctx, label, a, d, "vllm" if ctx.gpu and has_vllm else "hf")
    sizes = ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in details.items())
    notes = [
        f"Checkpoints (fp32 safetensors): {sizes}. Medians of {s['repeats']} repeats; vLLM is started once "
        f"(its CPU start compiles the model, 5-30 s).",
        "Export and load run through the page cache: GB/s against a plain write/read of the same bytes in the "
        "same directory says how much the safetensors path costs over the storage itself. load_model maps the "
        "file lazily, so its time includes reading one float of every 4 KiB page; engine start and reload are "
        "timed up to their first generated token.",
        "By default each generation phase starts new generator actors that load the committed checkpoint "
        "(timing/weight_sync = their engine start); long-lived generators (generation.persistent) reload in "
        "place or take a broadcast (weight_sync: broadcast).",
        f"Engines run in {dtype}; HF cold start is a median of {s['cold_repeats']}.",
    ]
    engines = [c["name"] for c in comparisons if c["name"].endswith("Engine") and "ratio" in c]
    vllm_rows = [n for n in engines if n.endswith("VLLMEngine")]
    return {"comparisons": comparisons, "config": s, "details": details, "notes": notes,
            "headline": (vllm_rows or engines or [None])[-1],  # the largest model's vLLM reload
            "tables": [{"title": "Engines", "columns": ["model", "engine", "import s", "cold start s", "reload s",
                                                        "reload GB/s"], "rows": rows}]}
