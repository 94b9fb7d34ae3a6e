"""Helpers the tests share: the small run config, its YAML file, the repository and the CLI.

Fixtures live in tests/conftest.py; helpers for one area in the modules beside this one.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
