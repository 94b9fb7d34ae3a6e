"""A tiny Llama and a character tokenizer made locally, and safe loading of HF checkpoint directories.

    .venv/bin/python -c "from tspin_ray.modeling import save_tiny; from tspin_ray.config import TinyModelSpec; \
print(save_tiny('runs/tiny', TinyModelSpec()))"

Nothing is downloaded: the tokenizer is trained by the `tokenizers` library on `CHARSET` in well under a
second, and the model is a random `LlamaForCausalLM`. `save_tiny` writes a directory that
`transformers.AutoModelForCausalLM`, `AutoTokenizer` and `vllm.LLM` all load. `load_model` and
`load_tokenizer` read local directories only, and only safetensors weights (never pickle).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tspin_ray.config import TinyModelSpec
from tspin_ray.errors import UserError

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
        from tspin_ray.families import save_family

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


def _check_dir(path: str | Path, need_weights: bool) -> Path:
    from tspin_ray import lora

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model directory {p} does not exist")
    if lora.is_adapter(p):  # a LoRA iterate: its weights file, and a base that is a checkpoint itself
        if need_weights and not (p / lora.ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{p} holds no {lora.ADAPTER_WEIGHTS} (only safetensors are loaded, never pickle)")
        _check_dir(lora.base_of(p), need_weights)
        return p
    if not (p / "config.json").is_file():
        raise UserError(f"{p} holds no config.json: not a Hugging Face checkpoint directory")
    if need_weights and not any(p.glob("*.safetensors")):
        raise UserError(f"{p} holds no *.safetensors weights (only safetensors are loaded, never pickle)")
    return p


def check_checkpoint(path: str | Path) -> Path:
    """A one-line UserError unless `path` is a local HF checkpoint with config.json and safetensors."""
    return _check_dir(path, need_weights=True)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a local checkpoint directory."""
    from tspin_ray import lora

    p = _check_dir(path, need_weights=False)
    if lora.is_adapter(p) and not (p / "tokenizer_config.json").is_file():
        p = lora.base_of(p)  # an adapter saved without its tokenizer uses its base's
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: cannot load its tokenizer ({first})") from None


def load_format(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's ChatFormat: its tokenizer plus the EOS ids its generation config declares."""
    import json

    from tspin_ray.formatting import chat_format
    from tspin_ray.lora import base_of

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    eos = None
    for name in ("generation_config.json", "config.json"):  # vLLM and transformers read them in this order
        f = base_of(path) / name
        if eos is None and f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
    return chat_format(tokenizer, eos if isinstance(eos, list) else [eos] if eos is not None else [])


def max_positions(path: str | Path) -> int | None:
    """The longest sequence a checkpoint's config accepts (max_position_embeddings), if it says."""
    import json

    from tspin_ray.lora import base_of

    value = json.loads((base_of(path) / "config.json").read_text()).get("max_position_embeddings")
    return value if isinstance(value, int) else None


def tiny_format(spec: TinyModelSpec):
    """The ChatFormat a tiny checkpoint of `spec` will have, as AutoTokenizer will load it from disk."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tspin-tokenizer-") as tmp:
        save_tiny(tmp, spec, weights=False)
        return load_format(tmp)


def load_model(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
               trainable_adapter: bool = False) -> PreTrainedModel:
    """The causal LM of a local checkpoint directory, from safetensors only. An adapter directory (a LoRA
    iterate, tspin_ray/lora.py) gives its base with the adapter on it, as a peft `PeftModel`."""
    from tspin_ray import lora

    p = _check_dir(path, need_weights=True)
    model = AutoModelForCausalLM.from_pretrained(
        lora.base_of(p).resolve(),  # absolute: an adapter trained on it records this path as its base
        dtype=getattr(torch, dtype),
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if not lora.is_adapter(p):
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, p, is_trainable=trainable_adapter)
