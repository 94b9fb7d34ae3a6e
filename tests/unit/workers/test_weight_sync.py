"""Long-lived generators and the broadcast weight sync (gloo here; the same code runs NCCL on GPUs).

    .venv/bin/pytest tests/unit/workers/test_weight_sync.py
"""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from tests.helpers import small_config
from tests.helpers.sync import broadcast_roundtrip
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.driver import train
from tspin_ray.errors import UserError
from tspin_ray.models.checkpoints import load_model
from tspin_ray.rollout.shards import read_shards
from tspin_ray.workers import weight_broadcast as weight_sync
from tspin_ray.workers.weight_broadcast import ParamSpec, plan_buckets


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


ZERO3 = {"backend": "deepspeed", "zero_stage": 3}


@pytest.mark.parametrize("backend,n,training,tp", [
    # hf-torch: the same broadcast as hf-zero3 without the ZeRO-3 gathers (tests/e2e/test_family_runs.py runs it too)
    pytest.param("hf", 2, None, 1, marks=pytest.mark.slow), ("hf", 2, ZERO3, 1),
    pytest.param("vllm", 1, None, 1, marks=pytest.mark.slow),
    pytest.param("vllm", 1, None, 2, marks=pytest.mark.slow)],
    ids=["hf-torch", "hf-zero3", "vllm-torch", "vllm-tp2"])
def test_broadcast_from_trainer_ranks_reaches_every_generator(ray_session, tmp_path, tiny_ckpt, backend, n,
                                                              training, tp):
    """With ZeRO-3 no rank holds the whole model: every bucket is gathered from both ranks on the way.
    With vLLM tensor parallelism (2 worker processes inside one generator actor, on CPU cores here) each
    worker joins the group as its own receiver and loads its slice of every tensor."""
    if backend == "vllm":
        pytest.importorskip("vllm")
    sync = broadcast_roundtrip(tmp_path, tiny_ckpt, backend, n, training=training, tp=tp)
    assert sync.receivers == n * tp


@pytest.mark.slow  # 163 s here: three whole runs; tests/e2e/test_family_runs.py runs long-lived + broadcast per family
def test_persistent_and_colocated_runs_equal_the_per_phase_run(ray_session, tmp_path):
    """The same 2-iteration T-SPIN run three ways: the default per-phase pool, long-lived generators with
    the broadcast sync, and colocated long-lived generators (generate, sleep, train; checkpoint reload).
    All end with tensor-equal weights and equal evaluations; the long-lived runs used one actor throughout."""
    ways = {"phase": {}, "persistent": {"persistent": True, "weight_sync": "broadcast"},
            "colocate": {"persistent": True, "colocate": True}}
    for name, gen in ways.items():
        train(from_dict(small_config(tmp_path, output_dir=str(tmp_path / name), generation=gen)), quiet=True)

    def iters(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["phase"] == "iteration"]

    base, base_iters = load_model(tmp_path / "phase" / "checkpoints" / "pi_2").state_dict(), iters(tmp_path / "phase")
    for name in ("persistent", "colocate"):
        run = tmp_path / name
        got = load_model(run / "checkpoints" / "pi_2").state_dict()
        assert all(torch.equal(base[k], got[k]) for k in base), name
        its = iters(run)
        assert [r["eval/exact_match"] for r in its] == [r["eval/exact_match"] for r in base_iters]
        assert [r["eval/nll"] for r in its] == [r["eval/nll"] for r in base_iters]
        names = {g for t in range(2) for g in read_shards(run / "generations" / f"iter_{t}").column("generator")
                 .to_pylist()}
        assert len(names) == 1, name  # iterations 0 and 1: the one long-lived actor
    persistent, colocate = iters(tmp_path / "persistent"), iters(tmp_path / "colocate")
    assert all(r["weight_sync/gbps"] > 0 for r in persistent[1:])
    assert not any("weight_sync/gbps" in r for r in base_iters + colocate)
    for r in colocate[1:]:  # colocated: the whole generation finished before the first optimizer step
        assert r["timing/first_train_step"] >= r["timing/last_generation"] > 0


@pytest.mark.parametrize("gen,message", [
    ({"weight_sync": "broadcast"}, "generation: weight_sync: broadcast needs persistent: true"),
    ({"colocate": True}, "generation: colocate: true needs persistent: true"),
    ({"colocate": True, "persistent": True, "weight_sync": "broadcast"},
     "generation: colocate: true needs weight_sync: checkpoint"),
    ({"colocate": True, "persistent": True, "_resources": {"generators_max": 2}},
     r"resources.generators_max \(2\) must equal trainers \(1\)"),
    ({"persistent": True, "engine_batches": 2}, "generation: engine_batches > 1 needs persistent: true and backend: vllm"),
    ({"backend": "vllm", "engine_batches": 2}, "generation: engine_batches > 1 needs persistent: true and backend: vllm"),
])
def test_generation_mode_conflicts_are_refused(tmp_path, gen, message):
    resources = gen.pop("_resources", {})
    with pytest.raises(UserError, match=message):
        from_dict(small_config(tmp_path, generation=gen, resources=resources))


def _members(port, world, timeout_s, listen):
    """`world` members of one sync group, each in a thread; member r runs listen[r](group) once in."""
    import threading

    from tspin_ray.workers.weight_broadcast import SyncGroup

    out, threads = [None] * world, []

    def member(r):
        sync = SyncGroup.open("k", "127.0.0.1", port, r, world, timeout_s, torch.device("cpu"))
        try:
            out[r] = listen[r](sync.group)
        except Exception as e:  # what the member saw
            out[r] = e
        finally:
            sync.close(failed=isinstance(out[r], Exception))

    for r in range(world):
        threads.append(threading.Thread(target=member, args=(r,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(60)
    return out


def test_the_handshake_counts_every_member_and_a_broadcast_completes_within_its_deadline():
    from tspin_ray.workers.trainer_rank import free_port
    from tspin_ray.workers.weight_broadcast import ParamSpec, handshake, receive, send

    bucket = [[ParamSpec("w", (2, 3), "float32")]]
    w = torch.arange(6.0).reshape(2, 3)

    def sender(group):
        handshake(group, torch.device("cpu"), 5)
        return send(group, bucket, lambda _: [w], torch.device("cpu"), 5)

    def receiver(group):
        return [t.clone() for pairs in receive(group, bucket, torch.device("cpu"), 5) for _, t in pairs]

    got = _members(free_port(), 3, 10, [sender, receiver, receiver])
    assert got[0] == 24 and all(torch.equal(r[0], w) for r in got[1:])


def test_a_member_that_never_listens_fails_the_handshake_at_its_deadline():
    """It joined the group but never took part (a generator stuck in a batch): rank 0 raises after the
    handshake's deadline, before anything is gathered or sent, instead of waiting for the broadcast's."""
    import time

    from tspin_ray.workers.trainer_rank import free_port
    from tspin_ray.workers.weight_broadcast import handshake

    def sender(group):
        t0 = time.time()
        try:
            handshake(group, torch.device("cpu"), 2)
        except Exception as e:
            return e, time.time() - t0
        return None, time.time() - t0

    got = _members(free_port(), 2, 30, [sender, lambda group: time.sleep(6)])
    error, seconds = got[0]
    assert error is not None and 1.5 < seconds < 5
