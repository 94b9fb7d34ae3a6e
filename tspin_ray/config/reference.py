"""The configuration reference, from the config's own field documentation.

    tspin-ray config                # one line per key
    tspin-ray config --markdown     # docs/configuration.md (tests/unit/config/test_reference.py keeps it current)
"""

from __future__ import annotations

from tspin_ray.config import typed_yaml
from tspin_ray.config.schema import RunConfig


def describe() -> list[str]:
    """Every config key with its default and documentation (`tspin-ray config`)."""
    return typed_yaml.describe(RunConfig)


def reference() -> str:
    """docs/configuration.md: every key by section, from the fields' own documentation."""
    head = ("# Configuration reference\n\nOne YAML file describes a run; `key.sub=value` arguments override it. "
            "Generated from the config's own field documentation by `tspin-ray config --markdown` "
            "(tests/unit/config/test_reference.py checks this page is current).\n")
    return head + "\n" + typed_yaml.reference(RunConfig)
