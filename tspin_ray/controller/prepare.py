"""Everything a run needs, checked before any work or any write: the model (a hub id resolved to its local
snapshot), the data read and validated with y in context, the engine and the objective's requirements.

    .venv/bin/pytest tests/e2e/test_bad_input.py
"""

from __future__ import annotations

import dataclasses

from tspin_ray.config.schema import RunConfig
from tspin_ray.data.loading import load_splits
from tspin_ray.errors import UserError
from tspin_ray.evaluation.harness import check_tasks
from tspin_ray.hub import resolve_hub_ids
from tspin_ray.models.chat_format import ChatFormat
from tspin_ray.models.checkpoints import check_checkpoint, load_format, max_positions
from tspin_ray.models.tiny import tiny_format


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Validated inputs: nothing is written before these all exist."""
    cfg: RunConfig
    train: list
    eval: list
    format: ChatFormat  # of the policy's tokenizer


def prepare(cfg: RunConfig) -> Prepared:
    """Check every input before any work or any write: model path, data, objective needs, resources."""
    cfg = resolve_hub_ids(cfg)

    if cfg.model.path is not None:
        check_checkpoint(cfg.model.path)
        fmt = load_format(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        positions = max_positions(cfg.model.path)
    else:
        fmt, positions = tiny_format(cfg.model.tiny), cfg.model.tiny.max_position_embeddings
    if cfg.generation.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("generation.backend is vllm but vllm is not installed "
                            "(pip install -e .[cpu] or .[gpu], or set generation.backend=hf)") from None
        if positions is not None and cfg.training.max_length >= positions:
            # vLLM scores prompt + response as a prompt, which must be shorter than its max_model_len.
            raise UserError(f"training.max_length ({cfg.training.max_length}) must be below the model's "
                            f"max_position_embeddings ({positions}) for the vllm backend")
    if cfg.eval.lm_eval is not None:
        check_tasks(cfg.eval.lm_eval)
    splits = load_splits(cfg.data, count_tokens=lambda *context: len(fmt.prompt_ids(*context)))
    if not splits.train:
        raise UserError(f"no training rows left after data.fraction={cfg.data.fraction} / data.limit")
    for e in splits.train + splits.eval:  # y in context for every row, before any work (one-line refusal)
        fmt.response_ids(e.prompt, e.response, e.system, history=e.history)
    return Prepared(cfg, splits.train, splits.eval, fmt)
