"""Loading a checkpoint directory safely: its tokenizer, chat format, model, and (for a LoRA iterate) its base.

    .venv/bin/pytest tests/unit/models

`load_model` and `load_tokenizer` read local directories only, and only safetensors weights (never
pickle). A LoRA iterate is an adapter directory in peft's format whose `base_model_name_or_path` names
the full checkpoint it adapts (models/lora.py trains and merges them): every loader here follows it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tspin_ray.errors import UserError
from tspin_ray.models.chat_format import chat_format

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED = "merged"  # pi_t/merged/: the merged export (training.lora.merge_export), not part of the checkpoint


def is_adapter(path: str | Path) -> bool:
    """Whether `path` is a peft adapter directory rather than a full HF checkpoint."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def base_of(path: str | Path) -> Path:
    """The checkpoint an adapter directory applies to (itself for a full checkpoint)."""
    p = Path(path)
    if not is_adapter(p):
        return p
    try:
        base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"{p / ADAPTER_CONFIG}: unreadable ({e})") from None
    if not base:
        raise UserError(f"{p / ADAPTER_CONFIG}: no base_model_name_or_path (the checkpoint it adapts)")
    base = Path(base) if Path(base).is_absolute() else (p / base)
    if not (base / "config.json").is_file():
        raise UserError(f"{p / ADAPTER_CONFIG}: its base {base} is not a local HF checkpoint directory")
    return base


def same_base(path: str | Path, base: str) -> bool:
    """Whether `path` can be served on weights `base`: an adapter of that base (False for a full
    checkpoint); raises ValueError for an adapter of another base."""
    if not is_adapter(path):
        return False
    if str(base_of(path)) != str(base):
        raise ValueError(f"{path} adapts {base_of(path)}, not this engine's base {base}")
    return True


def rank_of(path: str | Path) -> int | None:
    """The adapter's rank r (None for a full checkpoint)."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["r"] if is_adapter(path) else None


def _check_dir(path: str | Path, need_weights: bool) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model directory {p} does not exist")
    if is_adapter(p):  # a LoRA iterate: its weights file, and a base that is a checkpoint itself
        if need_weights and not (p / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{p} holds no {ADAPTER_WEIGHTS} (only safetensors are loaded, never pickle)")
        _check_dir(base_of(p), need_weights)
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

    p = _check_dir(path, need_weights=False)
    if is_adapter(p) and not (p / "tokenizer_config.json").is_file():
        p = base_of(p)  # an adapter saved without its tokenizer uses its base's
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: cannot load its tokenizer ({first})") from None


def load_format(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's ChatFormat: its tokenizer plus the EOS ids its generation config declares."""
    import json


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


    value = json.loads((base_of(path) / "config.json").read_text()).get("max_position_embeddings")
    return value if isinstance(value, int) else None


def load_model(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
               trainable_adapter: bool = False) -> PreTrainedModel:
    """The causal LM of a local checkpoint directory, from safetensors only. An adapter directory (a LoRA
    iterate, tspin_ray/models/lora.py) gives its base with the adapter on it, as a peft `PeftModel`."""

    p = _check_dir(path, need_weights=True)
    model = AutoModelForCausalLM.from_pretrained(
        base_of(p).resolve(),  # absolute: an adapter trained on it records this path as its base
        dtype=getattr(torch, dtype),
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if not is_adapter(p):
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, p, is_trainable=trainable_adapter)
