"""Long-lived generator actors (`generation.persistent: true`): one engine each, for the whole run.

    .venv/bin/pytest tests/test_weight_sync.py

The default generation stage (pipeline.py) is a Ray Data actor pool that starts fresh for every phase
and loads the committed checkpoint: elastic, but it pays an actor start and an engine load per phase and
leaves no engine to sync weights into. Here the driver owns `generators_max` actors in a placement group
of their own (each bundle holds one engine's tensor-parallel GPUs, so they share a node), Ray Data streams
batches to them through light forwarding tasks, and new weights arrive in place: broadcast from trainer
rank 0 (`generation.weight_sync: broadcast`, weight_sync.py) or reloaded from the committed checkpoint.

Never stale: every batch names the checkpoint it must be generated with; an actor whose weights are not
that checkpoint's (a restarted actor, or one that missed or failed a broadcast) reloads it first.
"""

from __future__ import annotations

import time
import warnings

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tspin_ray.pipeline import GenerateStage


class Generator:
    """One engine and the weights it holds (`loaded`: the checkpoint they equal)."""

    def __init__(self):
        self.stage: GenerateStage | None = None
        self.loaded: str | None = None
        self.asleep = False

    def run(self, batch: dict, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        path, backend, engine_kwargs = kwargs.pop("model_path"), kwargs.pop("backend"), kwargs.pop("engine_kwargs")
        if self.stage is None:
            self.stage = GenerateStage(model_path=path, backend=backend, engine_kwargs=engine_kwargs, **kwargs)
        else:
            self.wake()
            self.stage.load_seconds = 0.0
            if path != self.loaded:
                t0 = time.time()
                self.stage.engine.reload(path)
                self.stage.load_seconds = time.time() - t0
            self.stage.set_phase(**kwargs)
        self.loaded = path
        return self.stage(batch)

    def sleep(self) -> bool:
        """Colocated mode: give the accelerator memory back to the trainers until the next batch."""
        if self.stage is not None and not self.asleep:
            self.stage.engine.sleep()
            self.asleep = True
        return self.asleep

    def wake(self) -> None:
        if self.asleep:
            self.stage.engine.wake()
            self.asleep = False

    def sync_ranks(self) -> int:
        """Ranks this actor takes in a weight broadcast; 0 before its engine exists (it loads lazily)."""
        return 0 if self.stage is None else self.stage.engine.sync_ranks

    def receive_weights(self, host: str, port: int, rank: int, world_size: int, buckets: list,
                        timeout_s: float, path: str) -> float:
        t0 = time.time()
        self.wake()
        self.loaded = None  # half-received weights are nobody's: reload if this fails part-way
        self.stage.engine.receive_weights(host, port, rank, world_size, buckets, timeout_s)
        self.loaded = path
        return time.time() - t0

    def weights(self) -> dict:
        """The engine's parameters by name, on CPU (tests compare them with the trainer's)."""
        model = getattr(self.stage.engine, "model", None)
        if model is None:
            raise TypeError("weights() reads HF engines only: a vLLM engine keeps its weights in its workers")
        return {k: v.detach().cpu() for k, v in model.named_parameters()}


GeneratorActor = ray.remote(Generator)


def _forward(batch: dict, *, actors: list, kwargs: dict, timeout_s: float) -> dict:
    """A Ray Data task: hand one batch to the generator its rows were assigned to (round robin)."""
    actor = actors[int(batch["slot"][0]) % len(actors)]
    batch = {k: v for k, v in batch.items() if k != "slot"}
    return ray.get(actor.run.remote(batch, kwargs), timeout=timeout_s)


class GeneratorPool:
    """`generators_max` long-lived Generator actors: in a placement group of their own, or (colocated)
    actor i in bundle i of the trainers' group, so it shares trainer rank i's node and GPU."""

    def __init__(self, cfg, timeout_s: float = 600.0, share_pg=None):
        r, g = cfg.resources, cfg.generation
        self.cfg, self.n, self.timeout_s = cfg, r.generators_max, timeout_s
        self.own_pg = share_pg is None
        self.pg = share_pg
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
                max_restarts=g.max_attempts, max_task_retries=g.max_attempts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(self.n)
        ]

    def dataset(self, rows: list[dict], kwargs: dict, batch_size: int, max_attempts: int) -> ray.data.Dataset:
        """Lazy triplet rows: batch b goes to actor b mod n, through light tasks that hold no engine."""
        rows = [{**row, "slot": i // batch_size} for i, row in enumerate(rows)]
        blocks = max(1, -(-len(rows) // batch_size))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            return ds.map_batches(
                _forward, batch_size=batch_size, batch_format="numpy", num_cpus=0.01,
                fn_kwargs={"actors": self.actors, "kwargs": kwargs, "timeout_s": self.cfg.generation.timeout_s},
                compute=ray.data.TaskPoolStrategy(size=min(blocks, 2 * self.n)),  # 1 running + 1 queued per actor
                max_retries=max_attempts)

    def sync(self, trainers, path) -> dict:
        """Broadcast the trainers' weights (= the checkpoint at `path`) to every generator with an engine.

        Returns seconds, bytes and GB/s. On failure the generators keep `loaded` unset and reload `path`
        at their next batch; the error is returned under "error" for the caller to report."""
        from tspin_ray.weight_sync import plan_buckets

        ranks = ray.get([a.sync_ranks.remote() for a in self.actors], timeout=self.timeout_s)
        if not any(ranks):
            return {"seconds": 0.0, "bytes": 0, "gbps": 0.0, "receivers": 0}
        t0 = time.time()
        world = 1 + sum(ranks)
        bucket_bytes = int(self.cfg.generation.sync_bucket_mb * 2**20)
        host, port = ray.get(trainers.actors[0].address.remote(), timeout=self.timeout_s)
        specs = ray.get(trainers.actors[0].weight_specs.remote(), timeout=self.timeout_s)
        buckets = plan_buckets(specs, bucket_bytes)
        timeout = self.cfg.generation.timeout_s
        send = [t.send_weights.remote(host, port, world, bucket_bytes, timeout) for t in trainers.actors]
        recv, offset = [], 1
        for actor, k in zip(self.actors, ranks, strict=True):
            if k:
                recv.append(actor.receive_weights.remote(host, port, offset, world, buckets, timeout, str(path)))
                offset += k
        try:
            sent = ray.get(send, timeout=timeout)[0]
            ray.get(recv, timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:
            return {"seconds": time.time() - t0, "bytes": 0, "gbps": 0.0, "receivers": 0,
                    "error": " ".join(str(e).split())[:200]}
        seconds = time.time() - t0
        return {"seconds": seconds, "bytes": sent["bytes"], "gbps": sent["bytes"] / seconds / 1e9,
                "receivers": sum(ranks)}

    def sleep(self) -> int:
        """Every engine to sleep (colocated mode, before the trainers need the GPUs); returns how many."""
        return sum(ray.get([a.sleep.remote() for a in self.actors], timeout=self.timeout_s))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        if not self.own_pg:
            return  # the trainers' group: theirs to remove
        try:
            remove_placement_group(self.pg)
        except Exception:  # already gone with a dead cluster; nothing left to free
            pass
