"""Shared fixtures: one local Ray for the session, tiny checkpoints, small run configs.

    .venv/bin/pytest -q
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.pop("RAY_ADDRESS", None)  # tests start their own local Ray

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tspin_ray"]

# Small enough that a 2-iteration run takes well under a minute on 2 cores.
SMALL = {
    "model": {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}},
    "data": {"task": "addition", "task_size": 300, "eval_size": 40, "fraction": 1.0},
    "generation": {"backend": "hf", "max_new_tokens": 6, "batch_size": 32},
    "training": {"backend": "torch", "optimizer": "adamw", "lr": 1.0e-4, "epochs": 2,
                 "global_batch_size": 32, "micro_batch_size": 16, "max_length": 48},
    "sft": {"epochs": 2, "lr": 3.0e-3, "global_batch_size": 32, "micro_batch_size": 32},
    "objective": {"name": "tspin"},
    "resources": {"trainers": 1, "trainer_cpus": 1},
    "eval": {"max_new_tokens": 6},
    "iterations": 2,
}


def small_config(tmp_path: Path, **sections) -> dict:
    """SMALL with section-level updates, e.g. small_config(p, objective={"name": "spin"})."""
    import copy

    raw = copy.deepcopy(SMALL)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    raw.setdefault("output_dir", str(tmp_path / "run"))
    return raw


def write_config(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


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
