"""Per-sequence summed log-probs of response tokens, in one padded forward.

    .venv/bin/pytest tests/test_logprobs.py -q

Every objective needs log pi(y | x) for several responses per prompt (y, y', y0, ...). Callers
concatenate all of them into ONE `sequence_logprobs` call (e.g. prompts = xs + xs + xs, responses =
ys + y_primes + y0s, then split the result with `torch.split`): one forward over the padded batch is
faster than one per kind, and the same padding makes the per-kind values consistent. Sums are not
length-normalised (the papers use sums); `response_lengths` gives the counts for token means.

The [B, T, V] logits are never made: the output layer's forward is swapped, for the one call, for
`TargetLogProbs`, which takes the final hidden states of the response positions only and computes their
target-token log-probs a chunk of positions at a time (fp32 log-sum-exp), recomputing each chunk's logits
in backward. At a 128k vocabulary that is most of a step's activation memory (bench: `python -m bench
--only logprob_memory`). The swap happens inside the output layer's own call, so DDP's forward and
DeepSpeed ZeRO-3's parameter gathering (hooks on that module) see an ordinary forward.
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


# fp32 logits per chunk of positions: 128 MiB, e.g. 256 positions at a 128k vocabulary, 1024 at 32k.
CHUNK_BYTES = 2**27


class TargetLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[t] for N positions, chunk by chunk; saves h, W and the log-sum-exps, not [N, V].

    Backward per chunk, with p = softmax(h W^T) recomputed: dL/dlogits = g (onehot(t) - p), so
    dL/dh = dlogits W and dL/dW = dlogits^T h.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        lse = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        out = torch.empty_like(lse)
        for s in range(0, len(hidden), chunk):
            logits = (hidden[s:s + chunk] @ weight.T).float()  # model dtype matmul, fp32 softmax (as HF + .float())
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunks = range(0, len(hidden), ctx.chunk)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # One chunk: dW in one matmul in the weight's dtype, as the full-logits path does. Several: an fp32
        # running sum of matmuls in the weight's dtype (bf16 GEMMs on a GPU, not fp32 ones).
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] and len(chunks) > 1 else None
        for s in chunks:
            h = hidden[s:s + ctx.chunk]
            dlogits = (h @ weight.T).float().sub_(lse[s:s + ctx.chunk, None]).exp_().neg_()  # -softmax
            dlogits.scatter_add_(-1, targets[s:s + ctx.chunk, None], torch.ones_like(dlogits[:, :1]))
            dlogits = dlogits.mul_(grad_out[s:s + ctx.chunk, None].float()).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk] = (dlogits @ weight).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                if grad_weight is None:
                    grad_weight = dlogits.T @ h.to(weight.dtype)
                elif weight.dtype == torch.float32:
                    grad_weight.addmm_(dlogits.T, h)  # in place: no [V, H] temporary per chunk
                else:
                    grad_weight += (dlogits.T @ h.to(weight.dtype)).float()
        if grad_weight is None and ctx.needs_input_grad[1]:  # no scored positions at all
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


# Causal LMs whose forward returns `lm_head(hidden)` untouched (no scaling, soft-capping or vocabulary
# slicing after it), read in transformers 5.17-5.19; any other class takes the full-logits path.
AUDITED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


def _scored_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output layer, when target log-probs can be computed from its weight alone; None means: compute
    the full logits (an unaudited class, a head with a bias or of another type, a weight that is a shard)."""
    core = getattr(model, "module", model)  # a DeepSpeed engine or DDP wraps the HF model
    if type(core).__name__ not in AUDITED:
        return None
    head = core.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head):
        return None
    shape = tuple(getattr(head.weight, "ds_shape", head.weight.shape))  # ZeRO-3: [0] outside its forward
    if shape != (head.out_features, head.in_features) or type(head.weight.data) is not torch.Tensor:
        return None  # a tensor-parallel shard or a DTensor: its log-sum-exp would miss the other shards
    return head


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
) -> torch.Tensor:
    """Summed log-probs [B] of each response's tokens given its prompt; differentiable w.r.t. the model."""
    input_ids, attention_mask, response_mask = pad_batch(prompts, responses, pad_id)
    # Position t predicts token t+1. The scored positions' flat indices are found here, on the CPU: no
    # device sync, and a meta-device policy (tests) has no data to search.
    where = response_mask[:, 1:].reshape(-1).nonzero().squeeze(-1)
    device = next(model.parameters()).device
    input_ids, attention_mask, response_mask, where = (
        t.to(device) for t in (input_ids, attention_mask, response_mask, where))
    scored, targets = response_mask[:, 1:], input_ids[:, 1:]
    head = _scored_head(model)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # float32 so bf16 models still sum accurately
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (token_logp * scored).sum(-1)

    returned: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T - 1] token log-probs
        chunk = max(1, CHUNK_BYTES // (4 * head.out_features))
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        lp = TargetLogProbs.apply(flat.index_select(0, where), head.weight, targets.reshape(-1).index_select(0, where),
                                  chunk)
        token_lp = torch.zeros(scored.numel(), dtype=lp.dtype, device=lp.device).index_copy(0, where, lp)
        returned.append(token_lp.view(scored.shape))
        return returned[-1]

    head.forward = forward  # this call only; the class's forward again in `finally`
    try:
        token_logp = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        del head.forward
    # The model must have called its head once and returned that unchanged (DeepSpeed's backward hook
    # wraps it in a view of the same storage); anything else would be silently wrong log-probs.
    if len(returned) != 1 or token_logp.shape != scored.shape or token_logp.data_ptr() != returned[0].data_ptr():
        raise RuntimeError(f"{type(getattr(model, 'module', model)).__name__}: its forward did not return the "
                           f"output layer's result unchanged; remove it from tspin_ray.logprobs.AUDITED")
    return token_logp.sum(-1)


def response_lengths(responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """Number of scored tokens per response [B] (float, for token-mean losses)."""
    return torch.tensor([len(r) for r in responses], dtype=torch.float32)
