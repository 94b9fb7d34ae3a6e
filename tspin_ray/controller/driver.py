"""The self-play loop: for t in iterations: generate with pi_t, stream triplets, train, export, evaluate.

    tspin-ray train --config jobs/demo-cpu.yaml

Everything expensive is committed to the run directory as it finishes (pi_0, each iteration's generation
shards and checkpoint; T-SPIN's y0 are iteration 0's shards, tspin_ray/controller/y0.py), so rerunning the same
command resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from tspin_ray.config.schema import ObjectiveConfig, RunConfig
from tspin_ray.controller.health import Verdict, check_iterate, evaluation_figures, sample_figures
from tspin_ray.controller.prepare import Prepared, prepare
from tspin_ray.controller.progress import Progress
from tspin_ray.controller.summary import iteration_summary
from tspin_ray.controller.sync_check import PROBE_ROWS, verify
from tspin_ray.controller.trainer_group import (
    TrainerGroup,
    ensure_ray,
    optimizer_setup,
    sft_setup,
    steps_per_epoch,
)
from tspin_ray.controller.y0 import ITERATION_0, SEPARATE, y0_of_iteration_0, y0_source
from tspin_ray.data.tasks import exact_match
from tspin_ray.deadlines import consume
from tspin_ray.errors import RunFailed, UserError
from tspin_ray.evaluation.harness import checkpoint_scores
from tspin_ray.faults import maybe_fail
from tspin_ray.models.checkpoints import MERGED
from tspin_ray.models.tiny import save_tiny
from tspin_ray.rollout.phases import GenPhase, in_row_order, phase_for, prompt_rows, ramp, row_keys, shuffled
from tspin_ray.rollout.seeds import derive_seed
from tspin_ray.rollout.shards import block_dataset, check_complete, done_keys, read_shards, set_aside
from tspin_ray.rundir.store import RunDir, atomic_dir, listing_identity
from tspin_ray.workers.generation_stage import generation_dataset, pool_size
from tspin_ray.workers.generator_pool import GeneratorPool
from tspin_ray.workers.records import StepRecord, SyncResult

MAX_TRAINER_ATTEMPTS = 3  # a phase whose trainers keep dying fails instead of looping


@dataclasses.dataclass(frozen=True)
class Plan:
    """One iteration's work, decided before any of it runs (Driver.plan)."""
    t: int
    objective: ObjectiveConfig  # the hyper-parameters in force at iteration t
    rows: pa.Table  # prompt rows in input order (SPIN: then the previous iteration's pairs)
    phase: GenPhase | None  # how pi_t generates y'; None for continued SFT (no opponent)
    todo: pa.Table | None  # rows with no usable shard on disk yet
    stream: bool  # epoch 0 trains while the whole generation runs (else it is on disk first)
    steps_per_epoch: int

    @property
    def generates_all(self) -> bool:
        """Whether every row is generated in this attempt (then the generation timings mean something)."""
        return self.todo is not None and self.todo.num_rows == self.rows.num_rows > 0


