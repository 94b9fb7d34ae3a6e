"""Built-in synthetic tasks with exact answers, for demos, tests and the toy-scale study.

    .venv/bin/python -c "from tspin_ray.tasks import export_jsonl; export_jsonl('addition', 4000, 0, 'add.jsonl')"

`TASKS[name].make(n, seed)` returns n distinct `{"id", "prompt", "response"}` rows, the same list for the
same seed (and the first k rows of a longer list equal a shorter one). The tasks are sized so that the
tiny model SFT'd on 25% of a 4,000-row pool is clearly partial and better with 100% (figures in
bench/calibrate_tasks.py), leaving room for self-play to help (DESIGN.md, "Self-play at toy scale").
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tspin_ray.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[int, int], list[dict]]


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction equals the reference, ignoring surrounding whitespace."""
    return prediction.strip() == reference.strip()


def _distinct(name: str, sample: Callable[[random.Random], tuple[str, str]]) -> Callable[[int, int], list[dict]]:
    """make(n, seed): draw examples until n distinct prompts; fails loudly when the task has fewer."""

    def make(n: int, seed: int) -> list[dict]:
        rng = random.Random(f"{name}:{seed}")  # string seed: stable across Python versions and processes
        seen: set[str] = set()
        rows: list[dict] = []
        misses = 0
        while len(rows) < n:
            prompt, response = sample(rng)
            if prompt in seen:
                misses += 1
                if misses > 20 * n + 1000:  # the space is (nearly) exhausted; never loop forever
                    raise ValueError(f"task {name} has fewer than {n} distinct examples")
                continue
            seen.add(prompt)
            rows.append({"id": f"{name}-{len(rows):06d}", "prompt": prompt, "response": response})
        return rows

    return make


def _number(rng: random.Random, digits_min: int, digits_max: int) -> int:
    digits = rng.randint(digits_min, digits_max)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def addition(digits_min: int = 2, digits_max: int = 3, name: str = "addition") -> Task:
    """`a+b=` -> a+b, operands of digits_min..digits_max digits."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = _number(rng, digits_min, digits_max), _number(rng, digits_min, digits_max)
        return f"{a}+{b}=", str(a + b)

    return Task(name, f"add two {digits_min}-{digits_max} digit numbers", _distinct(name, sample))


def multiplication(digits_a: int = 3, digits_b: int = 1, name: str = "multiplication") -> Task:
    """`a*b=` -> a*b, a with digits_a digits, b with digits_b digits (b >= 2)."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a = rng.randint(10 ** (digits_a - 1), 10**digits_a - 1)
        b = rng.randint(max(2, 10 ** (digits_b - 1)), 10**digits_b - 1)
        return f"{a}*{b}=", str(a * b)

    return Task(name, f"multiply a {digits_a}-digit by a {digits_b}-digit number", _distinct(name, sample))


def sorting(length_min: int = 5, length_max: int = 8, alphabet: str = "abcdefghijklmnopqrstuvwxyz",
            name: str = "sorting") -> Task:
    """`sort: d,a,c=` -> `a,c,d`, letters drawn with replacement."""

    def sample(rng: random.Random) -> tuple[str, str]:
        items = rng.choices(alphabet, k=rng.randint(length_min, length_max))
        return f"sort:{','.join(items)}=", ",".join(sorted(items))

    return Task(name, f"sort {length_min}-{length_max} letters", _distinct(name, sample))


TASKS: dict[str, Task] = {t.name: t for t in (addition(), multiplication(), sorting())}


def get_task(name: str) -> Task:
    """The built-in task called `name`, or a UserError listing the valid names."""
    if name not in TASKS:
        near = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown task '{name}'{hint}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def export_jsonl(task_name: str, n: int, seed: int, path: str | Path) -> Path:
    """Write `TASKS[task_name].make(n, seed)` as JSON Lines (the format user data is read in)."""
    rows = get_task(task_name).make(n, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
