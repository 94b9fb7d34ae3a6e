"""The trainers' process group times out after the configured limits, never before them.

    .venv/bin/pytest tests/unit/controller/test_trainer_group.py
"""

from __future__ import annotations

import time

import pytest
import ray

from tests.helpers import small_config
from tspin_ray.config.schema import from_dict
from tspin_ray.controller import trainer_group
from tspin_ray.errors import RunFailed


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
