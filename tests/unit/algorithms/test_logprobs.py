"""sequence_logprobs: one padded forward equals a per-example loop; prompt tokens are not scored."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.engines import full_logits_logprobs
from tspin_ray.algorithms.logprobs import pad_batch, response_lengths, sequence_logprobs
from tspin_ray.config.schema import TinyModelSpec
from tspin_ray.models.chat_format import chat_format
from tspin_ray.models.tiny import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_tiny_model(TinyModelSpec(), tok)
    with torch.no_grad():  # a random init is near-uniform; sharpen it so mistakes would show
        for p in m.parameters():
            p.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def batch(tok):
    pairs = [("1+2=", "3"), ("347+589=", "936"), ("sort:d,a,c=", "a,c,d"), ("9*9=", "81")]
    fmt = chat_format(tok)
    prompts = [fmt.prompt_ids(p) for p, _ in pairs]
    responses = [fmt.response_ids(p, r) for p, r in pairs]
    responses[0] = responses[0][:-1]  # one response without EOS (cut by max_new_tokens)
    return prompts, responses


def slow_logprob(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(prompt) + i - 1, tok_id].item() for i, tok_id in enumerate(response))


def test_pack_batch_doctests():
    import doctest

    from tspin_ray.algorithms import logprobs

    result = doctest.testmod(logprobs)
    assert result.attempted >= 3 and result.failed == 0


def test_pad_batch_right_pads_and_marks_responses():
    ids, attn, resp = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]]
    assert attn.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert resp.tolist() == [[False, False, True, False], [False, True, True, True]]


def test_one_padded_forward_matches_per_example_loop(model, tok, batch):
    prompts, responses = batch
    with torch.no_grad():
        fast = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
    slow = torch.tensor([slow_logprob(model, p, r) for p, r in zip(prompts, responses, strict=True)], dtype=torch.float64)
    assert fast.shape == (4,) and fast.dtype == torch.float32
    assert torch.allclose(fast.double(), slow, atol=1e-5, rtol=0), (fast, slow)
    assert response_lengths(responses).tolist() == [1, 4, 6, 3]


def test_result_does_not_depend_on_batch_neighbours(model, tok, batch):
    prompts, responses = batch
    with torch.no_grad():
        together = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
        alone = torch.cat([sequence_logprobs(model, [p], [r], tok.pad_token_id)
                           for p, r in zip(prompts, responses, strict=True)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_prompt_tokens_are_conditioned_on_but_not_scored(model, tok):
    # Chain rule: log p(x[1:] + y | x[0]) = log p(x[1:] | x[0]) + log p(y | x). Holds only if exactly the
    # response positions are summed, whatever the prompt/response split.
    fmt = chat_format(tok)
    x, y = fmt.prompt_ids("12+34="), fmt.response_ids("12+34=", "46")
    with torch.no_grad():
        whole, head, tail = sequence_logprobs(model, [x[:1], x[:1], x], [x[1:] + y, x[1:], y], tok.pad_token_id)
    assert torch.allclose(whole, head + tail, atol=1e-4)
    assert head < -1.0  # the prompt tokens carry real log-probability mass that `tail` must leave out


def test_gradient_flows_to_the_model(model, tok, batch):
    prompts, responses = batch
    model.zero_grad()
    sequence_logprobs(model, prompts, responses, tok.pad_token_id).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


@pytest.mark.parametrize("family", ["char", "llama3", "qwen2", "zephyr"])
def test_chunked_target_logprobs_equal_the_full_logits_path_with_their_gradients(family_ckpt, tiny_ckpt,
                                                                                monkeypatch, family):
    """Values to 1e-5 and every parameter's gradient (tied embeddings included: llama3, qwen2) to 1e-5 of its
    scale, in fp32, with chunks of 3 positions so that every batch spans several chunks."""
    from tspin_ray.algorithms import logprobs
    from tspin_ray.models.checkpoints import load_format, load_model

    path = tiny_ckpt if family == "char" else family_ckpt(family)
    model, fmt = load_model(path), load_format(path)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # sharper than a random init, so that a wrong position or token would show
    head = model.get_output_embeddings()
    assert logprobs._scored_head(model) is head  # the chunked path, not the fallback, is under test
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 3 * 4 * head.out_features)
    pairs = [("1+2=", "3"), ("347+589=", "936"), ("sort:d,a,c=", "a,c,d"), ("9*9=", "81")]
    prompts = [fmt.prompt_ids(p) for p, _ in pairs]
    responses = [fmt.response_ids(p, r) for p, r in pairs]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct per-sequence gradients

    ref = full_logits_logprobs(model, prompts, responses, fmt.pad_id)
    (ref * weights).sum().backward()
    ref_grads = _grads(model)
    got = sequence_logprobs(model, prompts, responses, fmt.pad_id)
    (got * weights).sum().backward()
    assert "forward" not in vars(head)  # the class's forward is back
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got, ref)
    for (name, _), g, r in zip(model.named_parameters(), _grads(model), ref_grads, strict=True):
        # fp32 summation order differs (chunked matmuls): within 1e-5 of each tensor's largest entry (~1e-6 seen)
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), name


def test_a_head_with_a_bias_takes_the_full_logits_path(model, tok, batch):
    prompts, responses = batch
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.linspace(-2, 2, head.out_features))
    model.set_output_embeddings(biased)
    try:
        with torch.no_grad():
            got = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
            ref = full_logits_logprobs(model, prompts, responses, tok.pad_token_id)
    finally:
        model.set_output_embeddings(head)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("chunk_positions", [3, 10**6])
def test_bf16_chunked_logprobs_and_gradients_round_like_the_full_path(model, tok, batch, monkeypatch,
                                                                      chunk_positions):
    from tspin_ray.algorithms import logprobs

    prompts, responses = batch
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", chunk_positions * 4 * m16.get_output_embeddings().out_features)
    ref = full_logits_logprobs(m16, prompts, responses, tok.pad_token_id)
    ref.sum().backward()
    ref_grads = _grads(m16)
    got = sequence_logprobs(m16, prompts, responses, tok.pad_token_id)
    got.sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-3, rtol=0)
    for (name, p), g, r in zip(m16.named_parameters(), _grads(m16), ref_grads, strict=True):
        assert g.dtype == p.dtype == torch.bfloat16
        assert (g.float() - r.float()).abs().max() <= 2e-2 * r.float().abs().max(), name


def test_an_unaudited_model_class_takes_the_full_logits_path():
    """Granite divides its logits by config.logits_scaling after lm_head: the chunked path would be wrong
    there, so only audited classes take it, and the guard refuses a class that alters the head's output."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from tspin_ray.algorithms import logprobs

    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=40, hidden_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2,
                                               intermediate_size=128, logits_scaling=8.0))
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    with torch.no_grad():
        got = sequence_logprobs(granite, prompts, responses, pad_id=0)
        assert torch.allclose(got, full_logits_logprobs(granite, prompts, responses, 0), atol=1e-5)
        logprobs.AUDITED = logprobs.AUDITED | {"GraniteForCausalLM"}
        try:
            with pytest.raises(RuntimeError, match="GraniteForCausalLM: its forward did not return the output "
                                                   "layer's result unchanged"):
                sequence_logprobs(granite, prompts, responses, pad_id=0)
        finally:
            logprobs.AUDITED = logprobs.AUDITED - {"GraniteForCausalLM"}


