"""lm-evaluation-harness per iterate (eval.lm_eval): tasks shipped or exported here, nothing fetched.

    .venv/bin/pytest tests/unit/evaluation/test_harness.py -q
"""

from __future__ import annotations

import json

import pytest

from tspin_ray.config.schema import LmEvalSpec, from_dict
from tspin_ray.data.loading import Example
from tspin_ray.errors import UserError

pytest.importorskip("lm_eval")

from tspin_ray.evaluation.harness import check_tasks, export_task, flatten, scores  # noqa: E402


def test_flatten_names_task_and_metric_and_keeps_numbers_only():
    results = {"tspin_heldout": {"alias": "tspin_heldout", "sample_len": 8, "exact_match,none": 0.25,
                                 "exact_match_stderr,none": "N/A"},
               "arith": {"acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0}}
    assert flatten(results) == {"eval/lm_eval/tspin_heldout/exact_match": 0.25, "eval/lm_eval/arith/acc": 0.5,
                                "eval/lm_eval/arith/acc_stderr": 0.1,
                                "eval/lm_eval/arith/exact_match_strict-match": 1.0}


def _half_right(path, fmt, engine, tmp_path):
    """Eight held-out rows whose y is the policy's own greedy answer for rows 0, 2, 4, 6 and a wrong one
    for the others: the harness must score exactly 0.5 if it renders prompts as training does."""
    prompts = [f"{a}+{a + 7}=" for a in range(11, 19)]
    greedy = engine.generate([fmt.prompt_ids(p) for p in prompts], list(range(8)), max_new_tokens=8,
                             temperature=0.0, top_p=1.0)
    examples = []
    for i, (p, g) in enumerate(zip(prompts, greedy, strict=True)):
        text = fmt.decode(g)
        examples.append(Example(f"r{i}", p, text if i % 2 == 0 else text + "9x"))
    return export_task(examples, tmp_path / "tasks", max_gen_toks=8)


@pytest.mark.parametrize("which", ["char", "llama3-adapter"])
def test_exported_task_scores_what_the_policy_generates(tiny_ckpt, family_ckpt, tmp_path, which):
    from tests.helpers.lora import make_adapter
    from tspin_ray.models.checkpoints import load_format
    from tspin_ray.workers.engines import make_engine

    path = tiny_ckpt if which == "char" else make_adapter(family_ckpt("llama3", 0), tmp_path / "adapter", seed=3)
    fmt = load_format(path)
    task = _half_right(path, fmt, make_engine("hf", str(path)), tmp_path)
    rows = [json.loads(line) for line in task.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["id"] == "r0"
    got = scores(path, LmEvalSpec(tasks=["tspin_heldout"], backend="hf", batch_size=4), dtype="float32",
                 trust_remote_code=False, include_path=[str(task.parent)], seed=0)
    assert got == {"eval/lm_eval/tspin_heldout/exact_match": 0.5}


def test_a_shipped_task_scores_the_choices_the_policy_prefers(tiny_ckpt, monkeypatch):
    """tests/lm_eval_tasks/tiny_sums (multiple choice, its data beside it): the harness's accuracy is the
    fraction of questions whose gold answer has the highest log-likelihood, computed here independently
    from the prompt as the chat template renders it and the choice's own tokens."""
    import torch

    from tests.helpers import REPO
    from tspin_ray.algorithms.logprobs import sequence_logprobs
    from tspin_ray.models.checkpoints import load_format, load_model

    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    fmt, model = load_format(tiny_ckpt), load_model(tiny_ckpt).eval()
    docs = [json.loads(line) for line in (REPO / "tests/lm_eval_tasks/tiny_sums.jsonl").read_text().splitlines()]
    hits = []
    with torch.no_grad():
        for d in docs:
            prompt = fmt.prompt_ids(d["question"])
            choices = [fmt.tokenizer(c, add_special_tokens=False)["input_ids"] for c in d["choices"]]
            lps = sequence_logprobs(model, [prompt] * len(choices), choices, fmt.pad_id).tolist()
            hits.append(max(range(len(lps)), key=lps.__getitem__) == d["gold"])
    got = scores(tiny_ckpt, LmEvalSpec(tasks=["tiny_sums"], backend="hf", batch_size=6), dtype="float32",
                 trust_remote_code=False, include_path=[str(REPO / "tests/lm_eval_tasks")], seed=0)
    assert got["eval/lm_eval/tiny_sums/acc"] == pytest.approx(sum(hits) / len(hits))


def test_unknown_task_and_missing_harness_are_one_line_errors(tmp_path, monkeypatch):
    export_task([Example("a", "1+1=", "2")], tmp_path, name="tiny_add")
    check_tasks(LmEvalSpec(tasks=["tiny_add", "tspin_heldout"], include_path=str(tmp_path)))
    with pytest.raises(UserError, match=r"eval.lm_eval.tasks: no harness task 'tiny_ad' \(did you mean 'tiny_add'\?\)"):
        check_tasks(LmEvalSpec(tasks=["tiny_ad"], include_path=str(tmp_path)))
    with pytest.raises(UserError, match=r"eval.lm_eval.include_path: .*nowhere is not a directory"):
        check_tasks(LmEvalSpec(tasks=["tiny_add"], include_path=str(tmp_path / "nowhere")))
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"needs lm-evaluation-harness: pip install -e .\[eval\]"):
        check_tasks(LmEvalSpec(tasks=["tspin_heldout"]))


@pytest.mark.slow  # the default suite runs the harness inside a run in tests/unit/models/test_lora.py (LoRA iterates)
def test_a_run_logs_harness_scores_for_every_checkpoint(ray_session, tmp_path):
    """One T-SPIN iteration with eval.lm_eval on the run's own held-out rows: pi_0 and pi_1 get a score in
    metrics.jsonl, TensorBoard and the report, equal to the run's own greedy exact match on those rows."""
    from tests.helpers import small_config
    from tests.helpers.lora import check_harness_outputs
    from tspin_ray.controller.driver import train

    raw = small_config(tmp_path, iterations=1, eval={"max_new_tokens": 6, "size": 8,
                                                    "lm_eval": {"tasks": ["tspin_heldout"], "batch_size": 8}})
    train(from_dict(raw), quiet=True)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    its = {r["iteration"]: r for r in rows if r["phase"] == "iteration"}
    key = "eval/lm_eval/tspin_heldout/exact_match"
    assert sorted(its) == [-1, 0]
    for r in its.values():
        assert r[key] == pytest.approx(r["eval/exact_match"]) and r["timing/lm_eval"] > 0
    check_harness_outputs(run)
