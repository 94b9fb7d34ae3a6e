"""LoRA iterates through peft: the adapter on disk, its base, its export from (ZeRO-3) trainers, its merge.

    .venv/bin/pytest tests/unit/models/test_lora.py

With `training.lora` set, an iterate pi_t (t >= 1) is an adapter directory in peft's own format
(adapter_config.json + adapter_model.safetensors, the tokenizer beside them) whose
`base_model_name_or_path` is pi_0's absolute path; transformers + peft, vLLM's `LoRARequest` and
`PeftModel.from_pretrained` all read it as it is. Every iteration continues the same adapter (the
papers initialise pi_{t+1} from pi_t), so pi_t = pi_0 + (alpha / r) * B_t @ A_t.
"""

from __future__ import annotations

from pathlib import Path

from tspin_ray.models.checkpoints import load_model, load_tokenizer


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


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> None:
    """base + adapter merged into one HF checkpoint (safetensors, tokenizer) that needs neither peft nor
    the base: on the CPU, from the files on disk, so it is the same for every training backend."""
    from transformers.integrations import deepspeed as hf_deepspeed


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
