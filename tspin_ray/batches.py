"""What one training step computes from its rows: the policy log-probs each objective needs, from one
forward over all responses, and micro-batches regrouped by length to cut padding.

    .venv/bin/pytest tests/test_trainer.py -k "length_sorted or step_equals"
"""

from __future__ import annotations

import numpy as np
import torch

from tspin_ray.phases import to_list


def batch_logprobs(model, batch: dict, objective: str, pad_id: int, proto: bool = True) -> dict[str, torch.Tensor]:
    """Policy log-probs of every response an objective needs, from one forward over all of them.

    Rows carry k samples each (`generated_ids`, `proto_ids`: k lists of ids); SPIN and T-SPIN treat
    each sample as its own pair, SPACE keeps the k samples of a row together ([B, mu]). proto=False:
    T-SPIN without its y0 forward (beta = 0; objectives.needs_proto).
    """
    from tspin_ray.logprobs import sequence_logprobs

    prompts, real = to_list(batch["prompt_ids"]), to_list(batch["real_ids"])
    b = len(prompts)
    # Everything that meets the policy's log-probs is made on their device (a CPU tensor next to CUDA
    # log-probs raises at the first step; tests run this on the meta device).
    device = next(model.parameters()).device
    lengths = torch.tensor([len(r) for r in real], dtype=torch.float32, device=device)
    if objective == "sft":
        return {"policy_real": sequence_logprobs(model, prompts, real, pad_id), "real_lengths": lengths}
    gen = to_list(batch["generated_ids"])
    k = len(gen[0])
    seq_p, seq_r = list(prompts), list(real)
    for p, g in zip(prompts, gen, strict=True):
        seq_p += [p] * k
        seq_r += g
    proto = proto and objective == "tspin"
    if proto:
        for p, y0 in zip(prompts, to_list(batch["proto_ids"]), strict=True):
            if len(y0) != k:
                raise ValueError(f"a T-SPIN row has {len(y0)} y0 samples for its {k} y' samples")
            seq_p += [p] * k
            seq_r += y0
    lp = sequence_logprobs(model, seq_p, seq_r, pad_id)
    real_lp, gen_lp = lp[:b], lp[b:b + b * k].view(b, k)
    out: dict[str, torch.Tensor] = {"real_lengths": lengths}
    if objective == "space":
        out.update(policy_real=real_lp, policy_generated=gen_lp)
    else:  # one pair (or triplet) per sample: repeat y's log-prob instead of recomputing it
        out.update(policy_real=real_lp.repeat_interleave(k), policy_generated=gen_lp.reshape(-1),
                   real_lengths=lengths.repeat_interleave(k))
    if proto:
        out["policy_proto"] = lp[b + b * k:].reshape(-1)
    if objective in ("spin", "space"):
        ref_real = torch.tensor(np.asarray(batch["ref_real"], dtype=np.float64), dtype=torch.float32, device=device)
        ref_gen = torch.tensor(np.asarray(to_list(batch["ref_generated"]), dtype=np.float64),
                               dtype=torch.float32, device=device).view(b, k)
        if objective == "space":
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
