"""Tiny random checkpoints made locally: a character tokenizer and a small Llama (the `char` family).

    .venv/bin/python -c "from tspin_ray.models.tiny import save_tiny; from tspin_ray.config.schema import TinyModelSpec; \
print(save_tiny('runs/tiny', TinyModelSpec()))"

Nothing is downloaded: the tokenizer is trained by the `tokenizers` library on `CHARSET` in well under a
second, and the model is a random `LlamaForCausalLM`. `save_tiny` writes a directory that
`transformers.AutoModelForCausalLM`, `AutoTokenizer` and `vllm.LLM` all load; the other families'
miniatures come from models/families.py.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tspin_ray.config.schema import TinyModelSpec
from tspin_ray.models.checkpoints import load_format
from tspin_ray.models.families import save_family

CHARSET = string.digits + string.ascii_lowercase + " +-*=,.:()[]<>?/\n"


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]


# The user turn ends with <|assistant|>, so add_generation_prompt adds nothing: one format for
# generation, training (prompt ids + response ids + </s>) and eval.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}<|assistant|>"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}</s>"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer trained on `charset`, with special tokens and the chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Split into single characters; whitespace stays a token of its own (isolated, not removed).
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()  # WordLevel's default decoder would join characters with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([charset], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by `spec`, deterministic in `spec.seed`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        # Untied: vLLM's in-place reload_weights leaves a tied lm_head on the old weights (checked).
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def save_tiny(out_dir: str | Path, spec: TinyModelSpec, weights: bool = True) -> Path:
    """Build the tokenizer and model and save both (safetensors) plus generation_config.json in out_dir
    (`weights=False`: the tokenizer and generation config only)."""
    if spec.family != "char":
        return save_family(out_dir, spec, weights=weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = spec.max_position_embeddings  # so truncation defaults match the model
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    model = build_tiny_model(spec, tokenizer)
    model.generation_config = generation
    if weights:
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.config.save_pretrained(out)
        generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_format(spec: TinyModelSpec):
    """The ChatFormat a tiny checkpoint of `spec` will have, as AutoTokenizer will load it from disk."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tspin-tokenizer-") as tmp:
        save_tiny(tmp, spec, weights=False)
        return load_format(tmp)
