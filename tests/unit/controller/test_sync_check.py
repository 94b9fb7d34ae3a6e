"""After a sync, long-lived generators must score a probe as the trainers do: a stale engine is reloaded,
one that stays stale stops the run in one line.

    .venv/bin/pytest tests/unit/controller/test_sync_check.py
"""

from __future__ import annotations

import doctest

import pytest
import ray

from tests.helpers import small_config
from tests.helpers.sync import phase_of, run_pool
from tests.helpers.trainers import BEGIN, addition_rows
from tspin_ray.config.schema import from_dict
from tspin_ray.controller import sync_check
from tspin_ray.controller.driver import Driver
from tspin_ray.controller.prepare import prepare
from tspin_ray.controller.trainer_group import TrainerGroup
from tspin_ray.errors import RunFailed
from tspin_ray.workers.generator_pool import GeneratorPool
from tspin_ray.workers.records import OptimizerSetup


def test_doctests():
    assert doctest.testmod(sync_check).failed == 0


def stale_reloads(pool: GeneratorPool, times: int) -> None:
    """Each generator's next `times` reloads keep the weights it has (a sync that silently did nothing)."""

    def patch(actor, n=times):
        engine, real = actor.stage.engine, actor.stage.engine.reload
        left = [n]

        def reload(path):
            if left[0] > 0:
                left[0] -= 1
                return
            real(path)

        engine.reload = reload

    ray.get([a.__ray_call__.remote(patch) for a in pool.actors])


def test_a_stale_generator_is_reloaded_and_one_that_stays_stale_stops_the_run(ray_session, tmp_path, tiny_ckpt):
    raw = small_config(tmp_path, generation={"persistent": True, "weight_sync": "checkpoint"},
                       resources={"trainers": 1, "trainer_cpus": 0.5, "generators_max": 1, "generator_cpus": 0.5})
    raw["model"] = {"path": str(tiny_ckpt)}
    driver = Driver(prepare(from_dict(raw)), quiet=True)
    trainers, pool = TrainerGroup(driver.cfg), GeneratorPool(driver.cfg)
    said = []
    probe = driver.sft_rows(driver.prep.eval[:sync_check.PROBE_ROWS])
    try:
        trainers.load(tiny_ckpt)
        run_pool(pool, driver.prep.eval[:8], phase_of(driver, tiny_ckpt))  # the engine holds pi_0
        assert sync_check.verify(trainers, pool, probe, tiny_ckpt, driver.cfg, said.append)["sync/probe_gap"] < 1e-4
        assert said == []

        def step(to):  # one real optimizer step, exported like an iterate
            trainers.begin(OptimizerSetup(**BEGIN))
            trainers.train_stream(ray.data.from_items(addition_rows(tiny_ckpt)))
            trainers.export(to)

        step(tmp_path / "pi_1")
        stale_reloads(pool, 1)  # the first reload of pi_1 silently keeps pi_0
        got = sync_check.verify(trainers, pool, probe, tmp_path / "pi_1", driver.cfg, said.append)
        assert len(said) == 1 and said[0].startswith("warning: a generator's weights differ from the trainers'")
        assert "every generator reloads the checkpoint" in said[0] and got["sync/probe_gap"] < 1e-4

        step(tmp_path / "pi_2")
        stale_reloads(pool, 2)  # and now every reload keeps pi_1
        with pytest.raises(RunFailed) as err:
            sync_check.verify(trainers, pool, probe, tmp_path / "pi_2", driver.cfg, said.append)
        assert str(err.value).startswith(f"weight sync: after reloading {tmp_path / 'pi_2'} a generator still scores "
                                         f"the probe ") and "(tolerance 0.001 for float32)" in str(err.value)
    finally:
        trainers.shutdown()
        pool.shutdown()
