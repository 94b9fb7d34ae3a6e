"""The whole loop on a real local Ray: SFT -> pi_0, 2 self-play iterations per objective (T-SPIN: y0 from iteration 0).

    .venv/bin/pytest tests/e2e/test_driver.py
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import small_config, write_config
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.driver import train
from tspin_ray.models.checkpoints import load_format, load_model
from tspin_ray.rollout.shards import read_shards


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# SPACE's whole run is also in tests/e2e/test_family_runs.py (qwen2, HF engine); SPIN's in tests/e2e/test_family_runs.py
# (zephyr, HF, mixed pairs) and tests/unit/models/test_lora.py (llama3, vLLM, first loss log 2): their own here are -m slow.
@pytest.mark.parametrize("objective", ["tspin", pytest.param("spin", marks=pytest.mark.slow),
                                       pytest.param("space", marks=pytest.mark.slow), "sft"])
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
        assert iters[1]["timing/overlap"] > 0 and iters[1]["timing/train_wait"] > 0
        # y0 are iteration 0's samples (no proto phase); iteration 0 (beta 0) ran no y0 forward
        assert not (run / "proto").exists()
        gen0, gen1 = (read_shards(run / "generations" / f"iter_{t}").to_pylist() for t in range(2))
        assert all(r["proto_ids"] == [] for r in gen0)
        y0 = {r["prompt_id"]: r["generated_ids"] for r in gen0}
        assert all(r["proto_ids"] == y0[r["prompt_id"]] for r in gen1) and len(gen1) == 260
        assert not any("logps/proto" in r for r in train_rows if r["iteration"] == 0)
        steps = [r for r in train_rows if r["iteration"] == 1]
        assert all("advantage/historical" in r and "logps/proto" in r for r in steps)
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


# ZeRO-3 (70 s): -m slow; a sharded load evaluated before any optimizer is also
# tests/unit/workers/test_trainer.py::test_zero3_nll_right_after_load_with_uneven_rows.
@pytest.mark.parametrize("training,trainers", [({}, 1), pytest.param({"backend": "deepspeed", "zero_stage": 3}, 2,
                                                                     marks=pytest.mark.slow)],
                         ids=["torch", "zero3"])
def test_external_model_path_without_sft(ray_session, tmp_path, training, trainers):
    """pi_0 given as a checkpoint path (no SFT stage): iteration 0 trains from it directly. Under ZeRO-3
    pi_0 is evaluated on a model that has just been loaded sharded, before any optimizer exists."""
    from tspin_ray.config.schema import TinyModelSpec
    from tspin_ray.models.tiny import save_tiny

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


@pytest.mark.slow  # 115 s here; ZeRO-3 whole runs stay in the default suite in tests/e2e/test_family_runs.py
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


def test_y0_source_follows_the_config_and_the_run_directory(tmp_path):
    """y0 from iteration 0 unless iteration 0 itself reads y0 (overrides[0].beta != 0) or the run directory
    holds proto shards from before; nothing when no iteration reads y0."""
    from tspin_ray.controller import y0 as proto

    def src(objective=None, iterations=2):
        return proto.y0_source(from_dict(small_config(tmp_path, objective=objective or {}, iterations=iterations)),
                            tmp_path / "proto")

    assert src() == proto.ITERATION_0
    assert src(iterations=1) is None and src({"name": "spin"}) is None and src({"name": "sft"}) is None
    assert src({"overrides": {0: {"beta": 0.05}}}) == proto.SEPARATE
    assert src({"beta": 0.0}) == proto.ITERATION_0  # no historical term anywhere: y0 never scored
    assert src({"y0_from": "proto_phase"}) == proto.SEPARATE and src({"y0_from": "proto_phase"}, iterations=1) is None
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "part-00000.parquet").write_bytes(b"")
    assert src() == src(iterations=1) == proto.SEPARATE


@pytest.mark.slow  # resuming runs of earlier versions; y0 from proto/ shards: test_y0_source_* above, by default
def test_a_run_begun_with_a_proto_phase_keeps_its_y0(ray_session, tmp_path):
    """A T-SPIN run begun by a tspin-ray from before y0 came from iteration 0 holds committed proto/
    shards (the old driver sampled them right after pi_0): today's driver resumes it on those y0 in both
    iterations, and samples no others."""
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare

    cfg = from_dict(small_config(tmp_path, generation={"batch_size": 64, "persistent": True}))  # one engine start
    driver = Driver(prepare(cfg), quiet=True)
    try:
        driver.start_workers()
        old = driver.proto_cache(driver.initial_policy())  # the earlier driver's first two stages
    finally:
        driver.close()
    shards = sorted((tmp_path / "run" / "proto").glob("part-*.parquet"))
    before = [f.read_bytes() for f in shards]
    train(cfg, quiet=True)
    run = tmp_path / "run"
    gen0, gen1 = (read_shards(run / "generations" / f"iter_{t}").to_pylist() for t in range(2))
    assert all(r["proto_ids"] == old[r["prompt_id"]] for r in gen0 + gen1) and len(gen1) == 260
    # the proto phase's samples are not iteration 0's (other seeds), so this tells the two sources apart
    assert sum(r["generated_ids"] != old[r["prompt_id"]] for r in gen0) > 130
    assert sorted((run / "proto").glob("part-*.parquet")) == shards and [f.read_bytes() for f in shards] == before


PATHS = {"task": "paths", "task_size": 300, "eval_size": 40}


@pytest.mark.parametrize("objective", [{"name": "rft", "nll_weight": 1.0},
                                       {"name": "tspin", "dpop_lambda": 5.0, "pair_scope": "first_divergence"}],
                         ids=["rft", "tspin-dpop-first-divergence"])
def test_study_objectives_run_on_a_task_with_a_checker(ray_session, tmp_path, objective):
    """The study's variants in a whole run on `paths`: every sample carries the checker's verdict (RFT
    trains on exactly those), T-SPIN with DPOP's hinge gets lp_ref(y) from the generator, and the
    distribution of every checkpoint is scored once (sampled for the final one only)."""
    from tspin_ray.data.tasks import TASKS
    from tspin_ray.study.distribution import DistributionSpec, evaluate_run

    cfg = from_dict(small_config(tmp_path, data=PATHS, objective=objective, iterations=1,
                                 generation={"max_new_tokens": 24}, eval={"max_new_tokens": 24},
                                 training={**small_config(tmp_path)["training"], "max_length": 72}))
    train(cfg, quiet=True)
    run = tmp_path / "run"
    rows = read_shards(run / "generations" / "iter_0").to_pylist()
    prompts = {e["id"]: e["prompt"] for e in TASKS["paths"].make(300, 0)}
    verdicts = [v for r in rows for v in r["generated_valid"]]
    assert len(verdicts) == len(rows) == 260
    fmt = load_format(run / "checkpoints" / "pi_0")
    for r in rows:  # accepted, and written as the ids y would have (what RFT trains on)
        x = prompts[r["prompt_id"]]
        assert r["generated_valid"] == [TASKS["paths"].check(x, g) and ids == fmt.response_ids(x, g.strip())
                                        for g, ids in zip(r["generated"], r["generated_ids"], strict=True)]
    it = [r for r in _metrics(run) if r["phase"] == "iteration" and r["iteration"] == 0][-1]
    assert it["generate/valid"] == pytest.approx(sum(verdicts) / len(verdicts))
    steps = [r for r in _metrics(run) if r["phase"] == "train" and r["iteration"] == 0]
    if objective["name"] == "rft":
        assert all(0.0 <= r["rft/verified"] <= 1.0 for r in steps)
        assert all(r["ref_real"] != r["ref_real"] for r in rows)  # NaN: RFT scores no reference
        spec = DistributionSpec(temperatures=(0.5, 1.0), samples=2, prompts=8, max_new_tokens=24)
        assert evaluate_run(run, cfg, spec) and not evaluate_run(run, cfg, spec)  # scored once
        got = json.loads((run / "distribution.json").read_text())["checkpoints"]
        assert set(got) == {"pi_0", "pi_1"} and "sampled_validity" not in got["pi_0"]["heldout"]
        assert got["pi_1"]["train"]["prompts"] == 8 and len(got["pi_1"]["heldout"]["sampled_coverage"]) == 2
        assert all(0.0 <= v <= 1.0 for v in got["pi_1"]["heldout"]["validity"])
    else:
        assert all(r["ref_real"] < 0 for r in rows)  # lp_ref(y) under pi_t, for the hinge
        assert all(r["loss"] == r["loss"] and "advantage/current" in r for r in steps)


def test_eval_and_generate_leave_the_run_directory_alone(ray_session, tmp_path, tiny_ckpt, capsys):
    """`tspin-ray eval` and `generate` read a checkpoint and write only what they print or --out: the
    config's output_dir is neither created nor checked, so one that holds another run is no obstacle."""
    from tests.helpers import write_config
    from tspin_ray import cli

    raw = small_config(tmp_path, data={"task": "addition", "task_size": 60, "eval_size": 8, "fraction": 1.0})
    raw["model"] = {"path": str(tiny_ckpt)}
    cfg = write_config(tmp_path / "eval.yaml", raw)
    assert cli.main(["eval", "--config", str(cfg), "--checkpoint", str(tiny_ckpt), "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"eval/exact_match", "eval/nll", "timing/eval", "health/logp_real_heldout",
                           "health/logp_real_train", "health/distinct_greedy", "health/unfinished_greedy"}
    assert scores["eval/nll"] > 0 and 0 <= scores["health/unfinished_greedy"] <= 1
    assert not (tmp_path / "run").exists()

    (tmp_path / "run").mkdir()  # another run's directory: eval used to refuse it, and wrote config.yaml
    (tmp_path / "run" / "config.yaml").write_text("other: run\n")
    out = tmp_path / "gen.jsonl"
    assert cli.main(["generate", "--config", str(cfg), "--checkpoint", str(tiny_ckpt), "--out", str(out),
                     "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 52 and all(r["generated"] for r in rows)  # 60 rows less 8 held out, one sample each
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    assert (tmp_path / "run" / "config.yaml").read_text() == "other: run\n"


def test_a_collapsing_run_warns_stops_and_points_best_at_the_better_iterate(ray_session, tmp_path, capsys):
    """lr 0.05 pushes the tiny model's held-out NLL from 2.58 (pi_0) to 2.95 (pi_1, 1.14x): with
    eval.collapse_nll_factor 1.1 and stop_on_collapse the run warns at pi_1, stops there, keeps its
    iterates, names pi_0 the best (checkpoints/best, the manifest, the report), and a rerun does nothing."""
    from tspin_ray import cli
    from tspin_ray.analysis.report import write_report

    raw = small_config(tmp_path, training={"lr": 0.05}, eval={"collapse_nll_factor": 1.1, "stop_on_collapse": True},
                       iterations=2)
    result = train(from_dict(raw), quiet=True)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: pi_1 looks collapsed")]
    assert len(warnings) == 1 and "is 1.1" in warnings[0] and "eval.collapse_nll_factor 1.1" in warnings[0]
    assert warnings[0].endswith("Best iterate: pi_0 (eval/nll 2.576, eval.select; checkpoints/best); the run "
                                "stops here (eval.stop_on_collapse)")
    run = tmp_path / "run"
    assert result["iterations"] == 1 and result["best"] == "pi_0" and result["stopped"].startswith("held-out NLL")
    assert os.readlink(run / "checkpoints" / "best") == "pi_0" and (run / "checkpoints" / "pi_1").is_dir()
    assert not (run / "checkpoints" / "pi_2").exists()
    manifest = json.loads((run / "manifest.json").read_text())["entries"]
    assert manifest["best"]["iterate"] == "pi_0" and manifest["best"]["metric"] == "eval/nll"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    it0 = [r for r in rows if r.get("phase") == "iteration" and r["iteration"] == 0][0]
    assert it0["health/best_iterate"] == 0 and it0["health/nll_vs_best"] > 1.1
    assert {"health/logp_real_train", "health/logp_real_heldout", "health/distinct_greedy",
            "health/unfinished_greedy", "health/distinct_samples", "health/sample_tokens"} <= set(it0)
    answers = [json.loads(line) for line in (run / "eval" / "pi_1.jsonl").read_text().splitlines()]
    # the tiny model's answers: the share that ran out of tokens, as the greedy text shows it (EOS cut off)
    cut = [a for a in answers if len(a["greedy"]) >= raw["eval"].get("max_new_tokens", 64)]
    assert it0["health/unfinished_greedy"] == pytest.approx(len(cut) / len(answers))
    answers = [json.loads(line) for line in (run / "eval" / "pi_1.jsonl").read_text().splitlines()]
    assert len(answers) == 40 and set(answers[0]) == {"prompt_id", "prompt", "answer", "greedy"}
    report = write_report(run).read_text()
    assert "Best iterate: **pi_0** by eval/nll" in report and "| prompt | annotated | pi_0 | pi_1 |" in report
    capsys.readouterr()
    config = str(write_config(tmp_path / "c.yaml", raw))
    assert cli.main(["train", "--config", config, "--quiet"]) == 0
    assert "already complete (1 iterations); nothing to do" in capsys.readouterr().out
    # the thresholds do not change what an iteration computes: the same run goes on without the stop
    assert cli.main(["train", "--config", config, "eval.stop_on_collapse=false", "--quiet"]) == 0
    assert "2 iterations, final checkpoint" in capsys.readouterr().out and (run / "checkpoints" / "pi_2").is_dir()
