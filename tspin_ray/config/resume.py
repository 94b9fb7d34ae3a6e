"""What a run directory's config hash covers: rerunning a command resumes its run when the hash matches.

    .venv/bin/pytest tests/unit/config/test_hash.py
"""

from __future__ import annotations

import hashlib
import json

# Keys that were never read and are gone; a run directory written before still holds them in config.yaml.
RETIRED = {"training": {"seed": "the run's top-level `seed` seeds every shuffle"},
           "sft": {"fraction": "use data.fraction"}}

# Limits, retry counts and health thresholds: they decide whether a phase finishes or which iterate is
# named best, never what an iteration computes.
RESUME_SAFE = {"generation": ("timeout_s", "max_attempts"),
               "training": ("stall_timeout_s", "load_timeout_s", "export_timeout_s"),
               "eval": ("select", "collapse_nll_factor", "collapse_min_distinct", "collapse_max_unfinished",
                        "stop_on_collapse")}

# Keys added after runs were made: at their default they are left out of the hash, so those runs resume.
ADDED = {"data": {"checker": None}, "generation": {"stream": True}}


def config_hash(d: dict) -> str:
    """Hash of a config's plain dict without output_dir, allow_config_change, the RESUME_SAFE limits (a phase
    that timed out resumes after its limit is raised) and ADDED keys at their defaults."""
    d = {section: dict(v) if isinstance(v, dict) else v for section, v in d.items()}
    d.pop("output_dir")
    d.pop("allow_config_change")
    for section, keys in RESUME_SAFE.items():
        for key in keys:
            d[section].pop(key)
    for section, defaults in ADDED.items():
        for key, default in defaults.items():
            if d[section][key] == default:
                d[section].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
