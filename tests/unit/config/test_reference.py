"""docs/configuration.md is what `tspin-ray config --markdown` prints today: the reference cannot go stale.

    .venv/bin/pytest tests/unit/config/test_reference.py
"""

from __future__ import annotations

from tests.helpers import REPO
from tspin_ray.config.reference import describe, reference


def test_the_configuration_page_is_generated_from_the_config():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == reference(), "docs/configuration.md is stale: run `tspin-ray config --markdown > docs/configuration.md`"


def test_every_key_is_on_the_page_with_its_default():
    page = reference()
    for section in ("model", "data", "generation", "training", "sft", "objective", "resources", "eval"):
        assert f"## `{section}`" in page
    keys = [line.split(" ")[0].rstrip(":") for line in describe() if " = " in line or line.split(":")[0].count(".")]
    assert len(keys) > 100 and all(f"| `{k}` |" in page for k in keys)
    assert "| `training.lr` | `5e-07` | Peak learning rate. |" in page
    assert "| `objective.name` | `'tspin'` |" in page and "(one of sft, spin, tspin, space, rft)" in page
    assert "| `iterations` | `3` | Self-play iterations t = 0 .. iterations-1. |" in page
    assert r"llama3 (tied, GQA, byte-level BPE, <\|eot_id\|>)" in page  # a | inside a cell is escaped
