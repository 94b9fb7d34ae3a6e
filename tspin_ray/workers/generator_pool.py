"""Long-lived generator actors (`generation.persistent: true`): one engine each, for the whole run.

    .venv/bin/pytest tests/unit/workers/test_weight_sync.py

The default generation stage (workers/generation_stage.py) is a Ray Data actor pool that starts fresh for every phase
and loads the committed checkpoint: elastic, but it pays an actor start and an engine load per phase and
leaves no engine to sync weights into. Here the driver owns `generators_max` actors in a placement group
of their own (each bundle holds one engine's tensor-parallel GPUs, so they share a node), Ray Data streams
batches to them through light forwarding tasks that each take the next idle actor (work is pulled, so a
slow engine does fewer batches), and new weights arrive in place: broadcast from trainer rank 0
(`generation.weight_sync: broadcast`, workers/weight_broadcast.py) or reloaded from the committed checkpoint.

Never stale: every batch names the checkpoint it must be generated with; an actor whose weights are not
that checkpoint's (a restarted actor, or one that missed or failed a broadcast) reloads it first.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass

import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.queue import Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tspin_ray.errors import RunFailed
from tspin_ray.rollout.phases import GenPhase, blocks
from tspin_ray.rollout.shards import block_dataset
from tspin_ray.workers.generation_stage import GenerateStage
from tspin_ray.workers.records import SyncResult
from tspin_ray.workers.weight_broadcast import plan_buckets


@dataclass(frozen=True)
class SyncPeers:
    """The processes a sync group joins (trainer rank 0's and each generator's receiving ranks) and where
    they meet; the group is reused while they stay the same."""
    members: tuple
    key: str
    host: str
    port: int

class Generator:
    """One engine and the weights it holds (`loaded`: the checkpoint they equal)."""

    def __init__(self):
        self.stage: GenerateStage | None = None
        self.loaded: str | None = None
        self.asleep = False
        self._setup = threading.Lock()  # batches that run at once (a vLLM engine's slots) load it once

    def warm(self, phase: GenPhase | None, backend: str) -> None:
        """Get ready before the first batch: load `phase`'s engine, or (no checkpoint to load yet) import
        the engine's libraries. Never raises: a failed load fails again, with its message, at the first
        batch (and an unread error would print Ray's "unhandled error")."""
        try:
            if phase is not None:
                self._prepare(phase)
            else:
                import importlib

                importlib.import_module("vllm" if backend == "vllm" else "transformers")
        except Exception:
            pass

    def run(self, batch: dict, phase: GenPhase) -> dict:
        self._prepare(phase)
        return self.stage(batch)

    def _prepare(self, phase: GenPhase) -> None:
        """The engine holds `phase`'s weights and settings: built on first use, else woken and reloaded."""
        with self._setup:
            if self.stage is None:
                self.stage = GenerateStage(phase)
            else:
                seconds = self._hold(phase.model_path)
                if seconds is not None:
                    self.stage.load_seconds = seconds
                elif self.stage.phase != phase:  # a new phase on the same weights: it loaded nothing
                    self.stage.load_seconds = 0.0
                self.stage.set_phase(phase)
            self.loaded = phase.model_path

    def _hold(self, path: str) -> float | None:
        """Awake with `path`'s weights: the seconds it took to load them, None when it held them already."""
        new = path != self.loaded  # also after a sleep that discarded the weights
        t0 = time.time()
        self.wake(path if new else None)
        if new and self.loaded != path:  # it was awake: load now
            self.loaded = None  # a reload that fails part-way leaves weights that are nobody's
            self.stage.engine.reload(path)
        self.loaded = path
        return time.time() - t0 if new else None

    def probe(self, path: str, prompts: list, responses: list) -> list[float] | None:
        """Summed log-probs of `responses` under the weights this engine holds for `path` (loaded now when
        it does not hold them yet: a checkpoint sync); None before its engine exists. The driver compares
        them with the trainers' (controller/sync_check.py)."""
        with self._setup:
            if self.stage is None:
                return None
            self._hold(path)
            return self.stage.engine.score(prompts, responses)

    def forget(self) -> None:
        """Whatever this engine holds is suspect: load the checkpoint again at the next batch or probe."""
        self.loaded = None

    def sleep(self) -> bool:
        """Colocated mode: give the accelerator memory back to the trainers until the next batch."""
        if self.stage is not None and not self.asleep:
            if self.stage.engine.sleep():
                self.loaded = None  # weights discarded: whatever comes next is loaded on waking
            self.asleep = True
        return self.asleep

    def wake(self, reload: str | None = None) -> None:
        """Awake, with `reload`'s weights loaded while waking if given (then `loaded` is it)."""
        if self.asleep:
            self.stage.engine.wake(reload)
            self.asleep = False
            if reload is not None:
                self.loaded = reload

    def sync_member(self) -> tuple[int, str]:
        """Ranks this actor takes in a weight broadcast (0 before its engine exists: it loads lazily), and
        which process it is (a restarted actor is a new member: its sync group died with the old one)."""
        return (0 if self.stage is None else self.stage.engine.sync_ranks), f"{os.getpid()}:{id(self.stage)}"

    def receive_weights(self, key: str, host: str, port: int, rank: int, world_size: int, buckets: list,
                        timeout_s: float, path: str) -> float:
        t0 = time.time()
        if self.stage is None:  # restarted since the pool asked: nothing to receive into
            raise RuntimeError("this generator restarted and has no engine yet")
        self.wake()
        self.loaded = None  # half-received weights are nobody's: reload if this fails part-way
        self.stage.engine.receive_weights(key, host, port, rank, world_size, buckets, timeout_s)
        self.loaded = path
        return time.time() - t0

    def close_sync(self, failed: bool = False) -> None:
        if self.stage is not None:
            self.stage.engine.close_sync(failed)

    def weights(self) -> dict:
        """The engine's parameters by name, on CPU (tests compare them with the trainer's)."""
        model = getattr(self.stage.engine, "model", None)
        if model is None:
            raise TypeError("weights() reads HF engines only: a vLLM engine keeps its weights in its workers")
        return {k: v.detach().cpu() for k, v in model.named_parameters()}


GeneratorActor = ray.remote(Generator)


def _forward(batch: dict, *, actors: list, idle, phase: GenPhase, timeout_s: float) -> dict:
    """A Ray Data task: hand one batch to the first generator that is idle. Engines pull work: a slow one
    takes fewer batches instead of holding the phase until its round-robin share is done."""
    i = idle.get(timeout=timeout_s)  # an index of `actors`; back in the queue once its batch returns or fails
    try:
        return ray.get(actors[i].run.remote(batch, phase), timeout=timeout_s)
    finally:
        idle.put(i)


class GeneratorPool:
    """`generators_max` long-lived Generator actors: in a placement group of their own, or (colocated)
    actor i in bundle i of the trainers' group, so it shares trainer rank i's node and GPU."""

    def __init__(self, cfg, timeout_s: float = 600.0, share_pg=None, slots: int | None = None):
        r, g = cfg.resources, cfg.generation
        self.cfg, self.n, self.timeout_s = cfg, r.generators_max, timeout_s
        # Batches one actor runs at once (generation.engine_batches): a vLLM engine steps their requests
        # together, so the next fills the tail of the one before (engines.VLLMEngine._run).
        self.slots = slots or g.engine_batches
        self.own_pg = share_pg is None
        self.pg = share_pg
        self._sync = None  # (members, key, host, port) of the sync group the generators and trainers keep
        if self.own_pg:
            bundle = {"CPU": r.generator_cpus, **({"GPU": r.generator_gpus} if r.generator_gpus else {}),
                      **r.generator_resources}
            self.pg = placement_group([bundle] * self.n, strategy="PACK")
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
            if not ready:
                remove_placement_group(self.pg)
                raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {self.n} generator bundles "
                                   f"of {bundle}")
        # A restarted actor comes back empty (stage None) and loads the checkpoint its next batch names.
        self.actors = [
            GeneratorActor.options(
                num_cpus=r.generator_cpus, num_gpus=r.generator_gpus, resources=r.generator_resources or None,
                max_restarts=g.max_attempts, max_task_retries=g.max_attempts, max_concurrency=self.slots,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(self.n)
        ]
        self.idle = Queue(actor_options={"num_cpus": 0})  # indices of the actors with no batch running

    def warm(self, phase: GenPhase | None) -> None:
        """Every actor starts loading `phase`'s engine (or importing its libraries) now, without waiting:
        the driver goes on starting the trainers meanwhile. A failed load fails again, with its message,
        at the actor's first batch."""
        backend = phase.engine.backend if phase is not None else self.cfg.generation.backend
        for a in self.actors:
            a.warm.remote(phase, backend)

    def dataset(self, rows: pa.Table, phase: GenPhase, batch_size: int, max_attempts: int,
                first: tuple[int, ...] = ()) -> ray.data.Dataset:
        """Lazy triplet rows: each batch goes to whichever actor is idle first, through light tasks that
        hold no engine (`first`: the sizes of the first batches, phases.ramp)."""
        parts = blocks(rows, batch_size, first)
        # Every actor idle again: a forwarding task killed with its worker (or its stream) never put its
        # index back, and a leaked index would leave that actor out for good. An index put back late by
        # such a task only queues one batch behind another on its actor.
        while not self.idle.empty():
            self.idle.get_nowait()
        for i in list(range(self.n)) * self.slots:
            self.idle.put(i)
        ds = block_dataset(parts)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            return ds.map_batches(
                _forward, batch_size=None, batch_format="numpy", num_cpus=0.01,  # a block each
                fn_kwargs={"actors": self.actors, "idle": self.idle, "phase": phase,
                           "timeout_s": self.cfg.generation.timeout_s},
                # each actor's slots busy and one batch waiting: an engine that finishes one finds the next
                compute=ray.data.TaskPoolStrategy(size=min(len(parts), (self.slots + 1) * self.n)),
                max_retries=max_attempts)

    def sync(self, trainers, path) -> SyncResult:
        """Broadcast the trainers' weights (= the checkpoint at `path`) to every generator with an engine.

        The sync group is made once per generator set (the trainer rank 0 and receiving processes of
        `members`) and reused while the set stays; a failed sync closes it on every live side and the
        next one makes a new group. On failure the generators keep `loaded` unset and reload `path` at
        their next batch; the result says why."""
        t0 = time.time()
        members = ray.get([a.sync_member.remote() for a in self.actors], timeout=self.timeout_s)
        ranks = [k for k, _ in members]
        if not any(ranks):
            return SyncResult()
        sender = ray.get(trainers.actors[0].__ray_call__.remote(lambda t: f"{os.getpid()}:{id(t)}"),
                         timeout=self.timeout_s)
        if self._sync is None or self._sync.members != (sender, members):
            host, port = ray.get(trainers.actors[0].address.remote(), timeout=self.timeout_s)
            # A new key every time: a rebuilt trainer group may get the same host and port again.
            self._sync = SyncPeers((sender, members), f"{host}:{port}:{uuid.uuid4().hex[:8]}", host, port)
        key, host, port = self._sync.key, self._sync.host, self._sync.port
        world = 1 + sum(ranks)
        bucket_bytes = int(self.cfg.generation.sync_bucket_mb * 2**20)
        specs = ray.get(trainers.actors[0].weight_specs.remote(), timeout=self.timeout_s)
        buckets = plan_buckets(specs, bucket_bytes)
        timeout = self.cfg.generation.timeout_s
        send = [t.send_weights.remote(key, host, port, world, bucket_bytes, timeout) for t in trainers.actors]
        recv, offset = [], 1
        for actor, k in zip(self.actors, ranks, strict=True):
            if k:
                recv.append(actor.receive_weights.remote(key, host, port, offset, world, buckets, timeout, str(path)))
                offset += k
        # Every trainer rank returns (a failed send still gathers every bucket), then every receiver.
        try:  # the trainers time out on their own after `timeout` and report it: wait past that
            sent = ray.get(send, timeout=2 * timeout + 60)[0]
        except ray.exceptions.GetTimeoutError:
            raise RunFailed(f"weight broadcast: the trainers did not return within {2 * timeout + 60:.0f}s "
                            f"(2 x generation.timeout_s + 60)") from None
        errors = [sent.error] if sent.error else []
        for ref in recv:
            try:
                ray.get(ref, timeout=2 * timeout + 60)
            except (ray.exceptions.RayError, TimeoutError) as e:
                errors.append(" ".join(str(e).split())[:200])
        if errors:  # tear down: live receivers leave the group (the sender already has); a new one next time
            self._sync = None
            self.close_sync(failed=True)
            return SyncResult(seconds=time.time() - t0, error=errors[0])
        return SyncResult(seconds=time.time() - t0, bytes=sent.bytes, receivers=sum(ranks))

    def on_each(self, method: str, *args, timeout: float, tolerate=ray.exceptions.RayActorError) -> list:
        """`method` on every generator at once; None from one that failed with `tolerate` (a dead actor:
        Ray restarts it, and it loads the committed checkpoint at its first batch)."""
        out = []
        for ref in [getattr(a, method).remote(*args) for a in self.actors]:
            try:
                out.append(ray.get(ref, timeout=timeout))
            except tolerate:
                out.append(None)
        return out

    def probe(self, path, prompts: list, responses: list) -> list[list[float]]:
        """Each generator's scores of the probe rows under `path`'s weights (those with an engine)."""
        got = self.on_each("probe", str(path), prompts, responses, timeout=self.cfg.generation.timeout_s)
        return [g for g in got if g is not None]

    def forget(self) -> None:
        """Every live generator loads the checkpoint again before its next batch or probe."""
        self.on_each("forget", timeout=self.timeout_s)

    def close_sync(self, failed: bool = False) -> None:
        """Every live generator leaves its sync group (dead ones took theirs with them); after a failed
        sync it aborts it. An actor busy with a hung call gets killed or restarted anyway: not waited out."""
        self.on_each("close_sync", failed, timeout=30, tolerate=ray.exceptions.RayError)

    def sleep(self) -> int:
        """Every engine to sleep (colocated mode, before the trainers need the GPUs); returns how many."""
        return sum(ray.get([a.sleep.remote() for a in self.actors], timeout=self.timeout_s))

    def shutdown(self) -> None:
        if self._sync is not None:
            self.close_sync()
        for a in self.actors:
            ray.kill(a)
        self.idle.shutdown()
        if not self.own_pg:
            return  # the trainers' group: theirs to remove
        try:
            remove_placement_group(self.pg)
        except Exception:  # already gone with a dead cluster; nothing left to free
            pass
