"""A family run's config, and what its run directory must hold (ids in context, BOS once, end of turn)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import small_config
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.prepare import prepare
from tspin_ray.models.chat_format import response_budget
from tspin_ray.models.checkpoints import load_format, load_model
from tspin_ray.rollout.shards import read_shards

# smollm2: the real model (tests/e2e/test_real_runs.py); its BOS is <|im_start|>, which its ChatML template
# writes at each of the prompt's three turns (system, user, assistant)
END_OF_TURN = {"char": "</s>", "zephyr": "</s>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "smollm2": "<|im_end|>"}
BOS_IN_PROMPT = {"char": 0, "zephyr": 1, "llama3": 1, "qwen2": 0, "smollm2": 3}
TIED = {"char": False, "zephyr": False, "llama3": True, "qwen2": True, "smollm2": True}


def in_context(tok, family: str, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt and y ids written out independently of tspin_ray.models.chat_format: the rendered prompt and the
    rendered conversation, tokenized without special tokens; Zephyr's post-processor BOS added by hand;
    y = what follows the prompt, through the family's end-of-turn token."""
    user = [{"role": "user", "content": prompt}]
    head = tok(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    full = tok(tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False),
               add_special_tokens=False)
    bos = [tok.bos_token_id] if family == "zephyr" else []
    head, full = bos + head["input_ids"], bos + full["input_ids"]
    tail = full[len(head):]
    end = tok.convert_tokens_to_ids(END_OF_TURN[family])
    return head, tail[:tail.index(end) + 1]


def family_config(tmp_path, family: str, objective: str, engine: str, zero: int, sync: str) -> dict:
    """sync: phase (a generator pool per phase), reload or broadcast (long-lived generators)."""
    extra = {"mu": 2} if objective == "space" else {}
    generation = {"backend": engine, "batch_size": 16, "max_new_tokens": 8}
    if sync != "phase":
        generation.update(persistent=True, weight_sync={"reload": "checkpoint"}.get(sync, sync))
    return small_config(
        tmp_path, model={"tiny": {"family": family, "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                                  "intermediate_size": 128}},
        data={"task": "addition", "task_size": 120, "eval_size": 16},
        objective={"name": objective, **extra}, generation=generation,
        # Qwen2.5's default system prompt makes its prompts ~60 tokens long.
        training={"backend": "deepspeed", "zero_stage": zero, "max_length": 112},
        sft={"epochs": 1, "micro_batch_size": 16}, eval={"max_new_tokens": 8}, resources={"trainers": 2 if zero == 3 else 1,
                                                                   "trainer_cpus": 0.5})


def check_run(run, raw: dict, family: str | None = None) -> None:
    """The invariants of real checkpoints, read back from a finished run directory (`family` for a
    checkpoint that is not a tiny one)."""
    cfg = from_dict(raw)
    prep = prepare(cfg)
    family, max_length = family or cfg.model.tiny.family, cfg.training.max_length
    pi0 = json.loads((run / "manifest.json").read_text())["entries"]["pi_0"]["path"]
    fmt = load_format(run / pi0)  # the SFT stage's checkpoint, or an external model.path (absolute)
    examples = {e.prompt_id: e for e in prep.train}
    limit = cfg.generation.max_new_tokens
    for t in range(cfg.iterations) if cfg.objective.name != "sft" else []:
        rows = read_shards(run / "generations" / f"iter_{t}").to_pylist()
        assert {r["prompt_id"] for r in rows} == set(examples)
        for r in rows:
            e = examples[r["prompt_id"]]
            prompt = fmt.prompt_ids(e.prompt, e.system)
            budget = response_budget(len(prompt), cfg.data.max_response_tokens, max_length)
            head, y = in_context(fmt.tokenizer, family, e.prompt, e.response)
            assert r["prompt_ids"] == prompt == head
            assert prompt.count(fmt.tokenizer.bos_token_id or -1) == BOS_IN_PROMPT[family]
            assert r["real_ids"] == y[:budget]
            assert r["real_ids"][-1] == fmt.end_of_turn or len(r["real_ids"]) == budget
            for g, text in zip(r["generated_ids"] + r["proto_ids"], r["generated"] + [None] * len(r["proto_ids"]),
                               strict=True):
                ended = g[-1] in fmt.stop_ids
                assert ended or len(g) == min(budget, limit)  # an end of turn, or cut by a length limit
                assert not set(g[:-1]) & set(fmt.stop_ids)  # nothing after the first end of turn
                assert len(prompt) + len(g) <= max(max_length, len(prompt) + 1)
                if text is not None and text == e.response and ended:
                    assert g == r["real_ids"]  # y' that equals y is y, token for token
            if cfg.objective.name in ("spin", "space"):
                assert math.isfinite(r["ref_real"]) and all(math.isfinite(x) for x in r["ref_generated"])
    final = load_model(run / "checkpoints" / f"pi_{cfg.iterations}")
    assert final.config.tie_word_embeddings == TIED[family]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in metrics if r["phase"] == "iteration"] == [-1, *range(cfg.iterations)]
    if cfg.objective.name == "spin":  # lp_ref from the generator equals the trainer's lp at the first step
        first = next(r for r in metrics if r["phase"] == "train" and r["iteration"] == 0)
        assert first["loss"] == pytest.approx(math.log(2), abs=2e-3)
    if cfg.generation.persistent and cfg.objective.name != "sft":  # every sync was checked against the trainers
        gaps = [r["sync/probe_gap"] for r in metrics if r["phase"] == "iteration" and r["iteration"] >= 0]
        assert len(gaps) == cfg.iterations and max(gaps) < 1e-3, gaps
