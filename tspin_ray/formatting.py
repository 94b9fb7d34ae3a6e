"""One prompt format shared by generation, training and evaluation.

    .venv/bin/python -c "from tspin_ray.modeling import build_tokenizer; from tspin_ray.formatting import \
format_prompt; print(repr(format_prompt(build_tokenizer(), '12+34=')))"

A prompt x is rendered with the tokenizer's chat template (one user turn, `add_generation_prompt=True`)
or, for tokenizers without one, with `PLAIN_TEMPLATE`. A response is its token ids followed by EOS, so
a generator that stops at EOS produces exactly what training scores.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Fallback for base models with no chat template (the Alpaca-style layout most SFT recipes use).
PLAIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model sees before its response."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Ids of the formatted prompt; the template already carries any BOS it wants, so none is added."""
    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str, max_tokens: int | None = None) -> list[int]:
    """Response ids followed by EOS, truncated to `max_tokens` ids in all (EOS counts; cut responses lose it)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids if max_tokens is None else ids[:max_tokens]


def decode_response(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Text of generated ids up to the first EOS, without pad or other special tokens."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)
