"""GPU paths (marked `gpu`; skipped without CUDA): vLLM on GPU, reference log-prob parity, the HF engine
on a real family, ZeRO-3.

    .venv/bin/pytest -m gpu tests/gpu/test_gpu.py      (on a machine with an NVIDIA GPU and the `gpu` extra)
    bash bench/gpu_kit/run.sh OUT                  (the GPU image without vLLM: those that need no vLLM)
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.engines import (
    PROMPTS,
    check_two_threads_share_steps,
    reference_logprob_gap,
    release_gpu_memory,
)
from tests.helpers.trainers import addition_rows, group_step
from tspin_ray.models.checkpoints import load_model
from tspin_ray.workers.engines import HFEngine, make_engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]

GREEDY = dict(max_new_tokens=8, temperature=0.0, top_p=1.0)


@pytest.fixture(autouse=True)
def free_engines():
    """Every engine a test made is gone when it ends: vLLM's start-up check wants its whole
    gpu_memory_utilization free, so an engine left over would fail the next test's start."""
    yield
    release_gpu_memory()


def test_vllm_gpu_generation_and_reload_match_hf(tiny_ckpt, tiny_ckpt_b):
    pytest.importorskip("vllm")
    engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=64, gpu_memory_utilization=0.3)
    hf_b = HFEngine(str(tiny_ckpt_b))
    prompts = [hf_b.format.prompt_ids(p) for p in PROMPTS]
    before = engine.generate(prompts, [0] * 4, **GREEDY)
    engine.reload(str(tiny_ckpt_b))
    after = engine.generate(prompts, [0] * 4, **GREEDY)
    assert after == hf_b.generate(prompts, [0] * 4, **GREEDY) and after != before


@pytest.mark.parametrize("lora_enabled", [False, True])
def test_vllm_sleep_frees_gpu_memory_and_wake_restores_the_same_outputs(tiny_ckpt, lora_enabled):
    """Colocated mode: a sleeping engine gives its KV cache and weights back to the trainer. Full weights
    sleep at level 2 (discarded: the checkpoint is loaded again while waking), LoRA at level 1 (the base
    goes to host RAM and comes back)."""
    pytest.importorskip("vllm")
    engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=64, gpu_memory_utilization=0.3,
                         sleep_mode=True, lora_rank=8 if lora_enabled else None)
    prompts = [HFEngine(str(tiny_ckpt)).format.prompt_ids(p) for p in PROMPTS]
    before = engine.generate(prompts, [0] * 4, **GREEDY)
    free_awake = torch.cuda.mem_get_info()[0]
    discarded = engine.sleep()
    assert discarded is not lora_enabled
    freed = torch.cuda.mem_get_info()[0] - free_awake
    print(f"vLLM sleep (level {2 if discarded else 1}) freed {freed / 2**30:.2f} GiB")
    assert freed > 0.1 * 0.3 * torch.cuda.mem_get_info()[1]  # most of its 30% share
    engine.wake(str(tiny_ckpt) if discarded else None)
    assert engine.generate(prompts, [0] * 4, **GREEDY) == before


def test_vllm_gpu_batches_from_two_threads_share_steps(tiny_ckpt):
    """`generation.engine_batches: 2` on CUDA vLLM: two callers' threads take turns stepping the one
    engine (its core runs in this process). Greedy, so the check does not hang on whether sampling
    reproduces under another batch composition (docs/cluster.md: on GPUs it may not, in the last bits)."""
    pytest.importorskip("vllm")
    engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=64, gpu_memory_utilization=0.3)
    check_two_threads_share_steps(engine, dict(GREEDY, max_new_tokens=16))  # enough steps to tell apart


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-3), ("bfloat16", 0.25)])
def test_reference_logprobs_on_the_generator_match_the_trainer(tiny_ckpt, dtype, tolerance):
    """SPIN/SPACE take lp_ref from vLLM's prompt_logprobs: compare with the trainer-side forward (CUDA
    kernels differ more from the HF forward than vLLM-CPU's do, hence the wider bf16 tolerance)."""
    pytest.importorskip("vllm")
    assert reference_logprob_gap(tiny_ckpt, dtype, gpu_memory_utilization=0.3) < tolerance


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_sync_probe_of_a_vllm_engine_is_within_its_tolerance(tiny_ckpt, dtype):
    """The check after every weight sync (controller/sync_check.py) compares an engine's log-prob per token
    with the trainer's forward on the same rows: on CUDA kernels the gap must stay inside TOLERANCE, or every
    GPU run would reload and then stop after its first sync."""
    pytest.importorskip("vllm")
    from tspin_ray.controller.sync_check import TOLERANCE, gaps

    engine = make_engine("vllm", str(tiny_ckpt), dtype=dtype, max_model_len=64, gpu_memory_utilization=0.3)
    hf = HFEngine(str(tiny_ckpt), dtype=dtype)
    prompts = [hf.format.prompt_ids(p) for p in PROMPTS]
    responses = [hf.format.response_ids(p, p[::-1]) for p in PROMPTS]
    gap = gaps(hf.score(prompts, responses), [engine.score(prompts, responses)], [len(r) for r in responses])[0]
    print(f"sync probe gap in {dtype} on CUDA: {gap:.2e} nats/token (tolerance {TOLERANCE[dtype]:g})")
    assert gap < TOLERANCE[dtype]


