"""After each weight sync, the long-lived generators must hold the iterate the trainers hold.

    .venv/bin/pytest tests/unit/controller/test_sync_check.py

A sync can go wrong without an error: a broadcast that reached a stale engine, a reload that kept the old
tied head, an adapter left out. So after every sync (broadcast or checkpoint reload, full weights or
LoRA) each generator scores a fixed probe (the first PROBE_ROWS held-out rows: prompt and annotated answer)
and the driver compares each row's log-prob per token with the trainers' on the same rows. The engines and
the trainer compute the same forward in different kernels, so they agree to TOLERANCE[dtype] per token
(vLLM-CPU against HF in fp32: about 1e-5; bf16 on GPUs: about 0.03, tests/gpu). A mismatch makes every
generator load the committed checkpoint again; a second mismatch stops the run in one line. verl and
NeMo-RL check their weight refits the same way.
"""

from __future__ import annotations

import time

from tspin_ray.errors import RunFailed

PROBE_ROWS = 4
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # per token, nats


def gaps(want: list[float], got: list[list[float]], tokens: list[int]) -> list[float]:
    """Per generator, the largest |log-prob per token of a probe row - the trainers'| over the rows (row by
    row: errors of opposite sign in two rows must not cancel).

    >>> [round(g, 6) for g in gaps([-1.0, -2.0], [[-1.2, -1.6], [-1.0, -2.0]], tokens=[2, 4])]
    [0.1, 0.0]
    """
    return [max(abs(g - w) / n for g, w, n in zip(scores, want, tokens, strict=True)) for scores in got]


def precision(cfg) -> str:
    """The coarser of the engines' dtype and the trainers' precision: what the two forwards agree to."""
    return "bfloat16" if cfg.model.dtype == "bfloat16" or cfg.training.precision == "bf16" else "float32"


def verify(trainers, generators, rows: list[dict], path, cfg, say) -> dict:
    """Compare every generator's probe scores with the trainers' under the iterate at `path`; returns the
    largest gap as `sync/probe_gap` and the check's seconds ({} when no generator holds an engine yet, or
    there are no probe rows). With weight_sync: checkpoint the probe is where the generators load pi_{t+1}."""
    if not rows:
        return {}
    t0 = time.time()
    dtype = precision(cfg)
    prompts, responses = [r["prompt_ids"] for r in rows], [r["real_ids"] for r in rows]
    want = trainers.row_logprobs(prompts, responses)  # one forward (one ZeRO-3 gather) for all rows
    tokens, tol = [max(len(r), 1) for r in responses], TOLERANCE[dtype]
    if cfg.generation.colocate:  # the probe wakes the engines: into what the trainers gave back
        trainers.release_memory()
    got = gaps(want, generators.probe(path, prompts, responses), tokens)
    if not got:
        return {}
    if max(got) > tol:
        say(f"warning: a generator's weights differ from the trainers' after the sync to {path} (probe gap "
            f"{max(got):.2e} nats/token > {tol:g} for {dtype}); every generator reloads the checkpoint")
        generators.forget()
        got = gaps(want, generators.probe(path, prompts, responses), tokens)
        if max(got) > tol:
            raise RunFailed(f"weight sync: after reloading {path} a generator still scores the probe "
                            f"{max(got):.2e} nats/token away from the trainers (tolerance {tol:g} for {dtype})")
    return {"sync/probe_gap": max(got), "timing/sync_check": time.time() - t0}
