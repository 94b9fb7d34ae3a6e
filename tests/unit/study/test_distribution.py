"""Distributional metrics (tspin_ray/study/distribution.py): hand values, and the exact figures agree with what
real samples show on a model trained to spread its answers.

    .venv/bin/pytest tests/unit/study/test_distribution.py
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from tspin_ray.data.tasks import TASKS
from tspin_ray.study import distribution
from tspin_ray.study.distribution import DistributionSpec, answer_set_metrics, tempered_logprobs


def test_docstring_example_holds():
    assert doctest.testmod(distribution, extraglobs={"math": math}).failed == 0


def test_uniform_over_the_answers_has_zero_kl_both_ways():
    m = answer_set_metrics([math.log(0.25)] * 4, 16)
    assert m["validity"] == pytest.approx(1.0) and m["kl_uniform_model"] == pytest.approx(0.0, abs=1e-12)
    assert m["kl_model_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert m["coverage"] == pytest.approx(1 - 0.75**16)
    # all mass on one of 4 answers: KL(q||U) = log 4 whatever the invalid mass; KL(U||p) grows without bound
    one = answer_set_metrics([math.log(0.6), -50.0, -50.0, -50.0], 16)
    assert one["kl_model_uniform"] == pytest.approx(math.log(4), abs=1e-9)
    assert one["kl_uniform_model"] == pytest.approx(-math.log(4) - (math.log(0.6) - 150) / 4)
    assert one["validity"] == pytest.approx(0.6) and one["coverage"] == pytest.approx((1 - 0.4**16) / 4)


@pytest.mark.parametrize("family", ["char", "llama3"])
def test_tempered_logprobs_are_the_sampling_distribution(family, tiny_ckpt, family_ckpt):
    """At T = 1 they equal the engines' scoring; at T = 2 they equal a hand log_softmax(logits / 2)."""
    from tspin_ray.workers.engines import HFEngine

    path = tiny_ckpt if family == "char" else family_ckpt(family, 0)
    engine = HFEngine(str(path))
    fmt, task = engine.format, TASKS["paths"]
    rows = task.make(4, 0)
    prompts = [fmt.prompt_ids(r["prompt"]) for r in rows]
    answers = [fmt.response_ids(r["prompt"], r["response"]) for r in rows]
    lp = tempered_logprobs(engine.model, prompts, answers, (1.0, 2.0), fmt.pad_id)
    np.testing.assert_allclose(lp[0], engine.score(prompts, answers), atol=1e-4)
    with torch.no_grad():
        ids = torch.tensor([prompts[0] + answers[0]])
        logits = engine.model(input_ids=ids).logits[0, len(prompts[0]) - 1:-1].double()
        hand = torch.log_softmax(logits / 2, -1).gather(-1, torch.tensor(answers[0])[:, None]).sum()
    assert lp[1, 0] == pytest.approx(float(hand), abs=1e-4)


def test_exact_metrics_agree_with_real_samples(tiny_ckpt, tmp_path):
    """A tiny model trained on two valid answers of each of 24 prompts spreads its mass over them: the
    exact validity and coverage equal the sampled ones within sampling noise, at two temperatures."""
    from tspin_ray.algorithms.logprobs import sequence_logprobs
    from tspin_ray.models.checkpoints import load_format, load_model
    from tspin_ray.workers.engines import HFEngine

    task, fmt = TASKS["paths"], load_format(tiny_ckpt)
    prompts = [r["prompt"] for r in task.make(24, 0)]
    pairs = [(p, a) for p in prompts for a in task.answers(p)[:2]]
    model = load_model(tiny_ckpt)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    px, ry = [fmt.prompt_ids(p) for p, _ in pairs], [fmt.response_ids(p, a) for p, a in pairs]
    for _ in range(150):
        loss = -sequence_logprobs(model, px, ry, fmt.pad_id).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "pi", safe_serialization=True)
    fmt.tokenizer.save_pretrained(tmp_path / "pi")
    spec = DistributionSpec(temperatures=(0.7, 1.0), samples=48, prompts=24, max_new_tokens=24)
    engine = HFEngine(str(tmp_path / "pi"))
    exact = distribution.exact_metrics(engine.model, engine.format, task, prompts, spec)
    sampled = distribution.sampled_metrics(engine, task, prompts, spec)
    assert min(exact["validity"]) > 0.3, exact  # trained: the check below is not vacuous
    for j in range(2):
        # 24 x 48 samples: the std of the validity estimate is below 0.015
        assert sampled["sampled_validity"][j] == pytest.approx(exact["validity"][j], abs=0.06)
        assert sampled["sampled_coverage"][j] == pytest.approx(exact["coverage"][j], abs=0.08)
    assert exact["validity"][0] > exact["validity"][1]  # colder sampling: less mass off the answers
    # two of |V| answers learnt per prompt, about evenly: coverage ~ 2/|V|, KL(q||U) ~ log(|V|/2)
    sizes = [len(task.answers(p)) for p in prompts]
    assert exact["coverage"][1] == pytest.approx(np.mean([2 / v for v in sizes]), abs=0.05)
    assert exact["kl_model_uniform"][1] == pytest.approx(np.mean([math.log(v / 2) for v in sizes]), abs=0.1)
    # The generation stage marks the same model's samples with the checker's verdict (what RFT keeps)
    from tspin_ray.data.loading import Example
    from tspin_ray.rollout.phases import GenPhase, prompt_rows
    from tspin_ray.workers.generation_stage import GenerateStage

    stage = GenerateStage(GenPhase(model_path=str(tmp_path / "pi"), iteration=0, samples=4, max_new_tokens=24,
                                   max_length=72, task="paths"))
    table = prompt_rows([Example(f"p{i}", p, task.answers(p)[0]) for i, p in enumerate(prompts)], 0)
    # numpy columns as Ray Data hands them over (a 1-D object array even where every row is a list)
    out = stage({k: np.array(v + [None], dtype=object)[:-1] for k, v in table.to_pydict().items()})
    flags = [f for fs in out["generated_valid"] for f in fs]
    assert 0 < sum(flags) < len(flags) == 96  # both kinds occur: the check below is not vacuous
    for p, texts, ids, fs in zip(prompts, out["generated"], out["generated_ids"], out["generated_valid"], strict=True):
        assert fs == [t.strip() in task.answers(p) and i == engine.format.response_ids(p, t.strip())
                      for t, i in zip(texts, ids, strict=True)]
