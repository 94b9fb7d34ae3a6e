"""Distributional metrics on a task whose valid answers can be enumerated (tasks.paths): how a checkpoint
spreads its probability over the valid answers, across sampling temperatures, beside exact match.

    .venv/bin/pytest tests/unit/study/test_distribution.py
    tspin-ray study --config jobs/study-paths.yaml      (every checkpoint of every run)

With V(x) the valid answers of prompt x and p_T(v|x) the probability that sampling at temperature T
(softmax(logits / T) token by token, no top-p) writes exactly v and its end of turn, per prompt:

    validity     m       = sum_v p_T(v)                          probability that one sample is valid
    coverage     c_N     = mean_v 1 - (1 - p_T(v))^N             expected share of V among N samples
    forward KL   KL(U||p) = -log|V| - mean_v log p_T(v)          U uniform on V; infinite when p misses a v
    reverse KL   KL(q||U) = sum_v q(v) log(q(v) |V|), q = p_T/m  on the valid answers (p's invalid mass
                                                                   makes the plain KL(p||U) infinite)

All four are exact: each v is scored once (teacher forcing), no sampling noise. `sampled` adds what N
real samples per prompt show (share valid, distinct valid answers / |V|), which estimates m and c_N and
also counts a valid answer written with other token ids (possible with BPE tokenizers, never with the
character model), so sampled validity can exceed m there. Caccia et al. (arXiv 1811.02549): tuning the
temperature alone often closes quality/diversity gaps, so methods are compared over the whole sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tspin_ray.algorithms.logprobs import pad_batch
from tspin_ray.controller.prepare import prepare
from tspin_ray.data.tasks import get_task
from tspin_ray.rollout.seeds import derive_seed
from tspin_ray.rundir.store import write_atomic
from tspin_ray.workers.engines import HFEngine


@dataclasses.dataclass(frozen=True)
class DistributionSpec:
    """What to measure: temperatures, samples per prompt (0: exact metrics only; also the N of the exact
    coverage, 16 when 0), prompts per split."""
    temperatures: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    samples: int = 16
    prompts: int = 200
    max_new_tokens: int = 32
    seed: int = 0

    @property
    def coverage_n(self) -> int:
        return self.samples or 16

    def __post_init__(self):
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError("distribution.temperatures: a non-empty list of temperatures > 0")
        if self.samples < 0 or self.prompts < 1 or self.max_new_tokens < 1:
            raise ValueError("distribution: samples >= 0, prompts >= 1 and max_new_tokens >= 1")


def answer_set_metrics(logps: Sequence[Sequence[float]], n: int) -> dict[str, float]:
    """The exact metrics of one prompt from log p_T(v) of each valid answer v (see the module docstring).

    Two valid answers with p = 0.5 and 0.25 (m = 0.75), N = 2:
    coverage = (1 - 0.5^2 + 1 - 0.75^2) / 2 = 0.59375; KL(U||p) = -log 2 - (log 0.5 + log 0.25) / 2
    = 0.3466; q = (2/3, 1/3): KL(q||U) = 2/3 log(4/3) + 1/3 log(2/3) = 0.0566.

    >>> {k: round(v, 4) for k, v in answer_set_metrics([math.log(0.5), math.log(0.25)], 2).items()}
    {'validity': 0.75, 'coverage': 0.5938, 'kl_uniform_model': 0.3466, 'kl_model_uniform': 0.0566}
    """
    lp = np.asarray(logps, dtype=np.float64)
    p = np.exp(lp)
    log_m = float(np.logaddexp.reduce(lp))
    log_q = lp - log_m  # in log space: q stays exact when every p underflows
    reverse = float(np.sum(np.exp(log_q) * (log_q + math.log(len(p)))))
    return {"validity": float(p.sum()), "coverage": float(np.mean(-np.expm1(n * np.log1p(-np.minimum(p, 1.0))))),
            "kl_uniform_model": float(-math.log(len(p)) - lp.mean()), "kl_model_uniform": reverse}


@torch.no_grad()
def tempered_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                      temperatures: Sequence[float], pad_id: int, batch: int = 256) -> np.ndarray:
    """[len(temperatures), n] summed log-probs of each response under softmax(logits / T), one forward
    per sequence for all temperatures."""

    out = np.zeros((len(temperatures), len(prompt_ids)))
    device = next(model.parameters()).device
    for start in range(0, len(prompt_ids), batch):
        ids, mask, scored = pad_batch(prompt_ids[start:start + batch], response_ids[start:start + batch], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logits, targets, keep = logits[:, :-1], ids[:, 1:].to(device), scored[:, 1:].to(device)
        for j, t in enumerate(temperatures):
            lp = torch.log_softmax(logits / t, dim=-1).gather(-1, targets[..., None])[..., 0]
            out[j, start:start + len(ids)] = (lp * keep).sum(-1).double().cpu().numpy()
    return out


def exact_metrics(model, fmt, task, prompts: Sequence[str], spec: DistributionSpec) -> dict[str, list[float]]:
    """Per temperature, the exact metrics averaged over `prompts` (and mean |V|)."""
    answers = [task.answers(p) for p in prompts]
    flat_p = [fmt.prompt_ids(p) for p, vs in zip(prompts, answers, strict=True) for _ in vs]
    flat_r = [fmt.response_ids(p, v) for p, vs in zip(prompts, answers, strict=True) for v in vs]
    lp = tempered_logprobs(model, flat_p, flat_r, spec.temperatures, fmt.pad_id)
    out: dict[str, list[float]] = {}
    for j in range(len(spec.temperatures)):
        at, per_prompt = 0, []
        for vs in answers:
            per_prompt.append(answer_set_metrics(lp[j, at:at + len(vs)], spec.coverage_n))
            at += len(vs)
        for key in per_prompt[0]:
            out.setdefault(key, []).append(float(np.mean([m[key] for m in per_prompt])))
    out["answers_per_prompt"] = [float(np.mean([len(vs) for vs in answers]))] * len(spec.temperatures)
    return out


def sampled_metrics(engine, task, prompts: Sequence[str], spec: DistributionSpec) -> dict[str, list[float]]:
    """Per temperature: the share of N samples per prompt that are valid, and the distinct valid answers
    among them over |V| (means over prompts); samples seeded per (seed, temperature, prompt, sample)."""

    fmt, n = engine.format, spec.samples
    ids = [fmt.prompt_ids(p) for p in prompts]
    out: dict[str, list[float]] = {"sampled_validity": [], "sampled_coverage": []}
    for t in spec.temperatures:
        outs = engine.generate([i for i in ids for _ in range(n)],
                               [derive_seed(spec.seed, "distribution", t, p, s) for p in prompts for s in range(n)],
                               max_new_tokens=spec.max_new_tokens, temperature=t, top_p=1.0)
        valid, cover = [], []
        for k, p in enumerate(prompts):
            texts = [fmt.decode(o).strip() for o in outs[k * n:(k + 1) * n]]
            good = set(task.answers(p))
            valid.append(sum(x in good for x in texts) / n)
            cover.append(len(good & set(texts)) / len(good))
        out["sampled_validity"].append(float(np.mean(valid)))
        out["sampled_coverage"].append(float(np.mean(cover)))
    return out


def evaluate(path, task, splits: dict[str, Sequence[str]], spec: DistributionSpec, sample: bool = True) -> dict:
    """Every metric of the checkpoint at `path` on each split's first `spec.prompts` prompts:
    {"temperatures": [...], split: {metric: [value per temperature]}}; sample=False: the exact ones only."""

    engine = HFEngine(str(path))  # its model scores too: one load per checkpoint
    result: dict = {"temperatures": list(spec.temperatures), "samples": spec.samples}
    for name, prompts in splits.items():
        prompts = list(prompts)[:spec.prompts]
        metrics = exact_metrics(engine.model, engine.format, task, prompts, spec)
        if spec.samples and sample:
            metrics.update(sampled_metrics(engine, task, prompts, spec))
        result[name] = {**metrics, "prompts": len(prompts)}
    return result


def evaluate_run(root, cfg, spec: DistributionSpec, first: int = 0) -> bool:
    """Score checkpoints pi_first .. pi_{iterations} of the finished run at `root` on its held-out prompts
    (`heldout`) and its own annotated training prompts (`train`), into root/distribution.json, one
    checkpoint at a time (a resumed study scores only what is missing; another spec starts over). Only
    the final checkpoint is also sampled (the study's tables read final iterates; sampling is most of
    the cost). Returns whether anything was scored."""

    path = Path(root) / "distribution.json"
    key = json.loads(json.dumps(dataclasses.asdict(spec)))
    old = json.loads(path.read_text()) if path.exists() else {}
    done = old.get("checkpoints", {}) if old.get("spec") == key else {}
    todo = [f"pi_{t}" for t in range(first, cfg.iterations + 1) if f"pi_{t}" not in done]
    if not todo:
        return False
    prep = prepare(cfg)
    splits = {"heldout": [e.prompt for e in prep.eval], "train": [e.prompt for e in prep.train]}
    for name in todo:
        done[name] = evaluate(Path(root) / "checkpoints" / name, get_task(cfg.data.task), splits, spec,
                              sample=name == f"pi_{cfg.iterations}")
        write_atomic(path, json.dumps({"spec": key, "checkpoints": done}, indent=1).encode())
    return True