def test_empty_responses_score_zero_and_the_head_is_restored_after_an_error(model, tok, batch):
    prompts, responses = batch
    got = sequence_logprobs(model, prompts[:2], [[], []], tok.pad_token_id)
    got.sum().backward()  # no scored position at all: still a graph, zero gradients
    assert got.tolist() == [0.0, 0.0] and model.get_output_embeddings().weight.grad.abs().sum() == 0
    model.zero_grad()
    with pytest.raises(IndexError):
        sequence_logprobs(model, [[10**6]], [[1]], tok.pad_token_id)  # an id past the vocabulary
    assert "forward" not in vars(model.get_output_embeddings())


def test_target_logprobs_run_on_the_meta_device_without_cpu_tensors():
    """Every tensor the chunked path makes is on the hidden states' device (a CPU one would raise here
    exactly as next to CUDA)."""
    from tspin_ray.algorithms.logprobs import TargetLogProbs

    h = torch.empty(10, 8, device="meta", requires_grad=True)
    w = torch.empty(50, 8, device="meta", requires_grad=True)
    out = TargetLogProbs.apply(h, w, torch.zeros(10, dtype=torch.long, device="meta"), 4)
    out.sum().backward()
    assert out.shape == (10,) and h.grad.shape == h.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_weight_gradient_accumulates_in_place_block_by_block(monkeypatch, dtype):
    """Several chunks add into one fp32 [V, H] gradient without a [V, H] product per chunk: blocks of 700
    vocabulary rows here, each the same numbers as the whole product (bit for bit on CPU)."""
    from tspin_ray.algorithms import logprobs

    torch.manual_seed(0)
    d, h = torch.randn(40, 5000).to(dtype), torch.randn(40, 64).to(dtype)
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 2 * 4 * 64 * 700)
    grad = torch.ones(5000, 64)
    before = grad.data_ptr()
    logprobs.accumulate(grad, d, h)
    assert grad.data_ptr() == before and grad.dtype == torch.float32
    assert torch.equal(grad, 1 + (d.T @ h).float())