class Driver:
    def __init__(self, prep: Prepared, quiet: bool = False, *, record: bool = True):
        """record=False: a driver that only generates and evaluates (`tspin-ray eval`, `generate`) and
        never opens, creates or writes the config's output_dir."""
        self.cfg, self.prep = prep.cfg, prep
        self.progress = Progress(quiet=quiet)
        ensure_ray(self.cfg)
        self.run = RunDir.open(self.cfg) if record else None
        self.trainers: TrainerGroup | None = None
        self.generators = None  # GeneratorPool, when generation.persistent
        self._index = {e.prompt_id: i for i, e in enumerate(self.prep.train)}

    # ------------------------------------------------------------ helpers
    def log(self, rows: list[dict]) -> None:
        self.run.append_metrics(rows)
        self.progress.metrics(rows)

    def phase(self, model_path: Path, iteration, *, samples: int, temperature: float, max_new_tokens: int,
              score_ref: bool = False, out_dir: Path | None = None, checkpoint: str = "") -> GenPhase:
        return phase_for(self.cfg, model_path, iteration, samples=samples, temperature=temperature,
                         max_new_tokens=max_new_tokens, score_ref=score_ref, out_dir=out_dir, checkpoint=checkpoint)

    def generate(self, rows: pa.Table, phase: GenPhase, first: tuple[int, ...] = ()) -> ray.data.Dataset:
        """Lazy generation of `rows`, in batches of generation.batch_size after the sizes in `first`."""
        r, g = self.cfg.resources, self.cfg.generation
        if g.persistent:
            if self.generators is None:  # a programming error: Driver.start_workers makes them
                raise RuntimeError("long-lived generators are made by Driver.start_workers")
            if g.colocate:  # the engines wake on this phase's first batch, into what the trainers gave back
                self.trainer_group().release_memory()
            return self.generators.dataset(rows, phase, g.batch_size, g.max_attempts, first)
        return generation_dataset(rows, phase, batch_size=g.batch_size, min_actors=r.generators_min,
                                  max_actors=r.generators_max, num_cpus=r.generator_cpus, num_gpus=r.generator_gpus,
                                  resources=r.generator_resources, max_attempts=g.max_attempts, first=first)

    def start_workers(self, latest: int | None = None, trainers: bool = True) -> None:
        """Make the workers this driver holds, here and nowhere else: long-lived generators first (their start
        overlaps the trainers'), then the trainers (`tspin-ray generate`: none unless generators colocate)."""
        self.start_generators(latest)
        if trainers or self.cfg.generation.colocate:
            self.start_trainers()

    def start_trainers(self) -> None:
        """The trainer group, and colocated generators in its bundles (engine i beside trainer rank i)."""
        self.trainers = TrainerGroup(self.cfg)
        if self.cfg.generation.persistent and self.cfg.generation.colocate:
            self.generators = GeneratorPool(self.cfg, share_pg=self.trainers.pg)

    def start_generators(self, latest: int | None) -> None:
        """Long-lived generators start with the run, beside the trainers: their process start, imports and
        (a fresh run from model.path) engine load overlap the trainers' start instead of following it. A
        resumed run may re-export its latest iterate (first_iteration), so they only import then."""
        c = self.cfg
        if not c.generation.persistent or c.generation.colocate or self.generators is not None:
            return  # colocated engines wait for the trainers' bundles
        self.generators = GeneratorPool(c)
        path = None if latest or c.needs_sft_stage else Path(c.model.path).resolve()
        self.generators.warm(path and self.phase(path, 0, samples=1, temperature=0.0, max_new_tokens=1))

    def missing(self, rows: pa.Table, phase: GenPhase, name: str) -> pa.Table:
        """The rows of `rows` with no usable shard in phase.out_dir. Shards that other weights made (a
        fallback to an older checkpoint, allow_config_change) or another engine scored are moved to
        stale/ first, and the manifest says why under stale_<name>."""
        out, scorer = Path(phase.out_dir), phase.engine.scorer if phase.score_ref else ""

        def usable(origin: tuple[str, str]) -> bool:  # ("", ""): a shard from before rows recorded it
            return origin == ("", "") or (origin[0] == phase.checkpoint and (not phase.score_ref or origin[1] == scorer))

        stale = set_aside(out, usable)
        if stale:
            seen = sorted({o for origins in stale.values() for o in origins})
            reason = (f"{len(stale)} shards made by checkpoint/scorer {seen[0][0][:12]}/{seen[0][1] or '-'}, "
                      f"not {phase.checkpoint[:12]}/{scorer or '-'}: regenerated")
            self.run.commit(f"stale_{name}", files=sorted(f.name for f in stale), reason=reason)
            self.progress.say(f"warning: {name}: {reason}")
        have = done_keys(read_shards(out))  # read once, not once per row
        keep = [k not in have for k in row_keys(rows)]
        return rows.filter(pa.array(keep, pa.bool_()))

    def persisted_generation(self, todo: pa.Table, phase: GenPhase, what: str) -> None:
        """Generate `todo` into phase.out_dir (one shard per batch) and wait for it."""
        if not todo.num_rows:
            return
        with self.progress.phase(what, total=todo.num_rows) as bar:
            def on_batch(batch):
                bar.update(len(batch["prompt_id"]))
                bar.pool(pool_size())
                maybe_fail(what.split()[0])

            consume(self.generate(todo, phase).iter_batches(batch_size=None, batch_format="numpy"),
                    on_batch, self.cfg.generation.timeout_s, what)
        self.rest_generators()

    def complete_shards(self, rows: pa.Table, phase: GenPhase, what: str) -> pa.Table:
        """All shards of phase.out_dir, checked to hold every row of `rows` once with its k samples."""
        table = read_shards(Path(phase.out_dir))
        check_complete(table, row_keys(rows), phase.samples, what)
        return table

    # ------------------------------------------------------------ stages
    def initial_policy(self) -> Path:
        """pi_0: the given checkpoint, or a tiny model trained by SFT on the configured fraction."""
        c, run = self.cfg, self.run
        if run.done("pi_0") and (run.entry("pi_0").get("external") or run.latest_good_checkpoint(0) == 0):
            return run.root / run.entry("pi_0")["path"]
        if not c.needs_sft_stage:  # absolute: actors resolve relative paths against their own cwd
            path = Path(c.model.path).resolve()
            run.commit("pi_0", path=str(path), files={}, external=True, identity=listing_identity(path))
            return Path(c.model.path).resolve()
        base = Path(c.model.path).resolve() if c.model.path else run.root / "checkpoints" / "base"
        if c.model.tiny is not None and not (base / "config.json").exists():
            with atomic_dir(base) as tmp:
                save_tiny(tmp, c.model.tiny)
        rows = self.sft_rows(self.prep.train)
        t0 = time.time()
        group = self.trainer_group(base, all_weights=True)  # pi_0's SFT trains all weights, with LoRA too
        epochs = c.sft.epochs
        steps = steps_per_epoch(len(rows), c.resources.trainers, c.sft.global_batch_size) * epochs
        order = []
        for epoch in range(epochs):  # all epochs in one stream: one Ray Data execution, not one per epoch
            order.extend(shuffled(rows, derive_seed(c.seed, "sft", epoch)))
        group.begin(sft_setup(c, steps))
        with self.progress.phase("sft", total=steps) as bar:
            records = group.train_stream(ray.data.from_items(order), on_step=bar.set, what="SFT of pi_0")
        maybe_fail("sft")
        self.log([{"phase": "sft", **r.row()} for r in records[:: max(1, len(records) // 50)]])
        self.export(0, t0)
        return run.checkpoint(0)

    def sft_rows(self, examples) -> list[dict]:
        fmt, c = self.prep.format, self.cfg
        out = []
        for e in examples:
            p, y = fmt.example_ids(e.prompt, e.response, e.system, c.data.max_response_tokens, c.training.max_length,
                                  e.history)
            out.append({"prompt_ids": p, "real_ids": y})
        return out

    def trainer_group(self, path: Path | None = None, all_weights: bool = False) -> TrainerGroup:
        """The trainers (Driver.start_workers made them), holding `path` (with the run's training.lora
        adapter unless all_weights)."""
        if self.trainers is None:
            raise RuntimeError("the trainer group is made by Driver.start_workers, not started here")
        if path is not None:
            self.trainers.load(path, None if all_weights else self.cfg.training.lora)
        return self.trainers

    def proto_cache(self, pi0: Path) -> dict[str, list]:
        """y0 from a proto phase of its own: sampled once from pi_0 before iteration 0 (tspin_ray/controller/y0.py)."""
        g = self.cfg.generation
        phase = self.phase(pi0, "proto", samples=self.cfg.samples_per_prompt, temperature=g.temperature,
                           max_new_tokens=g.max_new_tokens, out_dir=self.run.proto, checkpoint=self.run.checkpoint_id(0))
        rows = prompt_rows(self.prep.train, -1)
        self.persisted_generation(self.missing(rows, phase, "proto"), phase, "proto")
        table = self.complete_shards(rows, phase, "proto")
        self.run.commit("proto", rows=table.num_rows, checkpoint=phase.checkpoint)
        return dict(zip(table.column("prompt_id").to_pylist(), table.column("generated_ids").to_pylist(),
                        strict=True))

    def evaluate(self, path: Path, label: str) -> dict:
        """Greedy exact match and held-out NLL of the real responses, for the policy at `path`."""

        ev = self.prep.eval[: self.cfg.eval.size] if self.cfg.eval.size else self.prep.eval
        if not ev:
            return {}
        t0 = time.time()
        phase = self.phase(path, "eval", samples=1, temperature=0.0, max_new_tokens=self.cfg.eval.max_new_tokens)
        got, ended = {}, {}
        with self.progress.phase(f"eval {label}", total=len(ev)) as bar:
            def on_batch(b):
                for pid, gens, ids in zip(b["prompt_id"], b["generated"], b["generated_ids"], strict=True):
                    got[str(pid)], ended[str(pid)] = str(gens[0]), self.prep.format.ends(ids[0])
                bar.update(len(b["prompt_id"]))

            consume(self.generate(prompt_rows(ev, 0), phase).iter_batches(batch_size=None, batch_format="numpy"),
                    on_batch, self.cfg.generation.timeout_s, f"evaluation of {label}")
        self.rest_generators()
        acc = float(np.mean([exact_match(got[e.prompt_id], e.response) for e in ev]))
        rows, train = self.sft_rows(ev), self.sft_rows(self.prep.train[: len(ev)])  # y's likelihood on both
        group = self.trainer_group(path)
        nll, tokens = group.nll([r["prompt_ids"] for r in rows], [r["real_ids"] for r in rows])
        train_nll, _ = group.nll([r["prompt_ids"] for r in train], [r["real_ids"] for r in train])
        out = {"eval/exact_match": acc, "eval/nll": nll / max(tokens, 1), "timing/eval": time.time() - t0,
               **evaluation_figures(got, ended, nll, len(rows), train_nll, len(train))}
        if self.run is not None:
            self.run.write_answers(label, [{"prompt_id": e.prompt_id, "prompt": e.prompt, "answer": e.response,
                                            "greedy": got[e.prompt_id]} for e in ev])
        if self.cfg.eval.lm_eval is not None:  # benchmark scores with lm-evaluation-harness
            with contextlib.ExitStack() as stack:  # without a run, the exported held-out task lives in a temp dir
                root = self.run.root if self.run else stack.enter_context(tempfile.TemporaryDirectory())
                out.update(checkpoint_scores(self.cfg, root, ev, path, label, self.progress.say))
        return out

    # ------------------------------------------------------------ one iteration, step by step
    def iteration(self, t: int, pi_t: Path, proto: dict | None) -> tuple[dict, list[dict]]:
        """pi_t generates y', the trainers learn from the triplets, pi_{t+1} is exported and synced.
        Returns the iteration's summary and its per-step records (logged when the iteration commits)."""
        plan = self.plan(t, pi_t, proto)
        self.begin_training(plan, pi_t)
        t0 = time.time()
        stream = self.generations_for(plan)
        records = self.train_epochs(plan, stream)
        t_train = time.time() - t0
        table = self.commit_generations(plan)
        export_s = self.export(t + 1, t0)
        sync = self.sync_weights(self.run.checkpoint(t + 1))
        checked = self.check_sync(self.run.checkpoint(t + 1))
        summary = iteration_summary(t0=t0, t_train=t_train, records=records, table=table,
                                    generated_all=plan.generates_all, rows=plan.rows.num_rows, export_s=export_s,
                                    sync=sync)
        return {**summary.row(), **sample_figures(table), **checked}, records

    def plan(self, t: int, pi_t: Path, proto: dict | None) -> Plan:
        """The rows of iteration t, how pi_t generates for them, and which of them are still to generate."""
        c = self.cfg
        obj = c.objective.for_iteration(t, c.iterations)
        rows = self.iteration_rows(t, obj, proto)
        steps = steps_per_epoch(rows.num_rows, c.resources.trainers, c.training.global_batch_size)
        if steps == 0:
            raise UserError(f"{rows.num_rows} training rows make no full global batch of {c.training.global_batch_size}")
        if not obj.entry.opponent:  # continued SFT (the control): nothing to generate
            return Plan(t, obj, rows, None, None, False, steps)
        phase = self.phase(pi_t, t, samples=c.samples_per_prompt, temperature=c.generation.temperature,
                           max_new_tokens=c.generation.max_new_tokens, score_ref=obj.entry.reference(obj.loss_params),
                           out_dir=self.run.generations(t), checkpoint=self.run.checkpoint_id(t))
        todo = self.missing(rows, phase, f"gen_{t}")
        stream = c.generation.stream and todo.num_rows == rows.num_rows and not c.generation.colocate
        return Plan(t, obj, rows, phase, todo, stream, steps)

    def iteration_rows(self, t: int, obj: ObjectiveConfig, proto: dict | None) -> pa.Table:
        rows = prompt_rows(self.prep.train, t, proto)
        if not (obj.mixes_previous and t > 0):
            return rows
        # SPIN: the previous iteration's own pairs join, their y' re-scored under pi_t (not re-sampled).
        prev = read_shards(self.run.generations(t - 1))
        prev = prev.filter(pc.equal(prev.column("source_iteration"), t - 1))
        ids = prev.column("prompt_id").to_pylist()
        given = dict(zip(ids, prev.column("generated_ids").to_pylist(), strict=True))
        return pa.concat_tables([rows, prompt_rows([self.prep.train[self._index[i]] for i in ids], t - 1,
                                                   given=given)])

    def begin_training(self, plan: Plan, pi_t: Path) -> None:
        """Trainers on pi_t with a fresh optimizer and schedule (the papers restart them every iteration)."""
        self.trainer_group(pi_t).begin(optimizer_setup(self.cfg, plan.t, plan.steps_per_epoch))

    def generations_for(self, plan: Plan) -> ray.data.Dataset | None:
        """The lazy stream epoch 0 trains on while it is generated; otherwise (resumed mid-generation, or
        colocated engines that must sleep before training) finish the shards first and return None."""
        if plan.phase is None or not plan.todo.num_rows:
            return None
        if plan.stream:  # small first batches: the first step need not wait for full-size ones
            c = self.cfg
            return self.generate(plan.todo, plan.phase,
                                 ramp(c.training.global_batch_size, c.resources.trainers, c.generation.batch_size))
        label = f"generate {plan.t}" if plan.generates_all else f"generate {plan.t} (resume)"
        self.persisted_generation(plan.todo, plan.phase, label)
        return None

    def epoch_data(self, plan: Plan, epoch: int) -> ray.data.Dataset:
        """Epoch `epoch`'s rows from disk: the input order in epoch 0 (as streamed), then shuffled."""
        seed = derive_seed(self.cfg.seed, "train", plan.t, epoch)
        if plan.phase is None:
            return ray.data.from_items(shuffled(self.sft_rows(self.prep.train), seed))
        table = in_row_order(self.complete_shards(plan.rows, plan.phase, f"iteration {plan.t}"), plan.rows)
        return block_dataset([table if epoch == 0 else shuffled(table, seed)])

    def train_epochs(self, plan: Plan, stream: ray.data.Dataset | None) -> list[StepRecord]:
        epochs = self.cfg.training.epochs
        records: list[StepRecord] = []
        with self.progress.phase(f"iter {plan.t} train", total=plan.steps_per_epoch * epochs) as bar:
            for epoch in range(epochs):
                ds = stream if epoch == 0 and stream is not None else self.epoch_data(plan, epoch)
                recs = self.trainers.train_stream(ds, on_step=lambda step: (bar.set(step), bar.pool(pool_size())),
                                                  what=f"iteration {plan.t} epoch {epoch}")
                records += [r.in_epoch(epoch) for r in recs]
        return records

    def commit_generations(self, plan: Plan) -> pa.Table | None:
        if plan.phase is None:
            return None
        maybe_fail("generate")
        table = self.complete_shards(plan.rows, plan.phase, f"iteration {plan.t}")
        self.run.commit(f"gen_{plan.t}", rows=table.num_rows, checkpoint=plan.phase.checkpoint)
        return table

    def export(self, t: int, t0: float) -> float:
        """pi_t written from the trainers and committed; returns the export's seconds."""
        run = self.run
        lora = self.cfg.training.lora
        with atomic_dir(run.checkpoint(t)) as tmp:
            written = self.trainers.export(tmp, merged=tmp / MERGED if t > 0 and lora and lora.merge_export else None)
            if t > 0:  # the chaos point is an iteration's export (pi_0's SFT has its own, "sft")
                maybe_fail("export")
        run.commit_checkpoint(t, files=dict(written.files), seconds=time.time() - t0)
        self.trainers.mark_loaded(run.checkpoint(t))
        return written.seconds

    def rest_generators(self) -> None:
        """Colocated mode: long-lived engines sleep once a generation phase is consumed (the next batch
        wakes them), so the trainers get the GPU memory back."""
        if self.generators is not None and self.cfg.generation.colocate:
            self.generators.sleep()

    def sync_weights(self, path: Path) -> SyncResult:
        """Broadcast pi_{t+1} into the long-lived generators (generation.weight_sync: broadcast); any
        other case, or a failed broadcast, leaves them to reload the committed checkpoint lazily."""
        if self.generators is None or self.cfg.generation.weight_sync != "broadcast":
            return SyncResult()
        sync = self.generators.sync(self.trainers, path)
        if not sync.ok:
            self.progress.say(f"warning: weight broadcast failed ({sync.error}); generators will reload "
                              f"{path} instead")
        return sync

    def check_sync(self, path: Path) -> dict:
        """Long-lived generators hold what the trainers hold (controller/sync_check.py)."""
        if self.generators is None:
            return {}
        probe = self.sft_rows(self.prep.eval[:PROBE_ROWS] or self.prep.train[:PROBE_ROWS])
        return verify(self.trainers, self.generators, probe, path, self.cfg, self.progress.say)

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
                if self.trainers is None:  # torn down by the attempt before
                    self.start_trainers()
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

    def first_iteration(self) -> int:
        """Where the loop resumes: after the last iteration whose checkpoint verifies and is committed."""
        run, n = self.run, self.cfg.iterations
        start = run.latest_good_checkpoint(n) or 0
        while start > 0 and not run.done(f"iter_{start - 1}"):
            # pi_start exists but its iteration was never committed (stopped during its evaluation):
            # redo that iteration from its shards on disk so its metrics are logged exactly once.
            start = run.latest_good_checkpoint(start - 1) or 0
        return start

    def run_all(self) -> dict:
        c, run = self.cfg, self.run
        latest = run.latest_good_checkpoint(c.iterations)  # verifies checksums; drops corrupt iterates
        done = run.entry("complete")
        if done and (latest == c.iterations or (done.get("stopped") and c.eval.stop_on_collapse)):
            self.progress.say(f"run {run.root} is already complete ({done['iterations']} iterations); nothing to do")
            return done
        if done:  # it stopped at a collapse and this config does not stop: go on from its last iterate
            run.uncommit("complete")
        run.prune_metrics(self.committed)
        self.start_workers(latest)
        pi0 = self.with_trainer_retries("SFT of pi_0", self.initial_policy)
        if not run.done("eval_0"):
            ev = self.with_trainer_retries("evaluation of pi_0", lambda: self.evaluate(pi0, "pi_0"))
            ev.update(self.check_health(0, ev).figures())
            self.log([{"phase": "iteration", "iteration": -1, **ev}])
            run.commit("eval_0", **ev)
        source = y0_source(c, run.proto)
        y0 = self.proto_cache(pi0) if source == SEPARATE else None
        for t in range(self.first_iteration(), c.iterations):
            t0 = time.time()
            if y0 is None and source == ITERATION_0 and t > 0:  # iteration 0's y' serve as y0
                table = read_shards(run.generations(0))
                check_complete(table, row_keys(prompt_rows(self.prep.train, 0)), c.samples_per_prompt, "y0")
                y0 = y0_of_iteration_0(table)

            def one_iteration(t=t, y0=y0):
                pi_t = pi0 if t == 0 else run.checkpoint(t)  # pi_0 may be an external model.path
                summary, records = self.iteration(t, pi_t, y0)
                summary.update(self.evaluate(run.checkpoint(t + 1), f"pi_{t + 1}"))
                return summary, records

            summary, records = self.with_trainer_retries(f"iteration {t}", one_iteration)
            summary["timing/iteration"] = time.time() - t0
            health = self.check_health(t + 1, summary)
            summary.update(health.figures())
            # Step rows and the summary together, right before the commit: a retried iteration logs once.
            self.log([{"phase": "train", "iteration": t, **r.row()} for r in records]
                     + [{"phase": "iteration", "iteration": t, **summary}])
            run.commit(f"iter_{t}", **summary)
            run.mark_best(int(health.best.split("_")[1]), metric=health.key, value=health.best_value)
            maybe_fail("between")
            if health.collapsed and c.eval.stop_on_collapse:
                final = {"iterations": t + 1, "checkpoint": str(run.checkpoint(t + 1)), "best": health.best,
                         "stopped": health.reasons[0]}
                run.commit("complete", **final)
                return final
        final = {"iterations": c.iterations, "checkpoint": str(run.checkpoint(c.iterations)),
                 "best": run.entry("best")["iterate"]}
        run.commit("complete", **final)
        return final

    def check_health(self, k: int, row: dict) -> Verdict:
        """The health verdict on pi_k; warns when it looks collapsed (controller/health.py)."""
        return check_iterate(self.run, self.cfg.eval, k, row, self.progress.say)

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
