"""Per-sequence summed log-probs of response tokens, in one padded forward.

    .venv/bin/pytest tests/test_logprobs.py -q

Every objective needs log pi(y | x) for several responses per prompt (y, y', y0, ...). Callers
concatenate all of them into ONE `sequence_logprobs` call (e.g. prompts = xs + xs + xs, responses =
ys + y_primes + y0s, then split the result with `torch.split`): one forward over the padded batch is
faster than one per kind, and the same padding makes the per-kind values consistent. Sums are not
length-normalised (the papers use sums); `response_lengths` gives the counts for token means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids [B, T], attention mask [B, T], and a mask of response positions."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, len(p) : n] = True
    return input_ids, attention_mask, response_mask


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
) -> torch.Tensor:
    """Summed log-probs [B] of each response's tokens given its prompt; differentiable w.r.t. the model."""
    input_ids, attention_mask, response_mask = pad_batch(prompts, responses, pad_id)
    device = next(model.parameters()).device
    input_ids, attention_mask, response_mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # Position t predicts token t+1; float32 so bf16 models still sum accurately.
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logp * response_mask[:, 1:]).sum(-1)


def response_lengths(responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """Number of scored tokens per response [B] (float, for token-mean losses)."""
    return torch.tensor([len(r) for r in responses], dtype=torch.float32)
