"""A broadcast weight sync from trainers into long-lived generators, checked against a fresh engine."""

from __future__ import annotations

import ray
import torch

from tests.helpers import small_config
from tests.helpers.trainers import BEGIN, addition_rows
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.driver import Driver
from tspin_ray.controller.prepare import prepare
from tspin_ray.controller.trainer_group import TrainerGroup
from tspin_ray.models.checkpoints import load_model
from tspin_ray.rollout.phases import prompt_rows
from tspin_ray.workers.engines import HFEngine
from tspin_ray.workers.generator_pool import GeneratorPool
from tspin_ray.workers.records import OptimizerSetup


def phase_of(driver: Driver, path, iteration="eval"):
    return driver.phase(path, iteration, samples=1, temperature=0.0, max_new_tokens=6)


def run_pool(pool: GeneratorPool, rows, phase) -> dict:
    out = {"prompt_id": [], "generated_ids": [], "engine_load_s": [], "generator": []}
    for b in pool.dataset(prompt_rows(rows, 0), phase, batch_size=8, max_attempts=2).iter_batches(
            batch_size=None, batch_format="numpy"):
        for k in out:
            out[k] += list(b[k])
    return out


def broadcast_roundtrip(tmp_path, ckpt, backend: str, n: int, gpus: float = 0.0, training: dict | None = None,
                        tp: int = 1):
    """n trainer ranks take a real optimizer step; after the broadcast each of n generators holds exactly
    the exported checkpoint's tensors and generates what an engine loaded from that checkpoint generates.
    Also run by tests/gpu/test_gpu.py with NCCL, vLLM and ZeRO-3."""
    raw = small_config(tmp_path, generation={"persistent": True, "weight_sync": "broadcast", "sync_bucket_mb": 0.05,
                                             "backend": backend, "tensor_parallel_size": tp},
                       resources={"trainers": n, "trainer_cpus": 0.5, "generators_max": n, "generator_cpus": 0.5,
                                  "trainer_gpus": gpus, "generator_gpus": gpus * tp},
                       training=training or {})
    raw["model"] = {"path": str(ckpt)}
    driver = Driver(prepare(from_dict(raw)), quiet=True)
    trainers, pool = TrainerGroup(driver.cfg), GeneratorPool(driver.cfg)
    try:
        trainers.load(ckpt)
        trainers.begin(OptimizerSetup(**{**BEGIN, "global_batch_size": 8, "micro_batch_size": 4}))
        trainers.train_stream(ray.data.from_items(addition_rows(ckpt)))
        rows = driver.prep.eval[:16]
        before = run_pool(pool, rows, phase_of(driver, ckpt))  # starts the engines on pi_0
        assert len(set(before["generator"])) == n  # two batches, round robin: one per actor

        stepped = tmp_path / "stepped"
        trainers.export(stepped)
        sync = pool.sync(trainers, stepped)
        assert sync.ok and sync.receivers == n * tp
        expected, original = load_model(stepped).state_dict(), load_model(ckpt).state_dict()
        assert sync.bytes == sum(t.numel() * t.element_size() for t in original.values()) and sync.gbps > 0
        assert any(not torch.equal(expected[k], original[k]) for k in expected)  # the step changed weights
        for got in ray.get([a.weights.remote() for a in pool.actors]) if backend == "hf" else []:
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)

        after = run_pool(pool, rows, phase_of(driver, stepped))
        assert after["engine_load_s"] == [0.0] * len(rows)  # the broadcast counted as loading `stepped`
        assert set(after["generator"]) == set(before["generator"])  # the same long-lived actors
        ref = HFEngine(str(stepped)).generate(prompt_ids_of(driver, rows), [0] * len(rows), max_new_tokens=6,
                                              temperature=0.0, top_p=1.0)
        by_id = dict(zip(after["prompt_id"], after["generated_ids"], strict=True))
        assert [list(by_id[r.prompt_id][0]) for r in rows] == ref

        again = run_pool(pool, rows, phase_of(driver, ckpt))  # a batch naming other weights reloads them
        assert max(again["engine_load_s"]) > 0
        assert dict(zip(again["prompt_id"], map(lambda g: list(g[0]), again["generated_ids"]), strict=True)) == \
            dict(zip(before["prompt_id"], map(lambda g: list(g[0]), before["generated_ids"]), strict=True))
        return sync
    finally:
        trainers.shutdown()
        pool.shutdown()


def prompt_ids_of(driver, rows):
    return [driver.prep.format.prompt_ids(r.prompt) for r in rows]
