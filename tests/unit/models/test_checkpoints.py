"""Tiny model + character tokenizer: chat format, round trips, save/load (HF and vLLM), safe loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tspin_ray.config.schema import TinyModelSpec
from tspin_ray.errors import UserError
from tspin_ray.models.chat_format import PLAIN_TEMPLATE, chat_format
from tspin_ray.models.checkpoints import load_model, load_tokenizer
from tspin_ray.models.tiny import CHARSET, build_tiny_model, build_tokenizer, save_tiny

SPEC = TinyModelSpec()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), SPEC)


def test_chat_template_renders_user_turn_ending_in_assistant_tag():
    tok = build_tokenizer()
    user = [{"role": "user", "content": "12+34="}]
    assert tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == "<|user|>12+34=<|assistant|>"
    full = user + [{"role": "assistant", "content": "46"}]
    assert tok.apply_chat_template(full, tokenize=False) == "<|user|>12+34=<|assistant|>46</s>"


def test_special_tokens_are_single_ids_and_set():
    tok = build_tokenizer()
    for special in ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_every_character_is_one_token_and_round_trips():
    tok = build_tokenizer()
    ids = tok(CHARSET, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(CHARSET) and tok.unk_token_id not in ids
    for text in ["347+589=", "sort:d,a,c=", "a  b\n(1)[2]<3>?/.:*-"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_formatting_prompt_response_and_decode():
    fmt = chat_format(build_tokenizer())
    tok = fmt.tokenizer
    assert fmt.render("12+34=") == "<|user|>12+34=<|assistant|>"
    assert tok.decode(fmt.prompt_ids("12+34=")) == "<|user|>12+34=<|assistant|>"
    ids = fmt.response_ids("12+34=", "46")
    assert ids[-1] == tok.eos_token_id and len(ids) == 3
    assert fmt.response_ids("12+34=", "4600", max_tokens=3) == ids[:2] + tok("0", add_special_tokens=False)["input_ids"]
    assert fmt.decode(ids + tok("99", add_special_tokens=False)["input_ids"] + [tok.pad_token_id]) == "46"
    assert (fmt.stop_ids, fmt.pad_id, fmt.bos_id) == ((tok.eos_token_id,), tok.pad_token_id, None)
    tok.chat_template = None
    assert chat_format(tok).render("hi") == PLAIN_TEMPLATE.format(prompt="hi")


def test_tiny_model_is_deterministic_in_seed():
    tok = build_tokenizer()
    a, b = build_tiny_model(SPEC, tok), build_tiny_model(SPEC, tok)
    c = build_tiny_model(TinyModelSpec(seed=1), tok)
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_save_tiny_loads_with_auto_classes_and_safe_loaders(tiny_dir):
    assert list(tiny_dir.glob("*.safetensors")) and not list(tiny_dir.glob("*.bin"))
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert chat_format(tok).render("1+2=") == "<|user|>1+2=<|assistant|>"
    auto = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    model = load_model(tiny_dir)
    expected = build_tiny_model(SPEC, build_tokenizer())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
        assert torch.equal(auto.state_dict()[name], tensor), name
    assert load_tokenizer(tiny_dir).decode(chat_format(tok).prompt_ids("1+2=")) == "<|user|>1+2=<|assistant|>"


def test_loaders_give_one_line_user_errors(tmp_path, tiny_dir):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(UserError, match="safetensors") as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # vLLM == HF on tiny checkpoints: tests/unit/workers/test_engines.py, by default
def test_vllm_loads_tiny_and_agrees_with_hf(tiny_dir):
    """In a subprocess: the vLLM CPU engine binds threads and would slow the rest of the suite."""
    pytest.importorskip("vllm")
    fmt = chat_format(build_tokenizer())
    prompts = [fmt.prompt_ids("12+34=") + fmt.response_ids("12+34=", "46"), fmt.prompt_ids("sort:c,a=")]
    script = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(tiny_dir)!r}, dtype="float32", seed=0, enforce_eager=True)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate([{{"prompt_token_ids": p}} for p in {prompts!r}], params)
        print("RESULT" + json.dumps([[list(o.outputs[0].token_ids),
                                      [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]]
                                     for o, p in zip(outs, {prompts!r})]))
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT")[-1])
    model = load_model(tiny_dir)
    for prompt, (tokens, prompt_logprobs) in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt])
        out = model.generate(ids, do_sample=False, max_new_tokens=4, min_new_tokens=4)
        assert out[0, len(prompt):].tolist() == tokens
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(logp, torch.tensor(prompt_logprobs), atol=1e-3)
