"""The self-play loop: for t in iterations: generate with pi_t, stream triplets, train, export, evaluate.

    tspin-ray train --config jobs/demo-cpu.yaml

Everything expensive is committed to the run directory as it finishes (pi_0, the proto cache, each
iteration's generation shards and checkpoint), so rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np
import ray

from tspin_ray.config import RunConfig
from tspin_ray.errors import RunFailed, UserError
from tspin_ray.faults import maybe_fail
from tspin_ray.pipeline import check_complete, done_keys, generation_dataset, pool_size, read_shards
from tspin_ray.progress import Progress
from tspin_ray.rundir import RunDir, atomic_dir
from tspin_ray.trainer_group import TrainerGroup, ensure_ray

MAX_TRAINER_ATTEMPTS = 3  # a phase whose trainers keep dying fails instead of looping


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Validated inputs: nothing is written before these all exist."""
    cfg: RunConfig
    train: list
    eval: list
    format: object  # formatting.ChatFormat of the policy's tokenizer


def prepare(cfg: RunConfig) -> Prepared:
    """Check every input before any work or any write: model path, data, objective needs, resources."""
    from tspin_ray.data import load_splits
    from tspin_ray.modeling import check_checkpoint, load_format, max_positions, tiny_format

    if cfg.model.path is not None:
        check_checkpoint(cfg.model.path)
        fmt = load_format(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        positions = max_positions(cfg.model.path)
    else:
        fmt, positions = tiny_format(cfg.model.tiny), cfg.model.tiny.max_position_embeddings
    if cfg.generation.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("generation.backend is vllm but vllm is not installed "
                            "(pip install -e .[cpu] or .[gpu], or set generation.backend=hf)") from None
        if positions is not None and cfg.training.max_length >= positions:
            # vLLM scores prompt + response as a prompt, which must be shorter than its max_model_len.
            raise UserError(f"training.max_length ({cfg.training.max_length}) must be below the model's "
                            f"max_position_embeddings ({positions}) for the vllm backend")
    splits = load_splits(cfg.data, count_tokens=lambda prompt, system: len(fmt.prompt_ids(prompt, system)))
    if not splits.train:
        raise UserError(f"no training rows left after data.fraction={cfg.data.fraction} / data.limit")
    for e in splits.train + splits.eval:  # y in context for every row, before any work (one-line refusal)
        fmt.response_ids(e.prompt, e.response, e.system)
    return Prepared(cfg, splits.train, splits.eval, fmt)


def shuffled(rows, seed: int):
    """A seeded permutation of a list or an Arrow table (a cheap, reproducible per-epoch shuffle; Ray
    Data's random_shuffle is an all-to-all exchange that costs seconds even for a few rows)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.take(order) if hasattr(rows, "take") else [rows[i] for i in order]


def in_row_order(table, rows: list[dict]):
    """Shard rows in the order of `rows` (the input order), whichever batches wrote them: a resumed
    iteration then trains on exactly the sequence an uninterrupted one would have."""
    pos = {(r["source_iteration"], r["prompt_id"]): i for i, r in enumerate(rows)}
    keys = zip(table.column("source_iteration").to_pylist(), table.column("prompt_id").to_pylist(), strict=True)
    return table.take(np.argsort([pos[k] for k in keys], kind="stable"))


def consume(batches, on_batch, timeout: float, what: str) -> None:
    """Iterate a Ray Data batch iterator with a deadline and a one-line failure message."""
    q: queue.Queue = queue.Queue(maxsize=4)

    def pump():
        try:
            for b in batches:
                q.put(("batch", b))
            q.put(("done", None))
        except BaseException as e:  # handed over to the waiting thread
            q.put(("error", e))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.time() + timeout
    while True:
        try:
            kind, value = q.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            raise RunFailed(f"timed out after {timeout:.0f}s waiting for {what} (generation.timeout_s)") from None
        if kind == "done":
            return
        if kind == "error":
            raise RunFailed(f"{what} failed (each batch tried generation.max_attempts times): "
                            f"{root_cause(value)}") from value
        on_batch(value)


# The line Python prints for an exception: "RuntimeError: msg", "ray.exceptions.X: msg", "RayTaskError(E): msg".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?:\([\w.]*\))?: (\S.*)$")


def root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost exception behind Ray's wrappers, so a one-line failure names
    what went wrong. A worker's exception reaches the driver as text inside RayTaskError/UserCodeException
    (its traceback, root cause first, as Python prints chains), so the text is read before the objects.

    >>> root_cause(ValueError("outer\\ndetail"))
    'ValueError: outer'
    >>> root_cause(RuntimeError("ray::MapBatches(f)\\nKeyError: 'x'\\n\\nThe above exception ...\\nray.exceptions.UserCodeException: UDF failed"))
    "KeyError: 'x'"
    """
    for line in str(error).splitlines():
        m = _EXCEPTION_LINE.match(line.strip())
        if m:
            return f"{m.group(1)}: {m.group(2)[:300]}"
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def example_rows(examples, t: int, proto: dict | None = None) -> list[dict]:
    return [{"prompt_id": e.prompt_id, "prompt": e.prompt, "response": e.response, "system": e.system,
             "source_iteration": t,
             "proto_json": json.dumps(proto[e.prompt_id]) if proto else "", "given_json": ""}
            for e in examples]


class Driver:
    def __init__(self, prep: Prepared, quiet: bool = False):
        self.cfg, self.prep = prep.cfg, prep
        self.progress = Progress(quiet=quiet)
        ensure_ray(self.cfg)
        self.run = RunDir.open(self.cfg)
        self.trainers: TrainerGroup | None = None
        self.generators = None  # GeneratorPool, when generation.persistent

    # ------------------------------------------------------------ helpers
    def log(self, rows: list[dict]) -> None:
        self.run.append_metrics(rows)
        self.progress.metrics(rows)

    def stage_kwargs(self, model_path: Path, iteration, *, samples: int, temperature: float,
                     max_new_tokens: int, score_ref: bool, out_dir: Path | None) -> dict:
        c = self.cfg
        return dict(model_path=str(model_path), backend=c.generation.backend, iteration=iteration,
                    seed=c.seed, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=c.generation.top_p if temperature > 0 else 1.0,
                    max_response_tokens=c.data.max_response_tokens, max_length=c.training.max_length,
                    score_ref=score_ref, out_dir=str(out_dir) if out_dir else None,
                    engine_kwargs=dict(dtype=c.model.dtype, trust_remote_code=c.model.trust_remote_code,
                                       gpu_memory_utilization=c.generation.gpu_memory_utilization,
                                       tensor_parallel_size=c.generation.tensor_parallel_size,
                                       # +1: vLLM scores a prompt only when it is shorter than max_model_len
                                       max_model_len=c.training.max_length + 1, sleep_mode=c.generation.colocate))

    def generate(self, rows: list[dict], stage_kwargs: dict):
        r, g = self.cfg.resources, self.cfg.generation
        if g.persistent:
            if self.generators is None:
                from tspin_ray.generators import GeneratorPool

                share = self.trainer_group().pg if g.colocate else None  # engine i beside trainer rank i
                self.generators = GeneratorPool(self.cfg, share_pg=share)
            return self.generators.dataset(rows, stage_kwargs, g.batch_size, g.max_attempts)
        return generation_dataset(rows, stage_kwargs=stage_kwargs, batch_size=g.batch_size,
                                  min_actors=r.generators_min, max_actors=r.generators_max,
                                  num_cpus=r.generator_cpus, num_gpus=r.generator_gpus,
                                  resources=r.generator_resources, max_attempts=g.max_attempts)

    def persisted_generation(self, rows: list[dict], kwargs: dict, out_dir: Path, what: str):
        """Generate what `out_dir` lacks, wait for it, and return all shards as one table."""
        have = done_keys(read_shards(out_dir))
        todo = [r for r in rows if (r["source_iteration"], r["prompt_id"]) not in have]
        if todo:
            with self.progress.phase(what, total=len(todo)) as bar:
                def on_batch(batch):
                    bar.update(len(batch["prompt_id"]))
                    bar.pool(pool_size())
                    maybe_fail(what.split()[0])

                consume(self.generate(todo, kwargs).iter_batches(batch_size=None, batch_format="numpy"),
                        on_batch, self.cfg.generation.timeout_s, what)
            self.rest_generators()
        table = read_shards(out_dir)
        check_complete(table, [(r["source_iteration"], r["prompt_id"]) for r in rows], kwargs["samples"], what)
        return table

    # ------------------------------------------------------------ stages
    def initial_policy(self) -> Path:
        """pi_0: the given checkpoint, or a tiny model trained by SFT on the configured fraction."""
        c, run = self.cfg, self.run
        if run.done("pi_0") and (run.entry("pi_0").get("external") or run.latest_good_checkpoint(0) == 0):
            return run.root / run.entry("pi_0")["path"]
        if not c.needs_sft_stage:  # absolute: actors resolve relative paths against their own cwd
            run.commit("pi_0", path=str(Path(c.model.path).resolve()), files={}, external=True)
            return Path(c.model.path).resolve()
        base = Path(c.model.path).resolve() if c.model.path else run.root / "checkpoints" / "base"
        if c.model.tiny is not None and not (base / "config.json").exists():
            from tspin_ray.modeling import save_tiny

            with atomic_dir(base) as tmp:
                save_tiny(tmp, c.model.tiny)
        rows = self.sft_rows(self.prep.train)
        t0 = time.time()
        group = self.trainer_group(base)
        epochs = c.sft.epochs
        per_rank = len(rows) // c.resources.trainers
        steps = (per_rank // (c.sft.global_batch_size // c.resources.trainers)) * epochs
        order = []
        for epoch in range(epochs):  # all epochs in one stream: one Ray Data execution, not one per epoch
            order.extend(shuffled(rows, c.seed * 1000 + epoch))
        group.begin(objective="sft", params={}, optimizer=c.sft.optimizer, lr=c.sft.lr, weight_decay=0.0,
                    schedule=c.sft.schedule, warmup_ratio=c.sft.warmup_ratio, total_steps=steps,
                    micro_batch_size=c.sft.micro_batch_size, global_batch_size=c.sft.global_batch_size,
                    grad_clip=c.training.grad_clip)
        with self.progress.phase("sft", total=steps) as bar:
            records = group.train_stream(ray.data.from_items(order), on_step=bar.set)
        maybe_fail("sft")
        self.log([{"phase": "sft", **r} for r in records[:: max(1, len(records) // 50)]])
        with atomic_dir(run.checkpoint(0)) as tmp:
            group.export(tmp)
        run.commit_checkpoint(0, seconds=time.time() - t0)
        group.mark_loaded(run.checkpoint(0))
        return run.checkpoint(0)

    def sft_rows(self, examples) -> list[dict]:
        fmt, c = self.prep.format, self.cfg
        out = []
        for e in examples:
            p, y = fmt.example_ids(e.prompt, e.response, e.system, c.data.max_response_tokens, c.training.max_length)
            out.append({"prompt_ids": p, "real_ids": y})
        return out

    def trainer_group(self, path: Path | None = None) -> TrainerGroup:
        if self.trainers is None:
            self.trainers = TrainerGroup(self.cfg)
        if path is not None:
            self.trainers.load(path)
        return self.trainers

    def proto_cache(self, pi0: Path) -> dict[str, list]:
        """y0: sampled once from pi_0 and reused in every iteration (T-SPIN)."""
        g = self.cfg.generation
        kwargs = self.stage_kwargs(pi0, "proto", samples=self.cfg.samples_per_prompt, temperature=g.temperature,
                                   max_new_tokens=g.max_new_tokens, score_ref=False, out_dir=self.run.proto)
        table = self.persisted_generation(example_rows(self.prep.train, -1), kwargs, self.run.proto, "proto")
        self.run.commit("proto", rows=table.num_rows)
        return dict(zip(table.column("prompt_id").to_pylist(), table.column("generated_ids").to_pylist(),
                        strict=True))

    def evaluate(self, path: Path, label: str) -> dict:
        """Greedy exact match and held-out NLL of the real responses, for the policy at `path`."""
        from tspin_ray.tasks import exact_match

        ev = self.prep.eval[: self.cfg.eval.size] if self.cfg.eval.size else self.prep.eval
        if not ev:
            return {}
        t0 = time.time()
        kwargs = self.stage_kwargs(path, "eval", samples=1, temperature=0.0,
                                   max_new_tokens=self.cfg.eval.max_new_tokens, score_ref=False, out_dir=None)
        got = {}
        with self.progress.phase(f"eval {label}", total=len(ev)) as bar:
            def on_batch(b):
                for pid, gens in zip(b["prompt_id"], b["generated"], strict=True):
                    got[str(pid)] = str(gens[0])
                bar.update(len(b["prompt_id"]))

            consume(self.generate(example_rows(ev, 0), kwargs).iter_batches(batch_size=None, batch_format="numpy"),
                    on_batch, self.cfg.generation.timeout_s, f"evaluation of {label}")
        self.rest_generators()
        acc = float(np.mean([exact_match(got[e.prompt_id], e.response) for e in ev]))
        rows = self.sft_rows(ev)
        nll, tokens = self.trainer_group(path).nll([r["prompt_ids"] for r in rows], [r["real_ids"] for r in rows])
        return {"eval/exact_match": acc, "eval/nll": nll / max(tokens, 1), "timing/eval": time.time() - t0}

    def iteration(self, t: int, pi_t: Path, proto: dict | None) -> dict:
        """One self-play iteration: pi_t generates y', the trainers learn from the triplets, pi_{t+1} is out."""
        c, run = self.cfg, self.run
        obj = c.objective.for_iteration(t, c.iterations)
        params = {k: getattr(obj, k) for k in ("beta", "alpha", "mu", "loss_type", "nll_weight")}
        rows = example_rows(self.prep.train, t, proto)
        if obj.mixes_previous and t > 0:  # SPIN: last iteration's pairs, re-scored under pi_t
            prev = read_shards(run.generations(t - 1))
            for r in prev.select(["prompt_id", "generated_ids", "source_iteration"]).to_pylist():
                if r["source_iteration"] == t - 1:
                    ex = self.prep.train[self._index[r["prompt_id"]]]
                    rows.append({**example_rows([ex], t - 1)[0], "given_json": json.dumps(r["generated_ids"])})
        gen_dir = run.generations(t)
        kwargs = self.stage_kwargs(pi_t, t, samples=c.samples_per_prompt, temperature=c.generation.temperature,
                                   max_new_tokens=c.generation.max_new_tokens,
                                   score_ref=obj.name in ("spin", "space"), out_dir=gen_dir)
        group = self.trainer_group(pi_t)
        n, tr = c.resources.trainers, c.training
        steps_per_epoch = (len(rows) // n) // (tr.global_batch_size // n)
        if steps_per_epoch == 0:
            raise UserError(f"{len(rows)} training rows make no full global batch of {tr.global_batch_size}")
        group.begin(objective=obj.name, params=params, optimizer=tr.optimizer,
                    lr=tr.lr_for_iteration(t, c.iterations),
                    weight_decay=tr.weight_decay, schedule=tr.schedule, warmup_ratio=tr.warmup_ratio,
                    total_steps=steps_per_epoch * tr.epochs, micro_batch_size=tr.micro_batch_size,
                    global_batch_size=tr.global_batch_size, grad_clip=tr.grad_clip)
        t0 = time.time()
        records: list[dict] = []
        have = set() if obj.name == "sft" else done_keys(read_shards(gen_dir))  # read once, not once per row
        todo = [] if obj.name == "sft" else [r for r in rows if (r["source_iteration"], r["prompt_id"]) not in have]
        if todo and (len(todo) < len(rows) or c.generation.colocate):
            # Resumed mid-generation, or colocated engines that must sleep before training: finish the
            # shards first, then train on all of them in input order, exactly as a streamed run would.
            label = f"generate {t} (resume)" if len(todo) < len(rows) else f"generate {t}"
            self.persisted_generation(rows, kwargs, gen_dir, label)
        stream = bool(todo) and len(todo) == len(rows) and not c.generation.colocate
        with self.progress.phase(f"iter {t} train", total=steps_per_epoch * tr.epochs) as bar:
            for epoch in range(tr.epochs):
                seed = c.seed * 1000 + t * 10 + epoch
                if obj.name == "sft":  # continued SFT (the control): no opponent, nothing to generate
                    ds = ray.data.from_items(shuffled(self.sft_rows(self.prep.train), seed))
                elif epoch == 0 and stream:  # training starts while generation is still running
                    ds = self.generate(todo, kwargs)
                else:
                    table = read_shards(gen_dir)
                    keys = [(r["source_iteration"], r["prompt_id"]) for r in rows]
                    check_complete(table, keys, c.samples_per_prompt, f"iteration {t}")
                    table = in_row_order(table, rows)
                    ds = ray.data.from_arrow(table if epoch == 0 else shuffled(table, seed))
                recs = group.train_stream(ds, on_step=lambda step: (bar.set(step), bar.pool(pool_size())))
                records += [{"epoch": epoch, **r} for r in recs]
        t_train_end = time.time()
        if obj.name == "sft":
            return self.finish_iteration(t, t0, t_train_end, records, rows, table=None, todo=[])
        maybe_fail("generate")
        table = read_shards(gen_dir)
        check_complete(table, [(r["source_iteration"], r["prompt_id"]) for r in rows], c.samples_per_prompt,
                       f"iteration {t}")
        run.commit(f"gen_{t}", rows=table.num_rows)
        generated_now = stream or (c.generation.colocate and len(todo) == len(rows))
        return self.finish_iteration(t, t0, t_train_end, records, rows, table, todo if generated_now else [])

    def finish_iteration(self, t, t0, t_train_end, records, rows, table, todo) -> dict:
        """Export pi_{t+1}, log the steps, and summarise the iteration's timings and metrics."""
        run, group = self.run, self.trainers
        with atomic_dir(run.checkpoint(t + 1)) as tmp:
            export_s = group.export(tmp)
            maybe_fail("export")
        run.commit_checkpoint(t + 1, seconds=time.time() - t0)
        group.mark_loaded(run.checkpoint(t + 1))
        sync = self.sync_weights(run.checkpoint(t + 1))
        self.log([{"phase": "train", "iteration": t, **r} for r in records])
        gen_tokens = int(np.sum(table.column("gen_tokens").to_numpy())) if table is not None else 0
        gen_seconds = float(table.column("gen_done").to_numpy().max() - t0) if todo else 0.0
        first_step = records[0]["time"] if records else t0
        summary = {
            "timing/generate": gen_seconds, "timing/train": t_train_end - t0, "timing/checkpoint": export_s,
            # The engine (re)load a phase paid, or the broadcast of pi_{t+1} into long-lived engines.
            "timing/weight_sync": sync.get("seconds") or (
                float(np.max(table.column("engine_load_s").to_numpy())) if table is not None else 0.0),
            **({"weight_sync/gbps": sync["gbps"]} if sync.get("bytes") else {}),
            "timing/first_train_step": first_step - t0, "timing/last_generation": gen_seconds,
            "timing/first_generation": float(table.column("gen_done").to_numpy().min() - t0) if todo else 0.0,
            "generate/tokens_per_s": gen_tokens / gen_seconds if gen_seconds > 0 else math.nan,
            "train/rows": len(rows),
        }
        for key in sorted({k for r in records for k in r} - {"time", "step", "epoch", "rows"}):
            vals = [r[key] for r in records if key in r]
            summary[f"train/{key}"] = float(np.mean(vals)) if vals else math.nan
        return summary

    def rest_generators(self) -> None:
        """Colocated mode: long-lived engines sleep once a generation phase is consumed (the next batch
        wakes them), so the trainers get the GPU memory back."""
        if self.generators is not None and self.cfg.generation.colocate:
            self.generators.sleep()

    def sync_weights(self, path: Path) -> dict:
        """Broadcast pi_{t+1} into the long-lived generators (generation.weight_sync: broadcast); any
        other case, or a failed broadcast, leaves them to reload the committed checkpoint lazily."""
        if self.generators is None or self.cfg.generation.weight_sync != "broadcast":
            return {}
        sync = self.generators.sync(self.trainers, path)
        if "error" in sync:
            self.progress.say(f"warning: weight broadcast failed ({sync['error']}); generators will reload "
                              f"{path} instead")
        return sync

    # ------------------------------------------------------------ the loop
    def committed(self, row: dict) -> bool:
        """Whether a metrics row belongs to committed work (rows of interrupted work are dropped)."""
        if row.get("phase") == "sft":
            return self.run.done("pi_0")
        if row.get("iteration") == -1:
            return self.run.done("eval_0")
        return self.run.done(f"iter_{row.get('iteration')}")

    def with_trainer_retries(self, what: str, fn):
        """Run fn; if a trainer actor dies, rebuild the group and redo the phase from its start checkpoint."""
        for attempt in range(1, MAX_TRAINER_ATTEMPTS + 1):
            try:
                return fn()
            except ray.exceptions.RayActorError as e:
                if self.trainers is not None:
                    if self.generators is not None and not self.generators.own_pg:
                        self.generators.shutdown()  # colocated engines go with their bundles
                        self.generators = None
                    self.trainers.shutdown()
                    self.trainers = None
                if attempt == MAX_TRAINER_ATTEMPTS:
                    raise RunFailed(f"{what}: a trainer actor died {attempt} times; last: "
                                    f"{str(e).strip().splitlines()[0]}") from e
                self.progress.say(f"warning: a trainer actor died during {what}; restarting it from its "
                                  f"start checkpoint (attempt {attempt + 1}/{MAX_TRAINER_ATTEMPTS})")

    def run_all(self) -> dict:
        c, run = self.cfg, self.run
        latest = run.latest_good_checkpoint(c.iterations)  # verifies checksums; drops corrupt iterates
        if run.done("complete") and latest == c.iterations:
            self.progress.say(f"run {run.root} is already complete ({c.iterations} iterations); nothing to do")
            return run.entry("complete")
        run.prune_metrics(self.committed)
        self._index = {e.prompt_id: i for i, e in enumerate(self.prep.train)}
        pi0 = self.with_trainer_retries("SFT of pi_0", self.initial_policy)
        if not run.done("eval_0"):
            ev = self.with_trainer_retries("evaluation of pi_0", lambda: self.evaluate(pi0, "pi_0"))
            self.log([{"phase": "iteration", "iteration": -1, **ev}])
            run.commit("eval_0", **ev)
        proto = self.proto_cache(pi0) if c.objective.name == "tspin" and c.iterations > 0 else None
        start = run.latest_good_checkpoint(c.iterations) or 0
        while start > 0 and not run.done(f"iter_{start - 1}"):
            # pi_start exists but its iteration was never committed (stopped during its evaluation):
            # redo that iteration from its shards on disk so its metrics are logged exactly once.
            start = run.latest_good_checkpoint(start - 1) or 0
        for t in range(start, c.iterations):
            t0 = time.time()

            def one_iteration(t=t):
                pi_t = pi0 if t == 0 else run.checkpoint(t)  # pi_0 may be an external model.path
                summary = self.iteration(t, pi_t, proto)
                summary.update(self.evaluate(run.checkpoint(t + 1), f"pi_{t + 1}"))
                return summary

            summary = self.with_trainer_retries(f"iteration {t}", one_iteration)
            summary["timing/iteration"] = time.time() - t0
            self.log([{"phase": "iteration", "iteration": t, **summary}])
            run.commit(f"iter_{t}", **summary)
            maybe_fail("between")
        final = {"iterations": c.iterations, "checkpoint": str(run.checkpoint(c.iterations))}
        run.commit("complete", **final)
        return final

    def close(self) -> None:
        for group in (self.generators, self.trainers):  # colocated engines live in the trainers' bundles
            if group is not None:
                group.shutdown()


def train(cfg: RunConfig, quiet: bool = False) -> dict:
    prep = prepare(cfg)
    driver = Driver(prep, quiet=quiet)
    try:
        return driver.run_all()
    finally:
        driver.close()
