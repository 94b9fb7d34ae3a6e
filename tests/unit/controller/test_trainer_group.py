"""The trainers' process group times out after the configured limits, never before them; CPU trainers keep
the memory they free.

    .venv/bin/pytest tests/unit/controller/test_trainer_group.py
"""

from __future__ import annotations

import os
import time

import pytest
import ray

from tests.helpers import small_config
from tspin_ray.config.schema import from_dict
from tspin_ray.controller import trainer_group
from tspin_ray.errors import RunFailed
from tspin_ray.workers import devices


def test_the_group_timeout_is_above_every_training_limit(tmp_path):
    t = from_dict(small_config(tmp_path, training={"stall_timeout_s": 50, "load_timeout_s": 7000,
                                                   "export_timeout_s": 90})).training
    assert trainer_group.group_timeout_s(t) == 7000 + trainer_group.GROUP_MARGIN_S


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_a_stalled_collective_is_the_drivers_one_line_error_then_fails_at_the_group_timeout(
        ray_session, tmp_path, monkeypatch, backend):
    """Rank 0 waits in a barrier rank 1 never reaches (gloo, limits of 2 s, group timeout 2 + 3 s): the
    driver gives up first with the key to raise, and the barrier itself then fails at the group's timeout
    (DeepSpeed's default would hold it 10 minutes, NCCL's watchdog would then abort every rank)."""
    monkeypatch.setattr(trainer_group, "GROUP_MARGIN_S", 3.0)
    limits = {"stall_timeout_s": 2, "load_timeout_s": 2, "export_timeout_s": 2, "backend": backend}
    cfg = from_dict(small_config(tmp_path, training=limits, sft={"micro_batch_size": 16},
                                 resources={"trainers": 2, "trainer_cpus": 0.5}))
    group = trainer_group.TrainerGroup(cfg)
    try:
        import torch

        stuck = group.actors[0].__ray_call__.remote(lambda self: torch.distributed.barrier())
        with pytest.raises(RunFailed) as err:
            group.get([stuck], "rank 0's barrier", timeout=cfg.training.stall_timeout_s,
                      key="training.stall_timeout_s")
        assert str(err.value) == "timed out after 2s waiting for rank 0's barrier (training.stall_timeout_s)"
        t0 = time.time()
        with pytest.raises(ray.exceptions.RayTaskError) as failed:
            ray.get(stuck, timeout=60)
        assert time.time() - t0 < 10 and "timed out" in str(failed.value).lower()
    finally:
        group.shutdown()


def test_cpu_trainers_keep_the_memory_they_free_and_leave_a_users_settings_alone(ray_session, tmp_path, monkeypatch):
    for k in devices.CPU_TRAINER_HEAP:
        monkeypatch.delenv(k, raising=False)

    def step_faults(_actor=None) -> int:  # here, not at module level: Ray pickles it by value into the actor
        """Minor page faults of two training steps after eight (activations of 32 MiB each)."""
        import resource

        import torch

        model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
        x = torch.randn(65536, 128)

        def step():
            model(x).square().mean().backward()
            model.zero_grad(set_to_none=True)

        for _ in range(8):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(), step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # glibc's defaults (this process): each 32 MiB block is unmapped when freed and faults in again next step
    # (about 130,000 faults at 4 KiB; fewer where transparent huge pages back them)
    fresh = step_faults()
    assert fresh >= 10
    group = trainer_group.TrainerGroup(from_dict(small_config(tmp_path, resources={"trainers": 1, "trainer_cpus": 0.5})))
    try:
        env = ray.get(group.actors[0].__ray_call__.remote(lambda self: dict(os.environ)))
        assert {k: env.get(k) for k in devices.CPU_TRAINER_HEAP} == devices.CPU_TRAINER_HEAP
        assert env["TOKENIZERS_PARALLELISM"] == "false"  # ray.init's env_vars still reach the trainers
        assert ray.get(group.actors[0].__ray_call__.remote(step_faults)) < fresh / 50
    finally:
        group.shutdown()
    assert devices.trainer_env(gpus=1) == {}  # GPU ranks: host memory is not on the step's path
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert devices.trainer_env(gpus=0) == {}  # the user's own glibc settings, not a mix of theirs and ours
