"""A run directory's config hash decides whether rerunning the command resumes it: the hash of the shipped
configs is what tspin-ray computed before the package was reorganised (360e20f), so those runs resume.

    .venv/bin/pytest tests/unit/config/test_hash.py
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import REPO
from tspin_ray.config.schema import load_config
from tspin_ray.errors import UserError

# computed by tspin-ray at 360e20f (`load_config(path).hash()`), 2026-12-06
BEFORE = {"demo-cpu.yaml": "720167890de5d309", "tiny-cpu.yaml": "f907eb3bd9b1da38",
          "zephyr-7b-tspin-2x8.yaml": "e2e8ecc98e0bb5cf"}


@pytest.mark.parametrize("name", list(BEFORE))
def test_the_hash_of_a_shipped_config_is_unchanged(name):
    assert load_config(REPO / "jobs" / name).hash() == BEFORE[name]


def test_health_thresholds_and_selection_do_not_change_the_hash():
    """They name the best iterate and decide whether a run goes on, never what an iteration computes: a run
    stopped at a collapse goes on when rerun with eval.stop_on_collapse=false."""
    cfg = load_config(REPO / "jobs" / "tiny-cpu.yaml")
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, select="exact_match", collapse_nll_factor=3.0,
                                                               collapse_min_distinct=0.0, stop_on_collapse=True))
    assert other.hash() == cfg.hash()
    assert dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=7)).hash() != cfg.hash()


def test_a_checker_for_user_data_changes_the_hash_and_lets_rft_run():
    """data.checker (added after those runs) is out of the hash at its default, in it when set; it is what
    lets rft verify samples of a data file, and the generation phases carry it to the generators."""
    from tspin_ray.config.schema import from_dict
    from tspin_ray.rollout.phases import phase_for

    raw = {"model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "data": {"path": "jobs/data/arithmetic.jsonl"},
           "objective": {"name": "rft"}}
    with pytest.raises(UserError, match="set data.task, or data.checker for user data"):
        from_dict(raw)
    cfg = from_dict(raw, ["data.checker=arithmetic"])
    sft = from_dict({**raw, "objective": {"name": "sft"}})
    assert sft.hash() != dataclasses.replace(sft, data=dataclasses.replace(sft.data, checker="arithmetic")).hash()
    phase = phase_for(cfg, "m", 1, samples=1, temperature=1.0, max_new_tokens=8, score_ref=False)
    assert phase.task == "arithmetic"
