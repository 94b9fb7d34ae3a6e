"""Engine checks the CPU tests and the GPU tests share (tests/gpu/test_gpu.py runs them on CUDA)."""

from __future__ import annotations

import pytest
import torch

from tspin_ray.algorithms.logprobs import pad_batch
from tspin_ray.workers.engines import HFEngine, make_engine

PROMPTS = ["12+34=", "567+89=", "1+2=", "999+999="]


def prompt_id_lists(engine) -> list[list[int]]:
    return [engine.format.prompt_ids(p) for p in PROMPTS]


def check_two_threads_share_steps(engine, params: dict) -> None:
    """Two threads' batches through one engine (`generation.engine_batches: 2`) each get what they get
    alone, in fewer engine steps than one after the other; a refused request fails only its own call.
    Also run on CUDA vLLM (tests/gpu/test_gpu.py), where the threads step the GPU model in turn."""
    import threading

    prompts = prompt_id_lists(engine) * 4  # 16 requests per batch
    # b: other prompts' order, seeds and length cap, so a caller handed the other's outputs fails, greedy too
    batches = {"a": (prompts, list(range(16))), "b": (prompts[::-1], list(range(100, 116)))}
    kwargs = {"a": params, "b": dict(params, max_new_tokens=params["max_new_tokens"] - 4)}
    step, steps = engine.llm.llm_engine.step, []
    engine.llm.llm_engine.step = lambda: steps.append(1) or step()
    alone = {k: engine.generate(*batches[k], **kwargs[k]) for k in batches}
    assert alone["a"] != alone["b"]  # else the ownership check below would prove nothing
    alone_steps, steps[:] = len(steps), []
    scores_alone = engine.score(prompts[:4], alone["a"][:4])
    steps[:] = []
    got, errors = {}, []

    def call(key):
        try:
            got[key] = engine.generate(*batches[key], **kwargs[key])
            got[key + "-score"] = engine.score(prompts[:4], alone["a"][:4])
        except Exception as e:  # surfaced below: a thread's exception would vanish
            errors.append(e)

    threads = [threading.Thread(target=call, args=(k,)) for k in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert got["a"] == alone["a"] and got["b"] == alone["b"]
    assert got["a-score"] == pytest.approx(scores_alone, abs=1e-4) and got["b-score"] == pytest.approx(scores_alone, abs=1e-4)
    assert len(steps) < alone_steps  # the batches ran in shared steps, not one after the other
    assert not engine._owner and not engine.llm.llm_engine.has_unfinished_requests()
    # A request vLLM refuses (longer than max_model_len) fails its own call only, and leaves nothing behind.
    with pytest.raises(Exception, match="maximum context length"):
        engine.generate([prompts[0] * 20], [0], **params)
    assert not engine._owner and engine.generate(*batches["a"], **params) == alone["a"]
    engine.llm.llm_engine.step = step  # no cycle through the lambda: the engine can be freed


def reference_logprob_gap(ckpt, dtype: str, **engine_kwargs) -> float:
    """Max |lp_vLLM - lp_trainer| over 4 sampled responses: SPIN and SPACE take lp_ref from vLLM's
    prompt_logprobs on the generator, the policy log-probs from the trainer's forward (sequence_logprobs)."""
    engine = make_engine("vllm", str(ckpt), dtype=dtype, max_model_len=64, **engine_kwargs)
    hf = HFEngine(str(ckpt), dtype=dtype)
    prompts = prompt_id_lists(hf)
    responses = engine.generate(prompts, [1, 2, 3, 4], max_new_tokens=8, temperature=1.0, top_p=1.0)
    got, want = engine.score(prompts, responses), hf.score(prompts, responses)
    gap = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print(f"max |lp_vllm - lp_trainer| in {dtype}: {gap:.2e} (sequence log-probs near {want[0]:.1f})")
    return gap


def full_logits_logprobs(model, prompts, responses, pad_id) -> torch.Tensor:
    """The computation the chunked path replaces: full [B, T, V] logits, fp32 log-softmax, gather."""
    device = next(model.parameters()).device
    ids, attn, resp = (t.to(device) for t in pad_batch(prompts, responses, pad_id))
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    return (logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]).sum(-1)


def release_gpu_memory() -> None:
    """Free what engines no longer referenced hold on the GPU: vLLM's distributed state and the allocator
    caches (a no-op on CPU)."""
    import gc
    import sys

    gc.collect()
    if "vllm" in sys.modules and torch.cuda.is_available():
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
