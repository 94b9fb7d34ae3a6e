"""Built-in tasks: deterministic, distinct, correct answers, tokenizable, exported as JSONL."""

from __future__ import annotations

import json

import pytest

from tspin_ray.data.tasks import TASKS, Task, exact_match, export_jsonl
from tspin_ray.errors import UserError
from tspin_ray.models.tiny import CHARSET, build_tokenizer

N = 500
TOY = sorted(set(TASKS) - {"arithmetic"})  # arithmetic is the real model's (words and spaces: not the char set)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_make_is_deterministic_and_distinct(name):
    task = TASKS[name]
    assert isinstance(task, Task) and task.name == name and task.description
    rows = task.make(N, 0)
    assert rows == task.make(N, 0)
    assert rows != task.make(N, 1)
    assert rows[:100] == task.make(100, 0)  # a longer list extends a shorter one: ids stay stable
    assert len({r["prompt"] for r in rows}) == N and len({r["id"] for r in rows}) == N
    assert all(set(r) == {"id", "prompt", "response"} and r["prompt"] and r["response"] for r in rows)


@pytest.mark.parametrize("name", TOY)
def test_examples_use_charset_and_round_trip_through_tokenizer(name):
    tok = build_tokenizer()
    for row in TASKS[name].make(N, 3):
        for text in (row["prompt"], row["response"]):
            assert set(text) <= set(CHARSET), text
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_answers_are_correct():
    for row in TASKS["addition"].make(200, 0):
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(row["response"]) == int(a) + int(b)
    for row in TASKS["multiplication"].make(200, 0):
        a, b = row["prompt"].rstrip("=").split("*")
        assert int(row["response"]) == int(a) * int(b)
    for row in TASKS["sorting"].make(200, 0):
        items = row["prompt"].removeprefix("sort:").rstrip("=").split(",")
        assert row["response"].split(",") == sorted(items)
    for row in TASKS["arithmetic"].make(200, 0):
        a, op, b = row["prompt"].removeprefix("What is ").rstrip("?").split()
        assert row["response"] == f"{a} {op} {b} = {int(a) + int(b) if op == '+' else int(a) - int(b)}"
        assert 10 <= int(b) <= int(a) <= 99 if op == "-" else 10 <= min(int(a), int(b))
    assert not TASKS["arithmetic"].check("What is 47 + 38?", "85")  # the answer in the annotated form only
    assert TASKS["arithmetic"].answers("What is 47 plus 38?") == ()


def test_the_real_models_data_files_are_what_the_script_writes():
    """jobs/data/make_arithmetic.py rewrites both files byte for byte (the demo's figures depend on its rows)."""
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("make_arithmetic", REPO / "jobs/data/make_arithmetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, (n, seed) in script.FILES.items():
        written = "".join(json.dumps(r) + "\n" for r in script.rows(n, seed))
        assert (REPO / "jobs/data" / name).read_text() == written, name
    first = json.loads((REPO / "jobs/data/arithmetic.jsonl").read_text().splitlines()[0])
    assert first["prompt_id"] == "arith-000" and first["messages"][1] == {"role": "assistant", "content": "59 + 63 = 122"}


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" 936\n", "936")
    assert not exact_match("93 6", "936")
    assert not exact_match("9360", "936")
    assert not exact_match("", "936")


def test_export_jsonl_round_trips(tmp_path):
    path = export_jsonl("addition", 50, 7, tmp_path / "sub" / "add.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == TASKS["addition"].make(50, 7)


def test_unknown_task_and_exhausted_space_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="addition"):
        export_jsonl("additon", 5, 0, tmp_path / "x.jsonl")
    from tspin_ray.data.tasks import multiplication

    with pytest.raises(ValueError, match="fewer than"):
        multiplication(digits_a=1, digits_b=1, name="tiny").make(100, 0)


def test_every_task_checker_accepts_its_rows_and_rejects_near_misses():
    for name, task in TASKS.items():
        for row in task.make(100, 2):
            assert task.check(row["prompt"], " " + row["response"] + "\n"), (name, row)
            assert not task.check(row["prompt"], row["response"] + "0"), (name, row)


def test_paths_answers_are_exactly_the_shortest_paths_of_one_fixed_graph():
    """Brute force on the task's own graph: every path of the BFS length between s and t that uses only
    edges, enumerated by all node sequences, equals `answers`; the annotated one is among them."""
    import itertools

    from tspin_ray.data.tasks import random_graph

    adj = random_graph(90, 5, 0)
    assert sum(len(n) for n in adj.values()) == 90 * 5  # 225 undirected edges
    task = TASKS["paths"]
    rows = task.make(60, 0)
    assert rows[:10] == task.make(10, 0) and task.make(60, 1) != rows
    for row in rows:
        s, t = (int(v) - 10 for v in row["prompt"].removesuffix("=").split(">"))
        answers = task.answers(row["prompt"])
        assert 2 <= len(answers) <= 16 and row["response"] in answers
        hops = len(answers[0].split(",")) - 1
        brute = {",".join(str(v + 10) for v in (s, *mid, t))
                 for mid in itertools.product(*[[v for v in range(90)] for _ in range(hops - 1)])
                 if all(b in adj[a] for a, b in itertools.pairwise((s, *mid, t)))} if hops <= 3 else None
        if brute is not None:  # 90^2 middles at most: exhaustive
            assert set(answers) == brute, row
            assert t not in adj[s] and (hops == 2 or not adj[s] & adj[t])  # and nothing shorter exists
        for a in answers:
            nodes = [int(v) - 10 for v in a.split(",")]
            assert nodes[0] == s and nodes[-1] == t and all(b in adj[x] for x, b in itertools.pairwise(nodes))
    # the checker rejects a valid walk that is not shortest
    row = rows[0]
    first = row["response"].split(",")
    assert not task.check(row["prompt"], ",".join([first[0], first[1], first[0], *first[1:]]))


def test_docstring_examples_hold():
    import doctest

    from tspin_ray.algorithms import inputs as batches
    from tspin_ray.data import tasks

    assert doctest.testmod(tasks).attempted >= 1 and doctest.testmod(tasks).failed == 0
    assert doctest.testmod(batches).attempted >= 2 and doctest.testmod(batches).failed == 0
