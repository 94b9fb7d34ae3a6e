"""What one training step computes from its rows: the policy log-probs each objective needs, from one
forward over all responses, and micro-batches regrouped by length to cut padding.

    .venv/bin/pytest tests/unit/workers/test_trainer.py -k "length_sorted or step_equals"
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tspin_ray.algorithms.logprobs import sequence_logprobs
from tspin_ray.algorithms.objectives import Metrics, Objective


def first_divergence(a, b) -> int:
    """Index of the first token where `a` and `b` differ (the shorter length when one is a prefix of the
    other; len(a) when they are equal).

    >>> first_divergence([5, 6, 7, 2], [5, 6, 9, 2]), first_divergence([5, 2], [5, 2])
    (2, 2)
    """
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def divergent_tokens(a, b) -> tuple[list[int], list[int], list[int]]:
    """(shared prefix, a's token at the first divergence, b's token there): each side's token as a list of
    zero or one id (none when that side ends there: an equal pair, or one side a prefix of the other).
    lp(a_d | x, prefix) - lp(b_d | x, prefix) is what objective.pair_scope first_divergence contrasts:
    scored from the shared prefix directly, so nothing before or after the divergence enters, exactly (no
    cancellation of two long sums). An equal pair gives 0 - 0; when b is a strict prefix of a, only a_d
    is scored (the term then only pushes a_d up).

    >>> divergent_tokens([5, 6, 7, 2], [5, 6, 9, 9, 2]), divergent_tokens([5, 2], [5, 2])
    (([5, 6], [7], [9]), ([5, 2], [], []))
    """
    d = first_divergence(a, b)
    return list(a[:d]), list(a[d:d + 1]), list(b[d:d + 1])


def _float_column(values, device) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32, device=device)


def step_losses(model, batch: dict, objective: Objective, params: dict, pad_id: int) -> tuple[torch.Tensor, Metrics]:
    """One step's per-example losses and metrics: the inputs `objective` reads, then its loss."""
    return objective.loss(**batch_logprobs(model, batch, objective, params, pad_id), **params)


