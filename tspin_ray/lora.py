"""LoRA iterates through peft: the adapter on disk, its base, its export from (ZeRO-3) trainers, its merge.

    .venv/bin/pytest tests/test_lora.py

With `training.lora` set, an iterate pi_t (t >= 1) is an adapter directory in peft's own format
(adapter_config.json + adapter_model.safetensors, the tokenizer beside them) whose
`base_model_name_or_path` is pi_0's absolute path; transformers + peft, vLLM's `LoRARequest` and
`PeftModel.from_pretrained` all read it as it is. Every iteration continues the same adapter (the
papers initialise pi_{t+1} from pi_t), so pi_t = pi_0 + (alpha / r) * B_t @ A_t.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED = "merged"  # pi_t/merged/: the merged export (training.lora.merge_export), not part of the checkpoint


def is_adapter(path: str | Path) -> bool:
    """Whether `path` is a peft adapter directory rather than a full HF checkpoint."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def base_of(path: str | Path) -> Path:
    """The checkpoint an adapter directory applies to (itself for a full checkpoint)."""
    from tspin_ray.errors import UserError

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


def wrap(model, spec, base: str | Path):
    """A fresh adapter on `model`, the weights of checkpoint `base` (B = 0: the wrapped model computes
    exactly what `model` does). `base` is what the adapter's config will name, as an absolute path."""
    import torch
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):  # every rank draws the same A (no broadcast needed), seeded
        torch.manual_seed(0)
        model = get_peft_model(model, spec.peft_config())
    model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return model


def trainable(model) -> list[tuple[str, object]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def export_adapter(model, rank: int, out_dir: str) -> None:
    """Write the adapter of a PeftModel (ZeRO-3 shards gathered first; they are megabytes) from rank 0,
    in peft's format: what `PeftModel.save_pretrained` writes, which reads the un-gathered placeholders."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from tspin_ray.weights_io import gathered

    named = trainable(model)
    with gathered([p for _, p in named]):
        state = {n: p.detach().to("cpu").clone() for n, p in named} if rank == 0 else {}
    if rank != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    tensors = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> None:
    """base + adapter merged into one HF checkpoint (safetensors, tokenizer) that needs neither peft nor
    the base: on the CPU, from the files on disk, so it is the same for every training backend."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from tspin_ray.modeling import load_model, load_tokenizer

    # A ZeRO-3 trainer keeps transformers' zero.Init switch on (HfDeepSpeedConfig); this load is one
    # rank's own, so it must not partition (its gathers would wait for the other ranks).
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        model = load_model(adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code).merge_and_unload()
        model.save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def size_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory (adapter or full), not counting subdirectories."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
