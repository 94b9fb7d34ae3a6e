"""Per-sequence summed log-probs of response tokens, in one forward over packed rows.

    .venv/bin/pytest tests/unit/algorithms/test_logprobs.py -q

Every objective needs log pi(y | x) for several responses per prompt (y, y', y0, ...). Callers
concatenate all of them into ONE `sequence_logprobs` call (e.g. prompts = xs + xs + xs, responses =
ys + y_primes + y0s, then split the result with `torch.split`): one forward is faster than one per kind
(and under ZeRO-3 gathers the weights once). The sequences are packed into rows as wide as the longest
(`pack_batch`: position ids restart per sequence, a block-causal 4D mask keeps them apart), so a long y
beside short y' and y0 costs its own tokens, not three times its width; a padded row per sequence
(`pad_batch`) where a 4D mask would not mean the same (`packs`). Sums are not length-normalised (the
papers use sums); `response_lengths` gives the counts for token means.

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


def pack_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequences packed into rows as wide as the longest one (first fit, longest first), instead of
    one padded row each: ids [R, W], position ids [R, W] (restarting at 0 per sequence), the block-causal
    attention mask [R, 1, W, W] (True: may attend), the response mask [R, W] and each position's sequence
    index [R, W] (-1 on the padding at a row's end, a causal segment of its own).

    >>> ids, pos, mask, resp, owner = pack_batch([[1], [2], [3]], [[4, 5, 6], [7], [8]], pad_id=0)
    >>> ids.tolist(), pos.tolist(), owner.tolist()
    ([[1, 4, 5, 6], [2, 7, 3, 8]], [[0, 1, 2, 3], [0, 1, 0, 1]], [[0, 0, 0, 0], [1, 1, 2, 2]])
    >>> mask[1, 0].int().tolist()  # the 2nd row: sequences 1 and 2 do not see each other
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    rows: list[list[int]] = []  # sequence indices per row
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    shape = (len(rows), width)
    input_ids, position_ids = torch.full(shape, pad_id, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    owner, segment = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            p, y, n = prompts[i], responses[i], lengths[i]
            input_ids[r, at:at + n] = torch.tensor(list(p) + list(y), dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            owner[r, at:at + n], segment[r, at:at + n] = i, s
            response_mask[r, at + len(p):at + n] = True
            at += n
        position_ids[r, at:] = torch.arange(width - at)
        segment[r, at:] = len(members)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    return input_ids, position_ids, mask[:, None], response_mask, owner


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
                else:
                    accumulate(grad_weight, dlogits, h.to(weight.dtype))
        if grad_weight is None and ctx.needs_input_grad[1]:  # no scored positions at all
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def accumulate(grad_weight: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32, [V, H]) += dlogits^T h in place. fp32 inputs: one addmm_. Others (bf16): matmuls in
    their own dtype a block of vocabulary rows at a time, each added into its fp32 rows, so no [V, H] product
    (and no fp32 copy of one) is made per chunk: about 5 GB per rank at a 152k vocabulary and hidden 3584."""
    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.T, h)
        return
    rows = max(1, CHUNK_BYTES // 2 // (4 * h.shape[1]))  # a 64 MiB fp32 block of rows
    for v in range(0, len(grad_weight), rows):
        grad_weight[v:v + rows].add_(dlogits[:, v:v + rows].T @ h)


# Causal LMs whose forward returns `lm_head(hidden)` untouched (no scaling, soft-capping or vocabulary
# slicing after it), read in transformers 5.17-5.19; any other class takes the full-logits path.
AUDITED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


def hf_core(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine or DDP wrapper and a peft PeftModel (whose LoRA
    layers sit inside it; its forward is the HF model's)."""
    core = getattr(model, "module", model)
    unwrap = getattr(core, "get_base_model", None)
    return unwrap() if unwrap is not None else core


def _scored_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output layer, when target log-probs can be computed from its weight alone; None means: compute
    the full logits (an unaudited class, a head with a bias or of another type, a weight that is a shard)."""
    core = hf_core(model)
    if type(core).__name__ not in AUDITED:
        return None
    head = core.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head):
        return None
    shape = tuple(getattr(head.weight, "ds_shape", head.weight.shape))  # ZeRO-3: [0] outside its forward
    if shape != (head.out_features, head.in_features) or type(head.weight.data) is not torch.Tensor:
        return None  # a tensor-parallel shard or a DTensor: its log-sum-exp would miss the other shards
    return head


def packs(model: torch.nn.Module, width: int) -> bool:
    """Whether sequences may share a row in `model`'s forward: an audited class (its mask code takes a 4D
    mask as given) with sdpa or eager attention (an additive mask; flash-attention takes none), and no
    sliding window narrower than the row (a 4D mask replaces the window's)."""
    core = hf_core(model)
    config = getattr(core, "config", None)
    if type(core).__name__ not in AUDITED or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= width


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    pack: bool = True,
) -> torch.Tensor:
    """Summed log-probs [B] of each response's tokens given its prompt; differentiable w.r.t. the model.

    pack (where `packs` allows it): the sequences share rows (pack_batch) instead of one padded row
    each, so y, y' and y0 of different lengths cost their own tokens, not the longest one's."""
    width = max([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], default=0)
    # A response must follow a prompt token in its own sequence: position t predicts token t + 1.
    pack = pack and len(prompts) > 1 and all(len(p) for p in prompts) and packs(model, width)
    if pack:
        input_ids, position_ids, allowed, response_mask, owner = pack_batch(prompts, responses, pad_id)
        pack = len(input_ids) < len(prompts)  # no row saved: the padded batch (a causal fast path if unpadded)
    if not pack:
        input_ids, attention_mask, response_mask = pad_batch(prompts, responses, pad_id)
    # The scored positions' flat indices are found here, on the CPU: no device sync, and a meta-device
    # policy (tests) has no data to search.
    where = response_mask[:, 1:].reshape(-1).nonzero().squeeze(-1)
    weight = next(model.parameters())
    device = weight.device
    if pack:  # sdpa takes the boolean mask as it is (1 byte a pair); eager adds a mask to its scores
        if hf_core(model).config._attn_implementation != "sdpa":
            allowed = torch.zeros(allowed.shape, dtype=weight.dtype).masked_fill_(~allowed, torch.finfo(weight.dtype).min)
        sequence_of = owner[:, 1:].reshape(-1)[where].to(device)
        inputs = dict(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                      attention_mask=allowed.to(device))
    else:
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    response_mask, where = response_mask.to(device), where.to(device)
    token_logp = _token_logprobs(model, inputs, response_mask[:, 1:], inputs["input_ids"][:, 1:], where)
    if not pack:
        return token_logp.sum(-1)
    picked = token_logp.reshape(-1).index_select(0, where)
    return torch.zeros(len(prompts), dtype=picked.dtype, device=device).index_add(0, sequence_of, picked)


def _token_logprobs(model: torch.nn.Module, inputs: dict, scored: torch.Tensor, targets: torch.Tensor,
                    where: torch.Tensor) -> torch.Tensor:
    """log pi(target | prefix) at every position [R, W - 1], zero where nothing is scored."""
    head = _scored_head(model)
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # float32 so bf16 models still sum accurately
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * scored

    returned: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # [R, W, H] -> [R, W - 1] token log-probs
        chunk = max(1, CHUNK_BYTES // (4 * head.out_features))
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        lp = TargetLogProbs.apply(flat.index_select(0, where), head.weight, targets.reshape(-1).index_select(0, where),
                                  chunk)
        token_lp = torch.zeros(scored.numel(), dtype=lp.dtype, device=lp.device).index_copy(0, where, lp)
        returned.append(token_lp.view(scored.shape))
        return returned[-1]

    head.forward = forward  # this call only; the class's forward again in `finally`
    try:
        token_logp = model(**inputs, use_cache=False).logits
    finally:
        del head.forward
    # The model must have called its head once and returned that unchanged (DeepSpeed's backward hook
    # wraps it in a view of the same storage); anything else would be silently wrong log-probs.
    if len(returned) != 1 or token_logp.shape != scored.shape or token_logp.data_ptr() != returned[0].data_ptr():
        raise RuntimeError(f"{type(hf_core(model)).__name__}: its forward did not return the "
                           f"output layer's result unchanged; remove it from tspin_ray.algorithms.logprobs.AUDITED")
    return token_logp


def response_lengths(responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """Number of scored tokens per response [B] (float, for token-mean losses)."""
    return torch.tensor([len(r) for r in responses], dtype=torch.float32)
