"""Seeds derived from whole keys: sampling is seeded per (seed, iteration, prompt id, sample).

    .venv/bin/python -m doctest tspin_ray/rollout/seeds.py
"""

from __future__ import annotations

import hashlib


def derive_seed(*key) -> int:
    """A seed that is a function of the whole key tuple: distinct tuples give unrelated seeds (a sum like
    seed*1000 + t*10 + epoch would collide once epochs reach 10).

    >>> derive_seed(0, 1, "p1", 0) == derive_seed(0, 1, "p1", 0) != derive_seed(0, 1, "p1", 1)
    True
    """
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)


def sample_seed(seed: int, iteration: int | str, prompt_id: str, sample: int) -> int:
    """Seed of one sample: a function of (run seed, iteration, prompt id, sample index) only."""
    return derive_seed(seed, iteration, prompt_id, sample)
