"""Long-lived generators and the broadcast weight sync (gloo here; the same code runs NCCL on GPUs).

    .venv/bin/pytest tests/test_weight_sync.py
"""

from __future__ import annotations

import doctest
import json

import pytest
import ray
import torch

from tests.conftest import small_config
from tests.test_trainer import BEGIN, _rows
from tspin_ray import weight_sync
from tspin_ray.config import from_dict
from tspin_ray.driver import Driver, example_rows, prepare, train
from tspin_ray.engines import HFEngine
from tspin_ray.errors import UserError
from tspin_ray.generators import GeneratorPool
from tspin_ray.modeling import load_model
from tspin_ray.pipeline import read_shards
from tspin_ray.trainer_group import TrainerGroup
from tspin_ray.weight_sync import ParamSpec, plan_buckets


def test_bucket_plan_doctests_and_invariants():
    assert doctest.testmod(weight_sync).failed == 0
    specs = [ParamSpec(f"p{i}", (n,), "float32") for i, n in enumerate([10, 300, 5, 5, 64, 1000, 3])]
    specs.insert(3, ParamSpec("half", (8,), "bfloat16"))
    buckets = plan_buckets(specs, bucket_bytes=256)
    assert [s for b in buckets for s in b] == specs  # every parameter once, in order
    for b in buckets:
        assert len({s.dtype for s in b}) == 1  # one flat buffer per bucket needs one dtype
        assert len(b) == 1 or sum(s.nbytes for s in b) <= 256
    assert [[s.name for s in b] for b in buckets] == [["p0"], ["p1"], ["p2"], ["half"], ["p3"], ["p4"],
                                                      ["p5"], ["p6"]]
    assert [[s.name for s in b] for b in plan_buckets(specs, 2**20)] == [["p0", "p1", "p2"], ["half"],
                                                                         ["p3", "p4", "p5", "p6"]]


def _kwargs(driver: Driver, path, iteration="eval") -> dict:
    return driver.stage_kwargs(path, iteration, samples=1, temperature=0.0, max_new_tokens=6, score_ref=False,
                               out_dir=None)


def _run(pool: GeneratorPool, rows, kwargs) -> dict:
    out = {"prompt_id": [], "generated_ids": [], "engine_load_s": [], "generator": []}
    for b in pool.dataset(rows, kwargs, batch_size=8, max_attempts=2).iter_batches(batch_size=None,
                                                                                    batch_format="numpy"):
        for k in out:
            out[k] += list(b[k])
    return out


