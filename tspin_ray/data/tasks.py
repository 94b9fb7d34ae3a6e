"""Built-in synthetic tasks with exact answers, for demos, tests and the toy-scale study.

    .venv/bin/python -c "from tspin_ray.data.tasks import export_jsonl; export_jsonl('addition', 4000, 0, 'add.jsonl')"

`TASKS[name].make(n, seed)` returns n distinct `{"id", "prompt", "response"}` rows, the same list for the
same seed (and the first k rows of a longer list equal a shorter one). The tasks are sized so that the
tiny model SFT'd on 25% of a 4,000-row pool is clearly partial and better with 100% (figures in
bench/calibrate_tasks.py), leaving room for self-play to help (docs/concepts.md, "Self-play at toy scale").

`TASKS[name].answers(prompt)` is the task's whole set of valid answers, and `check(prompt, response)` the
checker built on it (the verifier of `objective.name: rft`, the distributional metrics of
tspin_ray/study/distribution.py). Addition, multiplication and sorting have one answer per prompt; `paths` has
several (every shortest path between two nodes of one fixed random graph), so a model can be judged on
how it spreads its probability over them, not only on matching the one annotated answer.
"""

from __future__ import annotations

import difflib
import functools
import json
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tspin_ray.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[int, int], list[dict]]
    answers: Callable[[str], tuple[str, ...]]  # every valid answer to a prompt of this task

    def check(self, prompt: str, response: str) -> bool:
        """Whether `response` is a valid answer to `prompt` (surrounding whitespace ignored)."""
        return response.strip() in self.answers(prompt)


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction equals the reference, ignoring surrounding whitespace."""
    return prediction.strip() == reference.strip()


def _distinct(name: str, sample: Callable[[random.Random], tuple[str, str]],
              rng_for: Callable[[int], random.Random] | None = None) -> Callable[[int, int], list[dict]]:
    """make(n, seed): draw examples until n distinct prompts; fails loudly when the task has fewer."""

    def make(n: int, seed: int) -> list[dict]:
        # string seed by default: stable across Python versions and processes
        rng = rng_for(seed) if rng_for else random.Random(f"{name}:{seed}")
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

    def answers(prompt: str) -> tuple[str, ...]:
        a, b = prompt.removesuffix("=").split("+")
        return (str(int(a) + int(b)),)

    return Task(name, f"add two {digits_min}-{digits_max} digit numbers", _distinct(name, sample), answers)


def multiplication(digits_a: int = 3, digits_b: int = 1, name: str = "multiplication") -> Task:
    """`a*b=` -> a*b, a with digits_a digits, b with digits_b digits (b >= 2)."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a = rng.randint(10 ** (digits_a - 1), 10**digits_a - 1)
        b = rng.randint(max(2, 10 ** (digits_b - 1)), 10**digits_b - 1)
        return f"{a}*{b}=", str(a * b)

    def answers(prompt: str) -> tuple[str, ...]:
        a, b = prompt.removesuffix("=").split("*")
        return (str(int(a) * int(b)),)

    return Task(name, f"multiply a {digits_a}-digit by a {digits_b}-digit number", _distinct(name, sample),
                answers)


def sorting(length_min: int = 5, length_max: int = 8, alphabet: str = "abcdefghijklmnopqrstuvwxyz",
            name: str = "sorting") -> Task:
    """`sort: d,a,c=` -> `a,c,d`, letters drawn with replacement."""

    def sample(rng: random.Random) -> tuple[str, str]:
        items = rng.choices(alphabet, k=rng.randint(length_min, length_max))
        return f"sort:{','.join(items)}=", ",".join(sorted(items))

    def answers(prompt: str) -> tuple[str, ...]:
        return (",".join(sorted(prompt.removeprefix("sort:").removesuffix("=").split(","))),)

    return Task(name, f"sort {length_min}-{length_max} letters", _distinct(name, sample), answers)


def arithmetic(name: str = "arithmetic") -> Task:
    """`What is 47 + 38?` -> `47 + 38 = 85`: two-digit sums and differences (a >= b for '-'), in the style
    SmolLM2-135M-Instruct answers in by itself; the real model's data (jobs/data/make_arithmetic.py writes it
    in UltraChat's shape, and `data.checker: arithmetic` verifies samples of those files)."""

    def solve(a: int, op: str, b: int) -> str:
        return f"{a} {op} {b} = {a + b if op == '+' else a - b}"

    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        return f"What is {a} {op} {b}?", solve(a, op, b)

    def answers(prompt: str) -> tuple[str, ...]:
        m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt.strip())
        return () if m is None else (solve(int(m[1]), m[2], int(m[3])),)

    # seeded by the plain int, as the demo's file was first written: that file stays byte-identical
    return Task(name, "two-digit sums and differences, answered as 'a + b = c'",
                _distinct(name, sample, random.Random), answers)