def test_a_trainer_actor_uses_the_gpu_ray_assigned_it(ray_session):
    """Device indices come from Ray's assignment (workers/devices.py): the trainer's device, the current
    CUDA device and LOCAL_RANK agree with the GPU id Ray gave the actor."""
    import os

    import ray

    from tspin_ray.workers.trainer_rank import start_trainers

    [actor] = start_trainers(1, "torch", options={"num_gpus": 1})
    try:
        got = ray.get(actor.__ray_call__.remote(lambda t: (str(t.device), torch.cuda.current_device(),
                                                           ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                           os.environ.get("LOCAL_RANK"))))
        device, current, assigned, visible, local_rank = got
        index = visible.split(",").index(str(assigned[0])) if visible else int(assigned[0])
        assert device == f"cuda:{index}" and current == index and local_rank == str(index), got
    finally:
        ray.kill(actor)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_hf_engine_on_gpu_scores_and_generates_as_on_cpu(family_ckpt, monkeypatch, family):
    """The HF engine a GPU generator runs, against the same engine on CPU (fp32, a real family's tokenizer,
    template and EOS list): reference log-probs agree to float error, greedy ids exactly."""
    path = str(family_ckpt(family))
    gpu = HFEngine(path)
    assert gpu.device == f"cuda:{torch.cuda.current_device()}"  # the actor's own device, by index
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        cpu = HFEngine(path)
    prompts = [cpu.format.prompt_ids(p) for p in PROMPTS]
    responses = [cpu.format.response_ids(p, p[::-1]) for p in PROMPTS]
    assert gpu.score(prompts, responses) == pytest.approx(cpu.score(prompts, responses), abs=1e-3)
    assert gpu.generate(prompts, [0] * 4, **GREEDY) == cpu.generate(prompts, [0] * 4, **GREEDY)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_chunked_logprobs_on_gpu_equal_the_full_logits_path(family_ckpt, monkeypatch, dtype, tolerance):
    """CUDA matmuls in chunks of 3 positions vs the full [B, T, V] logits, on a tied-embedding family
    (sharpened weights, so a wrong position or token would show); gradients too."""
    from tests.helpers.engines import full_logits_logprobs
    from tspin_ray.algorithms import logprobs
    from tspin_ray.algorithms.logprobs import sequence_logprobs
    from tspin_ray.models.checkpoints import load_format

    path = family_ckpt("qwen2")
    model, fmt = load_model(path, dtype=dtype).cuda(), load_format(path)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert logprobs._scored_head(model) is model.get_output_embeddings()
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 3 * 4 * model.get_output_embeddings().out_features)
    prompts = [fmt.prompt_ids(p) for p in PROMPTS]
    responses = [fmt.response_ids(p, p[::-1]) for p in PROMPTS]
    ref = full_logits_logprobs(model, prompts, responses, fmt.pad_id)
    ref.sum().backward()
    ref_grad = model.get_output_embeddings().weight.grad.float().clone()
    model.zero_grad()
    got = sequence_logprobs(model, prompts, responses, fmt.pad_id)
    got.sum().backward()
    grad = model.get_output_embeddings().weight.grad.float()
    assert got.device.type == "cuda" and torch.allclose(got, ref, atol=tolerance * 10, rtol=tolerance)
    assert (grad - ref_grad).abs().max() <= tolerance * ref_grad.abs().max()


@pytest.mark.parametrize("family,offload", [("char", "none"), ("char", "all"), ("qwen2", "none")])
def test_zero3_step_equals_zero0_step_and_exports_full_weights(ray_session, tiny_ckpt, family_ckpt, tmp_path,
                                                               family, offload):
    """qwen2: tied embeddings, which ZeRO-3 partitions once and the export must write back as one tensor."""
    ckpt = tiny_ckpt if family == "char" else family_ckpt(family)
    rows = addition_rows(ckpt)
    loss0, fp0 = group_step(ckpt, rows, "deepspeed", 1, zero=0, num_gpus=1)
    loss3, fp3 = group_step(ckpt, rows, "deepspeed", 1, zero=3, num_gpus=1, export_to=tmp_path / "z3",
                             offload=offload)
    assert loss3 == pytest.approx(loss0, rel=1e-4)
    assert fp3 == pytest.approx(fp0, rel=1e-5)
    exported = load_model(tmp_path / "z3")  # the gathered 16/32-bit weights, not ZeRO-3 shards
    assert float(sum(p.double().sum() for p in exported.parameters())) == pytest.approx(fp3, rel=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the trainer and the vLLM worker on 2 GPUs")
def test_nccl_broadcast_from_zero3_trainer_into_vllm(ray_session, tiny_ckpt, tmp_path):
    """The fast path end to end: a ZeRO-3 trainer gathers bucket by bucket and broadcasts over NCCL into a
    vLLM worker; the worker then generates what an engine loaded from the exported checkpoint generates."""
    pytest.importorskip("vllm")
    from tests.helpers.sync import broadcast_roundtrip

    sync = broadcast_roundtrip(tmp_path, tiny_ckpt, "vllm", 1, gpus=1.0,
                               training={"backend": "deepspeed", "zero_stage": 3})
    print(f"NCCL broadcast: {sync.bytes / 1e6:.1f} MB in {sync.seconds:.3f} s ({sync.gbps:.2f} GB/s)")