def test_bf16_chunks_run_on_the_meta_device_without_cpu_tensors(monkeypatch):
    """The blocked bf16 accumulation makes nothing on another device either (3 chunks, 4 blocks)."""
    from tspin_ray.algorithms import logprobs
    from tspin_ray.algorithms.logprobs import TargetLogProbs

    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 2 * 4 * 8 * 13)
    h = torch.empty(10, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(50, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = TargetLogProbs.apply(h, w, torch.zeros(10, dtype=torch.long, device="meta"), 4)
    out.sum().backward()
    assert w.grad.shape == w.shape and w.grad.dtype == torch.bfloat16 and h.grad.device.type == "meta"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean 4D mask, an additive one
@pytest.mark.parametrize("family", ["char", "llama3", "qwen2", "zephyr"])
def test_packed_rows_equal_one_padded_row_per_sequence_with_their_gradients(family_ckpt, tiny_ckpt, family,
                                                                            attention):
    """y, y' and y0 of very different lengths share rows: fewer positions than padding (rows counted), the
    same log-probs to 1e-5 and the same gradients to 1e-5 of each tensor's scale, in fp32."""
    from tspin_ray.algorithms.logprobs import pack_batch, packs
    from tspin_ray.models.checkpoints import load_format, load_model

    path = tiny_ckpt if family == "char" else family_ckpt(family)
    model, fmt = load_model(path), load_format(path)
    model.config._attn_implementation = attention
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    xs = ["1+2=", "347+589=", "sort:d,a,c=", "9*9="]
    prompts = [fmt.prompt_ids(x) for x in xs] * 3
    responses = ([fmt.response_ids(x, " ".join("9876543210" * 3)) for x in xs]  # a long y
                 + [fmt.response_ids(x, "7") for x in xs] + [fmt.response_ids(x, "") for x in xs])  # short y', y0
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    assert packs(model, width)
    ids = pack_batch(prompts, responses, fmt.pad_id)[0]
    assert ids.shape[1] == width and ids.shape[0] <= 2 * len(prompts) // 3  # padding: one row per sequence
    weights = torch.linspace(-2.0, 3.0, len(prompts))
    ref = sequence_logprobs(model, prompts, responses, fmt.pad_id, pack=False)
    (ref * weights).sum().backward()
    ref_grads = _grads(model)
    got = sequence_logprobs(model, prompts, responses, fmt.pad_id)
    (got * weights).sum().backward()
    # fp32 sums of ~60 tokens near -400 in another order (index_add, not a row sum): an ulp is 3e-5 there
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6), (got - ref).abs().max()
    for (name, _), g, r in zip(model.named_parameters(), _grads(model), ref_grads, strict=True):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), name


def test_packing_only_where_a_4d_mask_means_what_it_says(model):
    """An unaudited class, flash-attention (no 4D masks) or a sliding window narrower than the row: padded."""
    from tspin_ray.algorithms.logprobs import packs

    assert packs(model, 64)
    m = copy.deepcopy(model)
    m.config.sliding_window = 32
    assert packs(m, 32) and not packs(m, 33)
    m.config._attn_implementation = "flash_attention_2"
    assert not packs(m, 8)
    granite = type("GraniteForCausalLM", (torch.nn.Module,), {})()
    granite.config = model.config
    assert not packs(granite, 8)