@pytest.mark.parametrize("backend,n", [("hf", 2), pytest.param("vllm", 1, marks=pytest.mark.slow)])
def test_broadcast_from_trainer_ranks_reaches_every_generator(ray_session, tmp_path, tiny_ckpt, backend, n):
    """n trainer ranks take a real optimizer step; after the broadcast each of n generators holds exactly
    the trainer's tensors and generates what an engine loaded from the exported checkpoint generates."""
    if backend == "vllm":
        pytest.importorskip("vllm")
    raw = small_config(tmp_path, model={"path": str(tiny_ckpt)},
                       generation={"persistent": True, "weight_sync": "broadcast", "sync_bucket_mb": 0.05,
                                   "backend": backend},
                       resources={"trainers": n, "trainer_cpus": 0.5, "generators_max": n, "generator_cpus": 0.5})
    raw["model"] = {"path": str(tiny_ckpt)}
    driver = Driver(prepare(from_dict(raw)), quiet=True)
    trainers, pool = TrainerGroup(driver.cfg), GeneratorPool(driver.cfg)
    try:
        trainers.load(tiny_ckpt)
        trainers.begin(**{**BEGIN, "global_batch_size": 8, "micro_batch_size": 4})
        trainers.train_stream(ray.data.from_items(_rows(tiny_ckpt)))
        rows = example_rows(driver.prep.eval[:16], 0)
        before = _run(pool, rows, _kwargs(driver, tiny_ckpt))  # starts both engines on pi_0
        assert len(set(before["generator"])) == n  # two batches, round robin: one per actor

        stepped = tmp_path / "stepped"
        trainers.export(stepped)
        sync = pool.sync(trainers, stepped)
        assert "error" not in sync and sync["receivers"] == n
        n_bytes = sum(p.numel() * 4 for p in load_model(tiny_ckpt).parameters())
        assert sync["bytes"] == n_bytes and sync["gbps"] > 0
        expected = ray.get(trainers.actors[0].__ray_call__.remote(
            lambda self: {k: v.detach().clone() for k, v in self.model.named_parameters()}))
        original = load_model(tiny_ckpt).state_dict()
        assert any(not torch.equal(expected[k], original[k]) for k in expected)  # the step changed weights
        for got in ray.get([a.weights.remote() for a in pool.actors]) if backend == "hf" else []:
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)

        after = _run(pool, rows, _kwargs(driver, stepped))
        assert after["engine_load_s"] == [0.0] * len(rows)  # the broadcast counted as loading `stepped`
        assert set(after["generator"]) == set(before["generator"])  # the same long-lived actors
        ref = HFEngine(str(stepped)).generate(_prompt_ids(driver, rows),
                                              [0] * len(rows), max_new_tokens=6, temperature=0.0, top_p=1.0)
        by_id = dict(zip(after["prompt_id"], after["generated_ids"], strict=True))
        assert [list(by_id[r["prompt_id"]][0]) for r in rows] == ref

        again = _run(pool, rows, _kwargs(driver, tiny_ckpt))  # a batch naming other weights reloads them
        assert max(again["engine_load_s"]) > 0
        assert dict(zip(again["prompt_id"], map(lambda g: list(g[0]), again["generated_ids"]), strict=True)) == \
            dict(zip(before["prompt_id"], map(lambda g: list(g[0]), before["generated_ids"]), strict=True))
    finally:
        trainers.shutdown()
        pool.shutdown()


def _prompt_ids(driver, rows):
    from tspin_ray.formatting import encode_prompt

    return [encode_prompt(driver.prep.tokenizer, r["prompt"]) for r in rows]


def test_persistent_broadcast_run_equals_per_phase_run(ray_session, tmp_path):
    """The same 2-iteration T-SPIN run with long-lived generators + broadcast and with the default per-phase
    pool ends with tensor-equal weights and equal evaluations; the persistent run used one actor throughout."""
    runs = {}
    for name, gen in (("phase", {}), ("persistent", {"persistent": True, "weight_sync": "broadcast"})):
        raw = small_config(tmp_path, output_dir=str(tmp_path / name), generation=gen)
        train(from_dict(raw), quiet=True)
        runs[name] = tmp_path / name
    a, b = (load_model(runs[n] / "checkpoints" / "pi_2").state_dict() for n in ("phase", "persistent"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def iters(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["phase"] == "iteration"]

    pa, pb = iters(runs["phase"]), iters(runs["persistent"])
    assert [r["eval/exact_match"] for r in pa] == [r["eval/exact_match"] for r in pb]
    assert [r["eval/nll"] for r in pa] == [r["eval/nll"] for r in pb]
    assert all(r["weight_sync/gbps"] > 0 for r in pb[1:]) and not any("weight_sync/gbps" in r for r in pa)
    names = {g for t in range(2) for g in read_shards(runs["persistent"] / "generations" / f"iter_{t}")
             .column("generator").to_pylist()}
    names |= set(read_shards(runs["persistent"] / "proto").column("generator").to_pylist())
    assert len(names) == 1  # proto, iteration 0 and iteration 1 all came from the one long-lived actor


def test_broadcast_needs_persistent_generators(tmp_path):
    with pytest.raises(UserError, match="generation: weight_sync: broadcast needs persistent: true"):
        from_dict(small_config(tmp_path, generation={"weight_sync": "broadcast"}))
