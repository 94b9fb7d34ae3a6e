"""y0, T-SPIN's proto-synthetic responses: where a run takes them from.

    .venv/bin/pytest tests/e2e/test_driver.py -k "tspin or proto"

docs/concepts.md: y0 is sampled once from pi_0, and iteration 0's y' may serve as y0 (both are samples of
pi_0 under the same sampling settings). So a T-SPIN run takes y0 from iteration 0's generation whenever
iteration 0 does not read y0 itself (beta = 0 there, the default): one generation phase less, and no y0
forward in iteration 0 (`Objective.proto` in algorithms/objectives.py). One difference: iteration 0
trains against exactly these y', so lp(y0) starts lower than for independent samples of pi_0 and the historical margin starts higher.
A separate proto phase (proto/ shards) runs when objective.y0_from is proto_phase, when
objective.overrides[0] sets beta != 0, or when the run directory already holds proto shards: a run begun
by a tspin-ray from before keeps the y0 it made.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

SEPARATE, ITERATION_0 = "proto phase", "iteration 0"


def y0_source(cfg, proto_dir: Path | None = None) -> str | None:
    """SEPARATE, ITERATION_0, or None when no iteration reads y0 (not T-SPIN, or one iteration at beta 0)."""
    obj = cfg.objective
    if not obj.entry.reads_y0 or cfg.iterations == 0:
        return None
    if proto_dir is not None and any(Path(proto_dir).glob("part-*.parquet")):
        return SEPARATE  # begun with a proto phase: keep its y0
    if obj.entry.proto(obj.for_iteration(0, cfg.iterations).loss_params):
        return SEPARATE  # iteration 0 reads y0 before it has samples of its own
    if cfg.iterations == 1:
        return None
    return SEPARATE if obj.y0_from == "proto_phase" else ITERATION_0


def separate_phase(cfg) -> bool:
    """Whether the config itself asks for a proto phase (whatever a run directory holds)."""
    return y0_source(cfg) == SEPARATE


def y0_of_iteration_0(table: pa.Table) -> dict[str, list]:
    """prompt_id -> the k y' samples that pi_0 wrote in iteration 0 (committed gen_0 shards)."""
    own = table.filter(pc.equal(table.column("source_iteration"), 0))
    return dict(zip(own.column("prompt_id").to_pylist(), own.column("generated_ids").to_pylist(), strict=True))
