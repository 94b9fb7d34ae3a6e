"""Driver-side handle on the trainer actors: Ray start/connect, placement, lock-step calls, timeouts.

    .venv/bin/pytest tests/unit/workers/test_trainer.py

Trainers get their own placement group (PACK: ranks on as few nodes as possible); the generators are
a separate Ray Data actor pool, so the two roles never share a bundle. Every wait has a timeout whose
message says what was being waited for.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tspin_ray.config.schema import RunConfig
from tspin_ray.errors import RunFailed, UserError
from tspin_ray.faults import maybe_fail
from tspin_ray.workers.devices import trainer_env
from tspin_ray.workers.records import ExportResult, OptimizerSetup, StepRecord
from tspin_ray.workers.trainer_rank import TrainerActor

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def ensure_ray(cfg: RunConfig) -> None:
    """Connect to RAY_ADDRESS when set; otherwise start an embedded local Ray. Then check resources."""
    import logging

    import ray.data
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars between our own progress lines
    # tspin-ray reports failures itself in one line (RunFailed); Ray Data would also log each one with a
    # full traceback. Ray's own logs under /tmp/ray/session_latest keep every detail.
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    local = not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if local:
            ncpu = cfg.resources.local_num_cpus or max(8, os.cpu_count() or 1)
            # More logical CPUs than cores: generators and trainers take turns on a small machine.
            ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": WORKER_ENV})
        else:
            # A job's own runtime_env may set some of these already; Ray refuses to merge a conflict.
            job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
            env = {k: v for k, v in WORKER_ENV.items() if k not in (job.get("env_vars") or {})}
            ray.init(runtime_env={"env_vars": env}, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same rows in the same order on a rerun
    ctx.enable_progress_bars = False  # tspin-ray shows its own progress
    ctx.print_on_execution_start = False
    check_resources(cfg, local)


def check_resources(cfg: RunConfig, strict: bool) -> None:
    """Fail fast when the trainers plus the smallest generator pool cannot fit in the cluster (a
    persistent pool is always generators_max actors)."""
    r = cfg.resources
    gens = r.generators_max if cfg.generation.persistent else r.generators_min
    need: dict[str, float] = {"CPU": r.trainers * r.trainer_cpus + gens * r.generator_cpus,
                              "GPU": r.trainers * r.trainer_gpus + gens * r.generator_gpus}
    for res, mult in ((r.trainer_resources, r.trainers), (r.generator_resources, gens)):
        for k, v in res.items():
            need[k] = need.get(k, 0.0) + v * mult
    have = ray.cluster_resources()
    short = [f"{k} {v:g} > {have.get(k, 0):g}" for k, v in need.items() if v > have.get(k, 0) + 1e-9]
    if short and strict:
        raise UserError(f"resources cannot be satisfied by this Ray cluster: {', '.join(short)} "
                        f"(resources.trainers/generators_min|max and their cpus/gpus)")
    if short:
        print(f"warning: cluster has too few resources now ({', '.join(short)}); waiting for the autoscaler")


def steps_per_epoch(rows: int, trainers: int, global_batch_size: int) -> int:
    """Optimizer steps one epoch over `rows` makes: each rank gets rows // trainers (an equal split) and
    steps once per global_batch_size // trainers of them; a trailing partial global batch is skipped."""
    return (rows // trainers) // (global_batch_size // trainers)


def optimizer_setup(cfg: RunConfig, t: int, steps_per_epoch: int) -> OptimizerSetup:
    """Trainer.begin's set-up for iteration t: its objective, lr and a schedule over all its epochs."""
    obj, tr = cfg.objective.for_iteration(t, cfg.iterations), cfg.training
    return OptimizerSetup(objective=obj.name, params=obj.loss_params, optimizer=tr.optimizer,
                          lr=tr.lr_for_iteration(t, cfg.iterations), weight_decay=tr.weight_decay,
                          schedule=tr.schedule, warmup_ratio=tr.warmup_ratio, total_steps=steps_per_epoch * tr.epochs,
                          micro_batch_size=tr.micro_batch_size, global_batch_size=tr.global_batch_size,
                          grad_clip=tr.grad_clip)


def sft_setup(cfg: RunConfig, total_steps: int) -> OptimizerSetup:
    """Trainer.begin's set-up for the SFT stage that makes pi_0 (sft.* keys; no weight decay)."""
    s = cfg.sft
    return OptimizerSetup(objective="sft", params={}, optimizer=s.optimizer, lr=s.lr, weight_decay=0.0,
                          schedule=s.schedule, warmup_ratio=s.warmup_ratio, total_steps=total_steps,
                          micro_batch_size=s.micro_batch_size, global_batch_size=s.global_batch_size,
                          grad_clip=cfg.training.grad_clip)


def rank_iterators(ds: ray.data.Dataset, n: int) -> list:
    """One DataIterator per trainer rank, each with the same number of rows.

    One rank reads the dataset directly (`iterator()` executes it in the rank): no SplitCoordinator actor,
    which costs a second to the first batch of every epoch and polls at 10% of a core while the rank
    steps (docs/performance.md). Several ranks share it through `streaming_split`, which hands out blocks
    as the ranks ask, so every global batch keeps rows of one stretch of the stream."""
    if n == 1:
        return [ds.iterator()]
    return ds.streaming_split(n, equal=True)


# The trainers' process group outlives every driver-side limit of a phase with a collective in it (a rank
# waits at a barrier while rank 0 alone exports or merges), so a stalled collective fails as the driver's
# one-line training.* error, not by the NCCL watchdog aborting every rank (DeepSpeed's default is 10 min,
# below the default load and export limits).
GROUP_MARGIN_S = 60.0


def group_timeout_s(t) -> float:
    """The process-group timeout for training limits `t` (TrainingConfig)."""
    return max(t.stall_timeout_s, t.load_timeout_s, t.export_timeout_s) + GROUP_MARGIN_S


class TrainerGroup:
    def __init__(self, cfg: RunConfig, timeout_s: float = 600.0):
        r, t = cfg.resources, cfg.training
        self.cfg, self.n, self.timeout_s = cfg, r.trainers, timeout_s
        bundle = {"CPU": r.trainer_cpus, "GPU": r.trainer_gpus, **r.trainer_resources}
        if cfg.generation.colocate:  # bundle i also holds generator i: the same node, the same GPU
            bundle["CPU"] += r.generator_cpus
            bundle["GPU"] += r.generator_gpus
            for k, v in r.generator_resources.items():
                bundle[k] = bundle.get(k, 0) + v
        bundle = {k: v for k, v in bundle.items() if v}
        self.pg = placement_group([bundle] * self.n, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {self.n} trainer bundles of {bundle}")
        env = trainer_env(r.trainer_gpus)  # merged into the job's and ray.init's env_vars, as Ray does
        self.actors = [
            TrainerActor.options(
                num_cpus=r.trainer_cpus, num_gpus=r.trainer_gpus, resources=r.trainer_resources or None,
                runtime_env={"env_vars": env} if env else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, self.n, t.backend, t.zero_stage, t.precision, t.gradient_checkpointing, t.offload)
            for i in range(self.n)
        ]
        addr, port = self.get(self.actors[0].address.remote(), "trainer rank 0 address")
        self.get([a.init_group.remote(addr, port, group_timeout_s(t)) for a in self.actors],
                 "torch.distributed group init")

    def get(self, refs, what: str, timeout: float | None = None, key: str | None = None):
        timeout = self.timeout_s if timeout is None else timeout
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunFailed(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({key})" if key else "")) \
                from None

    def call(self, method: str, *args, what: str | None = None, key: str | None = None, **kwargs) -> list:
        """`method` on every rank at once; waits the limit of training.<key> (or the group's default)."""
        timeout = getattr(self.cfg.training, key) if key else None
        return self.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors], what or method,
                        timeout=timeout, key=key and f"training.{key}")

    def load(self, path, lora=None) -> None:
        """Every rank loads `path`; with `lora` (config.LoraSpec) only an adapter on it trains."""
        self.call("load", str(path), self.cfg.model.trust_remote_code, lora, what=f"trainers loading {path}",
                  key="load_timeout_s")

    def mark_loaded(self, path) -> None:
        """The trainers already hold the weights they just exported to `path`; skip reloading them."""
        self.get([a.__ray_call__.remote(lambda self, p=str(path): setattr(self, "loaded_from", p))
                  for a in self.actors], "mark loaded")

    def release_memory(self) -> None:
        """Colocated mode: every rank returns its cached accelerator memory before the engines wake."""
        self.call("release_memory", what="trainers releasing cached memory", key="stall_timeout_s")

    def begin(self, setup: OptimizerSetup) -> None:
        self.call("begin", setup, what="trainer optimizer setup", key="load_timeout_s")

    def train_stream(self, ds: ray.data.Dataset, on_step: Callable[[int], None] | None = None,
                     what: str = "training") -> list[StepRecord]:
        """Stream `ds` to the ranks (equal shards, lock-step) and return rank 0's per-step records.

        A watchdog, not a deadline: an epoch may take hours, but it fails once no micro-batch has
        arrived and no step has completed for training.stall_timeout_s (a hung collective, a stream
        whose producers stopped)."""
        stall = self.cfg.training.stall_timeout_s
        streams = [a.steps.options(num_returns="streaming").remote(it)
                   for a, it in zip(self.actors, rank_iterators(ds, self.n), strict=True)]
        rank0, records, last_change = streams[0], [], time.time()
        while streams:
            ready, _ = ray.wait(streams, num_returns=1, timeout=1.0)
            for stream in ready:
                try:
                    item = ray.get(next(stream))  # a dead rank raises here at once, not in a collective
                except StopIteration:
                    streams.remove(stream)
                    continue
                last_change = time.time()
                if stream is rank0 and item is not None:
                    records.append(item)
                    if on_step is not None:
                        on_step(item.step)
                    maybe_fail("train")
            if not ready and time.time() - last_change > stall:
                raise RunFailed(f"{what}: no micro-batch arrived and no step completed for {stall:.0f}s "
                                f"(training.stall_timeout_s)")
        return records

    def export(self, out_dir, merged=None) -> ExportResult:
        """Rank 0's result: it wrote the files and checksummed them."""
        return self.call("export", str(out_dir), merged=merged and str(merged), what=f"checkpoint export to {out_dir}",
                         key="export_timeout_s")[0]

    def nll(self, prompts, responses) -> tuple[float, int]:
        return self.call("nll", prompts, responses, what="held-out NLL", key="stall_timeout_s")[0]

    def row_logprobs(self, prompts, responses) -> list[float]:
        return self.call("row_logprobs", prompts, responses, what="probe log-probs", key="stall_timeout_s")[0]

    def shutdown(self) -> None:
        try:  # rank 0 leaves the weight-sync group first (NCCL frees its communicator); dead ranks cannot
            ray.get([a.close_sync.remote() for a in self.actors], timeout=30)
        except ray.exceptions.RayError:
            pass
        for a in self.actors:
            ray.kill(a)
        try:
            remove_placement_group(self.pg)
        except Exception:  # already gone with a dead cluster; nothing left to free
            pass
