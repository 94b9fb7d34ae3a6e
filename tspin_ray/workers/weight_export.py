"""Moving a trainer's weights out: the checkpoint export (full weights, or a LoRA adapter in peft's format)
and the broadcast to generators, both one bucket of (ZeRO-3-gathered) parameters at a time, so rank 0
never holds the whole model.

    .venv/bin/pytest tests/unit/workers/test_trainer.py -k export tests/unit/workers/test_weight_sync.py
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from tspin_ray.models.checkpoints import ADAPTER_WEIGHTS
from tspin_ray.models.lora import trainable
from tspin_ray.workers.weight_broadcast import ParamSpec, dtype_name, plan_buckets, send


def gathered(params: list):
    """Full tensors of ZeRO-3 shards inside the block (a no-op for every other stage)."""
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by zero.Init or DeepSpeed's initialize
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def weight_specs(model) -> list:
    """Name, full shape and dtype of every parameter, in the order they are exported and sent."""

    return [ParamSpec(name, tuple(getattr(p, "ds_shape", p.shape)), dtype_name(p.dtype))
            for name, p in model.named_parameters()]


def export_zero3(model, rank: int, out_dir: str, shard_bytes: int) -> None:
    """Gather and write one safetensors shard at a time (all ranks gather, rank 0 writes), so rank 0
    never holds more than one shard of a model that no rank holds whole: a 7B in bf16 is 14.5 GB, the
    default shard 2 GiB. Same files as `save_pretrained`: shards, index, config, generation config."""
    from safetensors.torch import save_file


    shards = plan_buckets(weight_specs(model), shard_bytes)
    params = dict(model.named_parameters())
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    for shard, file in zip(shards, files, strict=True):
        tensors = [params[s.name] for s in shard]
        with gathered(tensors):
            if rank == 0:
                save_file({s.name: t.detach().to("cpu").contiguous() for s, t in zip(shard, tensors, strict=True)},
                          os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({s.name: file for s in shard})
    if rank != 0:
        return
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for shard in shards for s in shard)},
                 "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    model.config.dtype = str(next(iter(params.values())).dtype).split(".")[1]  # as save_pretrained does
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def broadcast_weights(model, group, bucket_bytes: int, device: torch.device,
                      timeout_s: float) -> tuple[int, int, str | None]:
    """Send every bucket of `model` on `group` (rank 0 of the trainers; None on the other ranks).

    Every rank gathers every bucket, whatever happens to the broadcast: under ZeRO-3 each gather is a
    collective of the trainers' own group, so a rank 0 that stopped after a failed send would leave the
    others inside an all-gather that the next trainer call's collectives would then meet. Returns
    (bytes sent, buckets, the first error or None); after an error nothing more is sent. Each bucket
    completes (or raises) within timeout_s."""

    buckets = plan_buckets(weight_specs(model), bucket_bytes)
    params = dict(model.named_parameters())
    sent, error = 0, None
    for bucket in buckets:
        tensors = [params[s.name] for s in bucket]
        with gathered(tensors):
            if group is not None and error is None:
                try:
                    sent += send(group, [bucket], lambda _, t=tensors: t, device, timeout_s)
                except Exception as e:  # a receiver died or timed out: stop sending, keep gathering
                    error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return sent, len(buckets), error


def export_adapter(model, rank: int, out_dir: str) -> None:
    """Write the adapter of a PeftModel (ZeRO-3 shards gathered first; they are megabytes) from rank 0,
    in peft's format: what `PeftModel.save_pretrained` writes, which reads the un-gathered placeholders."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

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
