"""LoRA adapters made locally for tests, and what the harness must have written for a LoRA run."""

from __future__ import annotations

import torch

from tspin_ray.config.schema import LoraSpec
from tspin_ray.models.checkpoints import load_format, load_model
from tspin_ray.models.lora import wrap

SPEC = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def make_adapter(base, out, seed: int, spec: LoraSpec = SPEC):
    """An adapter on `base` with random A and B (B = 0 would leave A without gradient and the model
    unchanged), written the way the trainers export one."""
    model = wrap(load_model(base), spec, base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    load_format(base).tokenizer.save_pretrained(out)
    return out


def check_harness_outputs(run) -> None:
    """The harness scores reach TensorBoard and the report (table and plot)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tspin_ray.analysis.report import write_report

    acc = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert "iteration/eval/lm_eval/tspin_heldout/exact_match" in acc.Tags()["scalars"]
    md = write_report(run).read_text()
    assert "Benchmarks (lm-evaluation-harness" in md and "| iter | tspin_heldout/exact_match |" in md
    assert (run / "report" / "benchmarks.png").stat().st_size > 1000
