"""sequence_logprobs: one padded forward equals a per-example loop; prompt tokens are not scored."""

from __future__ import annotations

import pytest
import torch

from tspin_ray.config import TinyModelSpec
from tspin_ray.formatting import chat_format
from tspin_ray.logprobs import pad_batch, response_lengths, sequence_logprobs
from tspin_ray.modeling import build_tiny_model, build_tokenizer


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
