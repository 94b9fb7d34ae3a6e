"""What an iteration plans before it runs: whether epoch 0 trains on the stream or on the shards on disk.

    .venv/bin/pytest tests/unit/controller/test_plan.py
"""

from __future__ import annotations

import pytest

from tests.helpers import small_config
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.driver import Driver
from tspin_ray.controller.prepare import prepare


@pytest.mark.parametrize("stream", [True, False])
def test_generation_stream_false_generates_every_sample_before_training(ray_session, tmp_path, tiny_ckpt, stream):
    """The default trains epoch 0 while it is generated; `generation.stream: false` plans the whole
    generation first (on 2 CPU cores the overlap slows both sides), and trains epoch 0 from the shards in
    the same row order, so the results are the same."""
    raw = small_config(tmp_path, generation={"stream": stream})
    raw["model"] = {"path": str(tiny_ckpt)}
    raw.pop("sft", None)
    cfg = from_dict(raw)
    driver = Driver(prepare(cfg), quiet=True)
    driver.run.commit("pi_0", path=str(tiny_ckpt), files={}, external=True)
    plan = driver.plan(0, tiny_ckpt, None)
    assert plan.generates_all and plan.stream is stream
    if not stream:  # a key added later: at its default a run's hash is what it was before the key existed
        assert cfg.hash() != from_dict({**raw, "generation": {**raw["generation"], "stream": True}}).hash()