def batch_logprobs(model, batch: dict, objective: Objective, params: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Policy log-probs of every response `objective` reads under `params`, from one forward over all of them.

    Rows carry k samples each (`generated_ids`, `proto_ids`: k lists of ids); a grouped objective (SPACE)
    keeps the k samples of a row together ([B, k]), the others treat each sample as its own pair. y0 is
    scored only when `objective.proto(params)` (T-SPIN with beta != 0). `pair_scope: first_divergence`
    (T-SPIN): each pair scores only its two tokens at the first divergence (`divergent_tokens`), and the
    full y is scored as `anchor_real`. lp_ref(y), lp_ref(y') come from the rows (scored by the generator)
    when `objective.reference(params)`.
    """

    prompts, real = to_list(batch["prompt_ids"]), to_list(batch["real_ids"])
    b = len(prompts)
    # Everything that meets the policy's log-probs is made on their device (a CPU tensor next to CUDA
    # log-probs raises at the first step; tests run this on the meta device).
    device = next(model.parameters()).device
    lengths = torch.tensor([len(r) for r in real], dtype=torch.float32, device=device)
    if not objective.opponent:
        return {"policy_real": sequence_logprobs(model, prompts, real, pad_id), "real_lengths": lengths}
    gen = to_list(batch["generated_ids"])
    k = len(gen[0])
    proto = objective.proto(params)
    scope = params.get("pair_scope", "sequence")
    y0s = to_list(batch["proto_ids"]) if proto else None
    for y0 in y0s or []:
        if len(y0) != k:
            raise ValueError(f"a T-SPIN row has {len(y0)} y0 samples for its {k} y' samples")
    # Sequences of one forward, in named groups of b (y) or b*k (per sample) entries.
    groups: dict[str, tuple[list, list]] = {"real": (list(prompts), list(real))}
    if scope not in ("sequence", "first_divergence"):
        raise ValueError(f"unknown pair_scope {scope!r}; valid: sequence, first_divergence")
    if scope == "first_divergence":
        if "pair_scope" not in objective.params:
            raise ValueError(f"pair_scope first_divergence works with tspin only, not {objective.loss.__name__}")
        # each pair's two divergent tokens, scored after prompt + shared prefix
        cut = [(p + pre, ty, tg) for p, y, gs in zip(prompts, real, gen, strict=True) for g in gs
               for pre, ty, tg in [divergent_tokens(y, g)]]
        groups["real_cut"] = ([c[0] for c in cut], [c[1] for c in cut])
        groups["generated"] = ([c[0] for c in cut], [c[2] for c in cut])
        if proto:
            cut = [(p + pre, tg, t0) for p, gs, y0k in zip(prompts, gen, y0s, strict=True)
                   for g, y0 in zip(gs, y0k, strict=True) for pre, tg, t0 in [divergent_tokens(g, y0)]]
            groups["generated_cut"] = ([c[0] for c in cut], [c[1] for c in cut])
            groups["proto"] = ([c[0] for c in cut], [c[2] for c in cut])
    else:
        groups["generated"] = ([p for p in prompts for _ in range(k)], [g for gs in gen for g in gs])
        if proto:
            groups["proto"] = ([p for p in prompts for _ in range(k)], [y0 for y0k in y0s for y0 in y0k])
    flat_p = [p for ps, _ in groups.values() for p in ps]
    flat_r = [r for _, rs in groups.values() for r in rs]
    lp, at = sequence_logprobs(model, flat_p, flat_r, pad_id), 0
    got = {}
    for name, (ps, _) in groups.items():
        got[name], at = lp[at:at + len(ps)], at + len(ps)
    real_lp, gen_lp = got["real"], got["generated"].view(b, k)
    out: dict[str, torch.Tensor] = {"real_lengths": lengths}
    if objective.grouped:
        out.update(policy_real=real_lp, policy_generated=gen_lp)
    else:  # one pair (or triplet) per sample: repeat y's log-prob instead of recomputing it
        out.update(policy_real=real_lp.repeat_interleave(k), policy_generated=gen_lp.reshape(-1),
                   real_lengths=lengths.repeat_interleave(k))
    if "real_cut" in got:  # the pairwise terms read the cut sequences; the anchor reads the whole y
        out.update(policy_real=got["real_cut"], anchor_real=real_lp.repeat_interleave(k))
    if proto:
        out["policy_proto"] = got["proto"]
        if "generated_cut" in got:
            out["policy_generated_history"] = got["generated_cut"]
    if objective.verified:
        out["generated_lengths"] = torch.tensor([len(g) for gs in gen for g in gs], dtype=torch.float32,
                                                device=device)
        out["generated_valid"] = _float_column([float(v) for vs in to_list(batch["generated_valid"]) for v in vs],
                                               device)
    if objective.reference(params):
        ref_real = _float_column(batch["ref_real"], device)
        ref_gen = _float_column(to_list(batch["ref_generated"]), device).view(b, k)
        if objective.grouped:
            out.update(ref_real=ref_real, ref_generated=ref_gen)
        else:
            out.update(ref_real=ref_real.repeat_interleave(k), ref_generated=ref_gen.reshape(-1))
    return out


def _row_length(batch: dict, i: int) -> int:
    """Padded width this row forces on its micro-batch: prompt + the longest response it carries."""
    responses = [batch["real_ids"][i]]
    for key in ("generated_ids", "proto_ids"):
        if key in batch:
            responses += list(batch[key][i])
    return len(batch["prompt_ids"][i]) + max(len(r) for r in responses)


def length_sorted(micro_batches: list[dict]) -> list[dict]:
    """The rows of one optimizer step regrouped so each micro-batch holds rows of similar length.

    Every micro-batch keeps its size and each loss is a mean over its rows, so the step's gradient (the
    mean of the micro-batch means) is unchanged; only the padding shrinks (each forward pads to its
    longest row). The sort is stable, so equal lengths keep their stream order.
    """
    if len(micro_batches) < 2:
        return micro_batches
    rows = sorted(((b, i) for b in micro_batches for i in range(len(b["prompt_ids"]))),
                  key=lambda r: _row_length(*r))
    out, start = [], 0
    for b in micro_batches:
        chunk, start = rows[start:start + len(b["prompt_ids"])], start + len(b["prompt_ids"])
        out.append({k: _column([src[k][i] for src, i in chunk], b[k]) for k in b})
    return out


def _column(values: list, like):
    """Picked rows as a column of the same kind as `like` (ragged token lists stay object arrays)."""
    if not isinstance(like, np.ndarray):
        return list(values)
    if like.dtype != object:
        return np.asarray(values, dtype=like.dtype)
    column = np.empty(len(values), dtype=object)
    for j, v in enumerate(values):
        column[j] = v
    return column


def to_list(x: Any) -> Any:
    """Ray Data hands nested list columns over as numpy object arrays; turn them back into lists."""
    if isinstance(x, np.ndarray):
        return [to_list(v) for v in x] if x.dtype == object else x.tolist()
    return x
