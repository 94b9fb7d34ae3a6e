"""LoRA through peft: trainers that train only adapters, adapter iterates on disk, engines that serve them.

    .venv/bin/pytest tests/unit/models/test_lora.py -q
"""

from __future__ import annotations

import json

import pytest
import ray
import torch
from safetensors.torch import load_file

from tests.helpers.lora import SPEC, check_harness_outputs, make_adapter
from tests.helpers.trainers import BEGIN
from tests.helpers.trainers import addition_rows as rows  # 8 addition rows with y, y' and y0 in context
from tspin_ray.algorithms.inputs import batch_logprobs
from tspin_ray.algorithms.logprobs import sequence_logprobs
from tspin_ray.algorithms.objectives import OBJECTIVES, tspin
from tspin_ray.config.schema import from_dict
from tspin_ray.errors import UserError
from tspin_ray.models.checkpoints import base_of, check_checkpoint, is_adapter, load_format, load_model
from tspin_ray.models.lora import wrap
from tspin_ray.workers.records import OptimizerSetup
from tspin_ray.workers.trainer_rank import start_trainers


@pytest.fixture(scope="module")
def llama3(family_ckpt):
    return family_ckpt("llama3", 0)  # tied embeddings, GQA, byte-level BPE: a real family's shape


@pytest.fixture(scope="module")
def adapters(llama3, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(llama3, root / f"a{i}", seed=i) for i in (1, 2)]


