"""Built-in tasks: deterministic, distinct, correct answers, tokenizable, exported as JSONL."""

from __future__ import annotations

import json

import pytest

from tspin_ray.errors import UserError
from tspin_ray.modeling import CHARSET, build_tokenizer
from tspin_ray.tasks import TASKS, Task, exact_match, export_jsonl

N = 500


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


@pytest.mark.parametrize("name", sorted(TASKS))
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
    from tspin_ray.tasks import multiplication

    with pytest.raises(ValueError, match="fewer than"):
        multiplication(digits_a=1, digits_b=1, name="tiny").make(100, 0)