def random_graph(nodes: int, degree: int, seed: int) -> dict[int, frozenset[int]]:
    """An undirected random graph: `nodes * degree / 2` distinct edges drawn uniformly (string-seeded)."""
    rng = random.Random(f"graph:{nodes}:{degree}:{seed}")
    edges: set[tuple[int, int]] = set()
    while len(edges) < nodes * degree // 2:
        a, b = rng.sample(range(nodes), 2)
        edges.add((min(a, b), max(a, b)))
    adj: dict[int, set[int]] = {v: set() for v in range(nodes)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    return {v: frozenset(n) for v, n in adj.items()}


def _distances(adj: dict[int, frozenset[int]], source: int) -> dict[int, int]:
    dist, queue = {source: 0}, deque([source])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def shortest_paths(adj: dict[int, frozenset[int]], s: int, t: int) -> list[tuple[int, ...]]:
    """Every shortest s-t path, in lexicographic order (empty when t is unreachable).

    >>> g = {0: frozenset({1, 2}), 1: frozenset({0, 3}), 2: frozenset({0, 3}), 3: frozenset({1, 2})}
    >>> shortest_paths(g, 0, 3)
    [(0, 1, 3), (0, 2, 3)]
    """
    from_s, to_t = _distances(adj, s), _distances(adj, t)
    if t not in from_s:
        return []
    length, out = from_s[t], []

    def extend(path: tuple[int, ...]) -> None:
        u = path[-1]
        if u == t:
            out.append(path)
            return
        for v in sorted(adj[u]):  # v lies on a shortest path iff it is one step further and one closer to t
            if from_s.get(v) == from_s[u] + 1 and to_t.get(v) == length - from_s[v]:
                extend(path + (v,))

    extend((s,))
    return out


def paths(nodes: int = 90, degree: int = 5, min_answers: int = 2, max_answers: int = 16, min_hops: int = 2,
          name: str = "paths") -> Task:
    """`s>t=` -> a shortest path `s,a,b,t` between two nodes of ONE fixed random graph (node names 10..99,
    graph seed 0 for every data seed: the seed picks the pairs and the annotated path, never the graph).

    Only pairs at least `min_hops` apart with `min_answers`..`max_answers` shortest paths are prompts, so
    every prompt has several valid answers and the set stays small enough to score exhaustively. The
    annotated answer is one of them, uniformly at random: SFT data with one label per prompt, as in
    ALPINE (arXiv 2405.09220) and the first regime in docs/results.md. The default graph has 3,848 such pairs,
    3.6 shortest paths each on average (2-16), 2-6 hops, answers of at most 20 characters.
    """
    label = {v: str(10 + v) for v in range(nodes)}  # two characters per node for every node
    node_of = {n: v for v, n in label.items()}
    if nodes > 90:
        raise ValueError("paths: node names are 10..99, so at most 90 nodes")

    @functools.cache
    def graph() -> dict[int, frozenset[int]]:
        return random_graph(nodes, degree, 0)

    @functools.cache
    def pairs() -> tuple[tuple[int, int], ...]:
        adj = graph()
        return tuple((s, t) for s in range(nodes) for t in range(nodes) if s != t
                     and min_answers <= len(ps := shortest_paths(adj, s, t)) <= max_answers
                     and len(ps[0]) > min_hops)

    def answers(prompt: str) -> tuple[str, ...]:
        s, t = prompt.removesuffix("=").split(">")
        return tuple(",".join(label[v] for v in p) for p in shortest_paths(graph(), node_of[s], node_of[t]))

    def make(n: int, seed: int) -> list[dict]:
        order = list(pairs())
        if n > len(order):
            raise ValueError(f"task {name} has fewer than {n} distinct examples ({len(order)})")
        random.Random(f"{name}:{seed}").shuffle(order)
        rows = []
        for i, (s, t) in enumerate(order[:n]):
            prompt = f"{label[s]}>{label[t]}="
            # chosen per pair and seed, so the first k rows of a longer list equal a shorter one
            answer = random.Random(f"{name}:{seed}:{prompt}").choice(answers(prompt))
            rows.append({"id": f"{name}-{i:06d}", "prompt": prompt, "response": answer})
        return rows

    return Task(name, f"a shortest path between two of {nodes} nodes of a fixed random graph (degree "
                      f"{degree}; {min_answers}-{max_answers} valid answers per prompt)", make, answers)


TASKS: dict[str, Task] = {t.name: t for t in (addition(), multiplication(), sorting(), paths(), arithmetic())}


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
