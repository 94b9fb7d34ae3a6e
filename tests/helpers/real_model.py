"""The real pretrained model in tests: SmolLM2-135M-Instruct as `make real-model` prepared it (bench/real_model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import real_model

HUB_ID = real_model.HUB_ID


def smollm2_dir() -> Path:
    """The fixture's checkpoint directory; a missing fixture fails the test in one line saying how to make it."""
    if not real_model.ready():
        pytest.fail(real_model.missing_message(), pytrace=False)
    return real_model.model_dir()


def hub_cache_with(tmp_path: Path) -> Path:
    """A HF hub cache under tmp_path holding the fixture's model repo (linked), for datasets to join."""
    smollm2_dir()
    hub = tmp_path / "hub"
    hub.mkdir(exist_ok=True)
    repo = real_model.snapshot().parents[1]
    (hub / repo.name).symlink_to(repo, target_is_directory=True)
    return hub