def test_an_adapter_directory_is_a_checkpoint_of_its_base(llama3, adapters, tmp_path):
    assert is_adapter(adapters[0]) and not is_adapter(llama3)
    assert base_of(adapters[0]) == llama3.resolve()
    check_checkpoint(adapters[0])
    assert load_format(adapters[0]).stop_ids == load_format(llama3).stop_ids
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    (broken / "adapter_model.safetensors").write_bytes((adapters[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"broken/adapter_config.json: its base .*gone is not a local HF checkpoint"):
        check_checkpoint(broken)


def test_a_fresh_adapter_changes_nothing_and_is_the_same_on_every_rank(llama3):
    a, b = wrap(load_model(llama3), SPEC, llama3), wrap(load_model(llama3), SPEC, llama3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # seeded: ranks need no broadcast of A
    trained = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    batch = rows(llama3)
    with torch.no_grad():
        got = sequence_logprobs(a, [r["prompt_ids"] for r in batch], [r["real_ids"] for r in batch], 0)
        want = sequence_logprobs(load_model(llama3), [r["prompt_ids"] for r in batch], [r["real_ids"] for r in batch], 0)
    assert torch.equal(got, want)


def _reference_adapter_step(adapter, batch) -> dict[str, torch.Tensor]:
    """The step by hand in this process: peft's model, mean T-SPIN loss, AdamW on the adapter only."""
    from peft import get_peft_model_state_dict

    model = load_model(adapter, trainable_adapter=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    inputs = batch_logprobs(model, {k: [r[k] for r in batch] for k in batch[0]}, OBJECTIVES["tspin"], {"beta": 0.1}, pad_id=0)
    tspin(**inputs, alpha=1.0, beta=0.1)[0].mean().backward()
    opt.step()
    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("backend,world,zero", [("deepspeed", 2, 3),
                                               pytest.param("torch", 1, 0, marks=pytest.mark.slow)])
def test_adapter_step_equals_a_single_process_peft_step(ray_session, llama3, adapters, tmp_path, backend, world, zero):
    """ZeRO-3 shards base and adapter over 2 ranks; the exported adapter equals peft's own step to 1e-6
    (fp32), the base weights are not touched, and the export is peft's format with pi_0 as its base."""
    batch = rows(llama3)
    want = _reference_adapter_step(adapters[0], batch)
    actors = start_trainers(world, backend, zero, options={"num_cpus": 0.5})
    ray.get([a.load.remote(str(adapters[0]), False, SPEC) for a in actors])
    ray.get([a.begin.remote(OptimizerSetup(**BEGIN)) for a in actors])
    its = ray.data.from_items(batch).streaming_split(world, equal=True)
    records = ray.get([a.train_epoch.remote(it) for a, it in zip(actors, its, strict=True)])
    # merge_export too: under ZeRO-3 rank 0 merges alone, from the files, outside zero.Init
    ray.get([a.export.remote(str(tmp_path / "out"), merged=str(tmp_path / "merged")) for a in actors])
    for a in actors:
        ray.kill(a)
    assert [len(r) for r in records] == [1] * world
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    before = load_file(adapters[0] / "adapter_model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
        assert not torch.equal(got[k], before[k]), k  # the step moved every adapter tensor
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama3.resolve()) and config["r"] == 4
    assert not list((tmp_path / "out").glob("model*.safetensors"))  # megabytes, not the model
    with torch.no_grad():
        merged = sequence_logprobs(load_model(tmp_path / "merged"), [batch[0]["prompt_ids"]], [batch[0]["real_ids"]], 0)
        peft = sequence_logprobs(load_model(tmp_path / "out"), [batch[0]["prompt_ids"]], [batch[0]["real_ids"]], 0)
    torch.testing.assert_close(merged, peft, atol=1e-4, rtol=1e-5)


def test_merged_export_loads_alone_and_equals_base_plus_adapter(adapters, tmp_path):
    from tspin_ray.models.lora import merge

    merge(adapters[0], tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file() and not is_adapter(tmp_path / "merged")
    batch = rows(adapters[0])
    prompts, ys = [r["prompt_ids"] for r in batch], [r["real_ids"] for r in batch]
    with torch.no_grad():
        merged = sequence_logprobs(load_model(tmp_path / "merged"), prompts, ys, 0)
        peft = sequence_logprobs(load_model(adapters[0]), prompts, ys, 0)
    torch.testing.assert_close(merged, peft, atol=1e-4, rtol=1e-5)


def _merged(adapter, out):
    from tspin_ray.models.lora import merge

    merge(adapter, out)
    return load_model(out).eval()


def _greedy(model, prompts, n: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_engines_serve_each_adapter_as_the_merged_model(llama3, adapters, tiny_ckpt, tmp_path, backend):
    """An engine started on the base (LoRA enabled, no adapter yet) reloads adapter 1, then adapter 2 (a
    new vLLM adapter id): greedy samples and response log-probs equal HF's model of the base, then the
    merged model of each adapter (never stale)."""
    from tspin_ray.workers.engines import make_engine

    fmt = load_format(llama3)
    prompts = [fmt.prompt_ids(f"{a}+{a * 3}=") for a in (12, 345, 7)]
    engine = make_engine(backend, str(llama3), lora_rank=4, max_model_len=128, seed=0)
    for i, adapter in enumerate([None, *adapters]):  # iteration 0 serves the base with LoRA enabled
        if adapter is None:
            merged = load_model(llama3).eval()
        else:
            engine.reload(str(adapter))
            merged = _merged(adapter, tmp_path / f"m{i}")
        got = engine.generate(prompts, [0, 1, 2], max_new_tokens=6, temperature=0.0, top_p=1.0)
        want = [fmt.cut(g) for g in _greedy(merged, prompts, 6)]
        assert got == want
        responses = [w or [fmt.end_of_turn] for w in want]
        with torch.no_grad():
            ref = sequence_logprobs(merged, prompts, responses, fmt.pad_id).tolist()
        assert engine.score(prompts, responses) == pytest.approx(ref, abs=2e-3)
    del engine  # a per-phase generator starts on the adapter itself
    fresh = make_engine(backend, str(adapters[1]), max_model_len=128, seed=0)
    assert fresh.generate(prompts, [0, 1, 2], max_new_tokens=6, temperature=0.0, top_p=1.0) == want
    other = make_adapter(tiny_ckpt, tmp_path / "other", seed=5)  # an adapter of another base is refused
    with pytest.raises(ValueError, match="adapts .* not this engine's base"):
        fresh.reload(str(other))


def test_lora_and_harness_misfits_are_refused_in_one_line(tmp_path):
    from tests.helpers import small_config

    raw = small_config(tmp_path, training={"lora": {"r": 4}}, generation={"persistent": True, "weight_sync": "broadcast"})
    with pytest.raises(UserError, match="training.lora syncs each iterate as its adapter"):
        from_dict(raw)
    raw = small_config(tmp_path, training={"lora": {"target_modules": "q_proj"}})
    with pytest.raises(UserError, match=r"training.lora.target_modules: expected a list, got 'q_proj'"):
        from_dict(raw)
    raw = small_config(tmp_path, eval={"lm_eval": {"tasks": ["tspin_heldout"]}}, generation={"persistent": True},
                       resources={"generator_gpus": 1})
    with pytest.raises(UserError, match="long-lived GPU generators leave none free"):
        from_dict(raw)


def test_a_lora_spin_run_serves_every_iterate_as_its_adapter(ray_session, tmp_path):
    """SPIN with LoRA on DeepSpeed ZeRO-2 and a long-lived vLLM-CPU generator: each iterate is an adapter
    on pi_0 (megabytes), the generator scores lp_ref under the adapter of the iterate its batch names (so
    every iteration's first SPIN loss is log 2: lp = lp_ref), and the merged export loads alone."""
    import math

    from tests.helpers.runs import check_run, family_config
    from tspin_ray.controller.driver import train
    from tspin_ray.models.lora import size_bytes

    pytest.importorskip("vllm")
    raw = family_config(tmp_path, "llama3", "spin", "vllm", 2, "reload")
    raw["training"].update(lora={"r": 4, "alpha": 8.0, "merge_export": True}, lr=5e-3)
    raw["eval"].update(size=8, lm_eval={"tasks": ["tspin_heldout"], "batch_size": 8})
    assert train(from_dict(raw), quiet=True)["iterations"] == 2
    run = tmp_path / "run"
    check_run(run, raw)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for t in (0, 1):
        first = next(r for r in metrics if r["phase"] == "train" and r["iteration"] == t)
        assert first["loss"] == pytest.approx(math.log(2), abs=2e-3), t
    # lm-evaluation-harness scored pi_0 and each adapter iterate (through peft) on the same held-out rows
    # the run's own greedy evaluation used; tests/unit/evaluation/test_harness.py checks its scores against known answers.
    its = {r["iteration"]: r for r in metrics if r["phase"] == "iteration"}
    assert sorted(its) == [-1, 0, 1]
    for r in its.values():
        assert r["eval/lm_eval/tspin_heldout/exact_match"] == pytest.approx(r["eval/exact_match"])
    check_harness_outputs(run)
    pi0 = run / "checkpoints" / "pi_0"
    manifest = json.loads((run / "manifest.json").read_text())
    for t in (1, 2):
        pi = run / "checkpoints" / f"pi_{t}"
        assert is_adapter(pi) and base_of(pi) == pi0.resolve()
        assert size_bytes(pi) * 10 < size_bytes(pi0)
        fmt = load_format(pi)
        prompt, y = fmt.prompt_ids("12+34="), fmt.response_ids("12+34=", "46")
        with torch.no_grad():
            merged = sequence_logprobs(load_model(pi / "merged"), [prompt], [y], fmt.pad_id)
            peft = sequence_logprobs(load_model(pi), [prompt], [y], fmt.pad_id)
            base = sequence_logprobs(load_model(pi0), [prompt], [y], fmt.pad_id)
        torch.testing.assert_close(merged, peft, atol=1e-4, rtol=1e-5)
        assert abs(float(peft - base)) > 1e-3  # the adapter moved the policy
    from tspin_ray.workers.engines import (
        make_engine,  # vLLM serves the merged export alone, as the adapter on pi_0
    )

    alone = make_engine("vllm", str(pi / "merged"), max_model_len=128, seed=0)
    assert not alone.lora_enabled
    assert alone.score([prompt], [y]) == pytest.approx(peft.tolist(), abs=2e-3)
    import hashlib  # pi_0's base weights are never written again

    recorded = manifest["entries"]["pi_0"]["files"]["model.safetensors"]["sha256"]
    files = manifest["entries"]["pi_2"]["files"]
    assert "adapter_model.safetensors" in files and not any(f.startswith("merged/") for f in files)
    assert hashlib.sha256((pi0 / "model.safetensors").read_bytes()).hexdigest() == recorded


