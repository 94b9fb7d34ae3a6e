"""Shared fixtures: one local Ray for the session, tiny checkpoints, small run configs.

    .venv/bin/pytest -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.pop("RAY_ADDRESS", None)  # tests start their own local Ray


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from tspin_ray.controller.trainer_group import WORKER_ENV

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny model (vLLM-CPU servable: head_dim 32) with its tokenizer."""
    from tspin_ray.config.schema import TinyModelSpec
    from tspin_ray.models.tiny import save_tiny

    out = tmp_path_factory.mktemp("tiny") / "pi"
    save_tiny(out, TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0))
    return out


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory) -> Path:
    """Same architecture, different weights: the 'next iterate' for weight-reload tests."""
    from tspin_ray.config.schema import TinyModelSpec
    from tspin_ray.models.tiny import save_tiny

    out = tmp_path_factory.mktemp("tiny_b") / "pi"
    save_tiny(out, TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=1))
    return out


FAMILY_SPEC = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory):
    """family name, seed -> a tiny checkpoint shaped like that family (tspin_ray/models/families.py), built once."""
    from tspin_ray.config.schema import TinyModelSpec
    from tspin_ray.models.tiny import save_tiny

    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str, seed: int = 0) -> Path:
        if (family, seed) not in made:
            made[family, seed] = save_tiny(root / f"{family}-{seed}", TinyModelSpec(family=family, seed=seed,
                                                                                     **FAMILY_SPEC))
        return made[family, seed]

    return get
