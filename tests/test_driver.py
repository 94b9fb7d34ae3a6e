"""The whole loop on a real local Ray: SFT -> pi_0, proto cache, 2 self-play iterations per objective.

    .venv/bin/pytest tests/test_driver.py
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import small_config
from tspin_ray.config import from_dict
from tspin_ray.driver import train
from tspin_ray.modeling import load_model
from tspin_ray.pipeline import read_shards


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["tspin", "spin", "space", "sft"])
def test_two_iterations_per_objective(ray_session, tmp_path, objective, capsys):
    extra = {"mu": 2} if objective == "space" else {}
    # Small generation batches so iteration 0 streams many batches to the trainer.
    cfg = from_dict(small_config(tmp_path, objective={"name": objective, **extra}, generation={"batch_size": 8}))
    result = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert result["iterations"] == 2
    manifest = json.loads((run / "manifest.json").read_text())["entries"]
    assert {"pi_0", "pi_1", "pi_2", "iter_0", "iter_1", "complete"} <= set(manifest)
    for t in range(3):  # every iterate is an HF checkpoint that transformers loads
        assert (run / "checkpoints" / f"pi_{t}" / "model.safetensors").is_file()
    load_model(run / "checkpoints" / "pi_2")
    iters = [r for r in _metrics(run) if r["phase"] == "iteration"]
    assert [r["iteration"] for r in iters] == [-1, 0, 1]
    for r in iters:
        assert 0.0 <= r["eval/exact_match"] <= 1.0 and r["eval/nll"] > 0
    for r in iters[1:]:
        assert {"timing/generate", "timing/train", "timing/weight_sync", "timing/iteration"} <= set(r)
        assert r["train/rows"] >= 260  # 300 - 40 held out
    train_rows = [r for r in _metrics(run) if r["phase"] == "train"]
    assert train_rows and all("loss" in r and "lr" in r for r in train_rows)
    if objective == "sft":
        assert not (run / "generations").exists()
        return
    for t in range(2):
        table = read_shards(run / "generations" / f"iter_{t}")
        samples = 2 if objective == "space" else 1
        assert all(len(g) == samples for g in table.column("generated_ids").to_pylist())
        new = [s for s in table.column("source_iteration").to_pylist() if s == t]
        assert len(new) == 260 and len(set(table.column("prompt_id").to_pylist())) == 260
        if objective == "spin" and t == 1:  # iteration 1 also trains on iteration 0's pairs
            assert table.num_rows == 520
        if objective in ("spin", "space"):
            assert all(x < 0 for x in table.column("ref_real").to_pylist())
    if objective == "tspin":
        # Streaming: the first optimizer step came before the last generation batch finished.
        assert iters[1]["timing/first_train_step"] < iters[1]["timing/last_generation"]
        assert read_shards(run / "proto").num_rows == 260
        steps = [r for r in train_rows if r["iteration"] == 1]
        assert "advantage/historical" in steps[0] and "logps/proto" in steps[0]
    if objective == "spin":
        first = [r for r in train_rows if r["iteration"] == 0][0]
        # pi_t is its own reference at the first step: the SPIN loss is log 2 (to float precision).
        assert first["loss"] == pytest.approx(0.6931, abs=2e-3)
    if objective == "tspin":  # rerunning a finished run does nothing and says so
        before = (run / "metrics.jsonl").read_text()
        capsys.readouterr()
        train(cfg, quiet=True)
        assert "already complete" in capsys.readouterr().out
        assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("training,trainers", [({}, 1), ({"backend": "deepspeed", "zero_stage": 3}, 2)],
                         ids=["torch", "zero3"])
def test_external_model_path_without_sft(ray_session, tmp_path, training, trainers):
    """pi_0 given as a checkpoint path (no SFT stage): iteration 0 trains from it directly. Under ZeRO-3
    pi_0 is evaluated on a model that has just been loaded sharded, before any optimizer exists."""
    from tspin_ray.config import TinyModelSpec
    from tspin_ray.modeling import save_tiny

    ckpt = save_tiny(tmp_path / "given", TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2,
                                                        intermediate_size=128))
    raw = small_config(tmp_path, model={"path": str(ckpt)}, iterations=1, objective={"name": "spin"},
                       training=training, resources={"trainers": trainers, "trainer_cpus": 0.5})
    raw["model"] = {"path": str(ckpt)}
    result = train(from_dict(raw), quiet=True)
    run = tmp_path / "run"
    assert result["iterations"] == 1 and (run / "checkpoints" / "pi_1" / "model.safetensors").is_file()
    assert not (run / "checkpoints" / "pi_0").exists()  # the given checkpoint is used in place, not copied
    manifest = json.loads((run / "manifest.json").read_text())["entries"]
    assert manifest["pi_0"]["external"] and not [r for r in _metrics(run) if r["phase"] == "sft"]


def test_zero3_spin_run_equals_the_torch_run(ray_session, tmp_path):
    """The 7B jobs' trainer path on CPU: SFT and 2 SPIN iterations with 2 DeepSpeed ZeRO-3 ranks (zero.Init
    loading, gradient checkpointing, shards gathered for export and for the bucketed broadcast into a
    long-lived generator) end where 2 plain torch DDP ranks with per-phase generators end: the same
    weights to float32 rounding and the same evaluation every iteration."""
    ways = {"torch": ({"backend": "torch"}, {}),
            "zero3": ({"backend": "deepspeed", "zero_stage": 3, "gradient_checkpointing": True},
                      {"persistent": True, "weight_sync": "broadcast"})}
    for name, (training, generation) in ways.items():
        train(from_dict(small_config(tmp_path, output_dir=str(tmp_path / name), objective={"name": "spin"},
                                     training=training, generation=generation, sft={"micro_batch_size": 16},
                                     resources={"trainers": 2, "trainer_cpus": 0.5})), quiet=True)
    torch_run, zero3_run = (tmp_path / name for name in ways)
    want, got = (load_model(run / "checkpoints" / "pi_2").state_dict() for run in (torch_run, zero3_run))
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-4
    assert any(float((want[k] - load_model(torch_run / "checkpoints" / "pi_0").state_dict()[k]).abs().max()) > 1e-3
               for k in want)  # the iterations moved the weights by far more than the tolerance
    its = {name: [r for r in _metrics(tmp_path / name) if r["phase"] == "iteration"] for name in ways}
    assert [r["eval/nll"] for r in its["zero3"]] == pytest.approx([r["eval/nll"] for r in its["torch"]], rel=1e-5)
    assert all(r["weight_sync/gbps"] > 0 for r in its["zero3"][1:])  # pi_1 and pi_2 broadcast, not reloaded
