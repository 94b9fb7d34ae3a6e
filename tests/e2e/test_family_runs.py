"""Whole runs on every model family, checked from the run directory: y in context, BOS once, every
sample ending at a declared end of turn, lengths within training.max_length, exports that keep the
family's shape. One run per family in the default suite; the full matrix with `-m slow`.

    .venv/bin/pytest tests/e2e/test_family_runs.py -q              # 4 runs, one per family
    .venv/bin/pytest tests/e2e/test_family_runs.py -q -m slow      # families x objectives x engines x ZeRO x sync
"""

from __future__ import annotations

import itertools

import pytest

from tests.helpers.runs import check_run, family_config
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.driver import train

DEFAULT = [  # one run per family, each on a different path
    ("char", "tspin", "vllm", 2, "broadcast"),
    ("zephyr", "spin", "hf", 2, "reload"),
    ("llama3", "tspin", "vllm", 3, "broadcast"),  # tied: the broadcast into vLLM re-ties the head
    ("qwen2", "space", "hf", 3, "broadcast"),
]


@pytest.mark.parametrize("family,objective,engine,zero,sync", DEFAULT, ids=["-".join(map(str, c)) for c in DEFAULT])
def test_one_run_per_family(ray_session, tmp_path, family, objective, engine, zero, sync):
    run_and_check(tmp_path, family, objective, engine, zero, sync)


def run_and_check(tmp_path, *case) -> None:
    if case[2] == "vllm":
        pytest.importorskip("vllm")
    raw = family_config(tmp_path, *case)
    assert train(from_dict(raw), quiet=True)["iterations"] == 2
    check_run(tmp_path / "run", raw)


MATRIX = [c for c in itertools.product(["char", "zephyr", "llama3", "qwen2"], ["sft", "spin", "tspin", "space"],
                                       ["hf", "vllm"], [2, 3], ["phase", "broadcast"]) if c not in DEFAULT]


@pytest.mark.slow
@pytest.mark.parametrize("family,objective,engine,zero,sync", MATRIX, ids=["-".join(map(str, c)) for c in MATRIX])
def test_family_matrix(ray_session, tmp_path, family, objective, engine, zero, sync):
    run_and_check(tmp_path, family, objective, engine, zero, sync)
