"""`tspin-ray study`: config validation, claim checks on made-up numbers, and one smoke study on a real
local Ray (1 seed, 1 iteration, 3 methods, tiny sizes; about a minute and a half on 2 cores).

    .venv/bin/pytest tests/unit/study/test_study.py
    .venv/bin/pytest -m study tests/unit/study/test_study.py      (the full study of jobs/study-sorting.yaml: hours)
"""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import time

import pytest
import yaml

from tests.helpers import CLI, REPO, small_config, write_config
from tspin_ray.errors import UserError
from tspin_ray.study import plan as study
from tspin_ray.study import results as study_results
from tspin_ray.study import runner, stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = {
    "sft_continued": {"objective": {"name": "sft"}},
    "spin": {"objective": {"name": "spin"}},
    "tspin": {"objective": {"name": "tspin"}},
    "tspin_no_history": {"objective": {"name": "tspin", "beta": 0.0}},
    "space": {"objective": {"name": "space", "mu": 1}},
}
SMOKE_METHODS = ["sft_continued", "tspin", "tspin_no_history"]


def study_raw(tmp_path) -> dict:
    """SMALL (tests/conftest.py) as the base, shrunk further: 220 training rows, 20 held out."""
    base = small_config(tmp_path, data={"task_size": 240, "eval_size": 20})
    for key in ("objective", "iterations", "output_dir"):
        base.pop(key)
    base["data"].pop("fraction")
    base["objective"] = {"nll_weight": 1.0}  # shared by every method
    return {"base": base, "seeds": [0, 1], "iterations": 2, "fraction": 0.5, "full_fraction": 1.0,
            "output_dir": str(tmp_path / "study"), "methods": METHODS}


# ------------------------------------------------------------ validation (no Ray)
@pytest.mark.parametrize("change, message", [
    ({"seed": 3}, "unknown study key 'seed' (did you mean 'seeds'?)"),
    ({"seeds": []}, "seeds: expected a non-empty list"),
    ({"seeds": [0, 0]}, "seeds: expected a non-empty list of distinct"),
    ({"iterations": 0}, "iterations: expected an integer >= 1"),
    ({"fraction": 1.5}, "fraction: expected a number in (0, 1]"),
    ({"methods": {}}, "methods: expected a non-empty mapping"),
    ({"methods": {"pi0": {"objective": {"name": "sft"}}}}, "methods.pi0: 'pi0' is the name of a study run"),
    ({"methods": {"a": {"training": {"lr": 1e-4}}}}, "methods.a.objective.name: required"),
    ({"methods": {"a": {"objective": {"name": "tspn"}}}}, "methods.a (run a): objective.name: 'tspn' is not"),
    ({"methods": {"a": {"objective": {"name": "sft"}, "iterations": 3}}}, "methods.a.iterations: set by the study"),
    ({"methods": {"a": {"objective": {"name": "sft"}, "trainig": {}}}}, "did you mean 'training'"),
    ({"keep_checkpoints": "best"}, "keep_checkpoints: expected one of final, all, got 'best'"),
])
def test_bad_study_configs_name_the_key(tmp_path, change, message):
    raw = {**study_raw(tmp_path), **change}
    with pytest.raises(UserError) as e:
        study.parse_study(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["iterations", "output_dir", "data.fraction", "data.seed", "objective.name"])
def test_base_may_not_set_what_the_study_sets(tmp_path, key):
    raw = study_raw(tmp_path)
    node = raw["base"]
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = 1
    with pytest.raises(UserError, match=f"base.{key}: set by the study"):
        study.parse_study(raw)


def test_plan_and_narrowing(tmp_path):
    full = study.parse_study(study_raw(tmp_path), source="s.yaml")
    narrowed = study.narrow(full, seeds=[1], iterations=1, methods=["tspin", "sft_continued"])
    specs = study.plan(narrowed)
    assert [s.key for s in specs] == ["seed1/pi0", "seed1/sft_full", "seed1/sft_continued", "seed1/tspin"]
    pi0, full_sft, _, tspin = (s.config() for s in specs)
    assert (pi0.data.fraction, full_sft.data.fraction, tspin.data.fraction) == (0.5, 1.0, 0.5)
    assert pi0.iterations == full_sft.iterations == 0 and tspin.iterations == 1
    assert pi0.seed == tspin.seed == tspin.data.seed == 1 and pi0.model.tiny.seed == 1
    assert tspin.model.tiny is None and tspin.model.path.endswith("seed1/pi0/checkpoints/pi_0")
    assert not tspin.sft.enabled and tspin.objective.nll_weight == 1.0  # base's shared objective settings
    # everything but model, objective, fraction, iterations and output_dir is the same for every run
    assert pi0.training == tspin.training and pi0.generation == tspin.generation and pi0.eval == tspin.eval
    assert study.command_line(narrowed, full) == (
        "tspin-ray study --config s.yaml --seeds 1 --iterations 1 --methods sft_continued tspin")
    with pytest.raises(UserError, match="--methods: unknown method 'tspn' .did you mean 'tspin'"):
        study.narrow(full, methods=["tspn"])


# ------------------------------------------------------------ claim checks on made-up numbers
def summary_of(means: dict[str, list[list[float]]], full: list[float]) -> dict:
    """means[method] = per column (pi0, 0, 1, ...) the per-seed exact matches."""
    cols = [-1, *range(len(next(iter(means.values()))) - 1)]
    methods = {m: {"exact_match": [stats.stats(v) for v in per], "nll": [stats.stats(v) for v in per]}
               for m, per in means.items()}
    return {"columns": cols, "methods": methods, "sft_full": {"exact_match": stats.stats(full),
                                                             "nll": stats.stats(full)}}


def by_id(summary, alignment=()):
    return {c["id"]: c for c in study_results.claims(summary, list(alignment))}


def test_paired_differences_cancel_the_spread_of_pi0():
    """Seeds' pi_0 at 0.2 / 0.5 / 0.8 (std 0.3); every seed gains exactly 0.05: unpaired the gain is hidden
    in the spread, paired it is 0.05 ± 0.000 and the claim holds."""
    assert doctest.testmod(study_results).failed == 0
    s = summary_of({"tspin": [[0.2, 0.5, 0.8], [0.25, 0.55, 0.85]],
                    "tspin_no_history": [[0.2, 0.5, 0.8], [0.2, 0.5, 0.8]]}, full=[0.9, 0.9, 0.9])
    d = by_id(s)["d"]
    assert d["status"] == "holds" and d["difference"] == pytest.approx(0.05) and d["difference_std"] < 1e-9
    assert study_results.deltas(s)["tspin"][1]["mean"] == pytest.approx(0.05)
    assert study_results.deltas(s)["tspin_no_history"][1]["mean"] == pytest.approx(0.0)


def test_claims_follow_the_numbers():
    s = summary_of({"tspin": [[0.5, 0.52], [0.6, 0.62], [0.7, 0.72]],
                    "tspin_no_history": [[0.5, 0.52], [0.55, 0.56], [0.5, 0.52]],
                    "spin": [[0.5, 0.52], [0.8, 0.82], [0.3, 0.32]],
                    "space": [[0.5, 0.52], [0.5, 0.52], [0.71, 0.70]]}, full=[0.9, 0.92])
    align = [{"method": "tspin", "seed": 0, "iteration": t, "train/logps/real": -1.0,
              "train/logps/generated": -2.0, "train/rewards/real": -1.0, "train/rewards/generated": -2.0}
             for t in range(2)]
    c = by_id(s, align)
    assert c["a"]["status"] == "holds"
    assert c["b"]["status"] == "holds" and c["b"]["peak_iteration"] == 0
    assert c["c"]["status"] == "does not hold"
    assert c["d"]["status"] == "holds"
    assert c["e"]["status"] == "holds" and c["e"]["fraction"] == 1.0
    assert c["f"]["status"] == "holds"
    for claim in c.values():
        assert claim["status"] in study.VERDICTS and claim["sentence"].startswith(f"({claim['id']})")


def test_claims_per_setting_compare_methods_of_that_setting_only():
    """Base names and `.lr1e-4` names side by side: each setting's claims read its own methods."""
    up, down = [[0.5, 0.52], [0.6, 0.62], [0.7, 0.72]], [[0.5, 0.52], [0.4, 0.42], [0.3, 0.32]]
    s = summary_of({"tspin": up, "tspin_no_history": down, "tspin.lr1e-4": down,
                    "tspin_no_history.lr1e-4": up}, full=[0.9, 0.92])
    base, other = by_id(s), {c["id"]: c for c in study_results.claims(s, [], "lr1e-4")}
    assert base["a"]["status"] == "holds" and other["a"]["status"] == "does not hold"
    assert base["d"]["status"] == "holds" and other["d"]["status"] == "does not hold"
    assert other["f"]["status"] == "not measured" and "space.lr1e-4" in other["f"]["sentence"]
    assert study_results.setting("tspin.lr1e-4") == "lr1e-4" and study_results.setting("tspin") == ""


def test_claims_inconclusive_within_one_std_of_the_per_seed_differences_or_with_one_seed():
    noisy = summary_of({"tspin": [[0.5, 0.7], [0.62, 0.4], [0.6, 0.5]], "spin": [[0.5, 0.7], [0.5, 0.7],
                                                                                [0.5, 0.6]]}, full=[0.5, 0.7])
    c = by_id(noisy)
    assert c["a"]["status"] == c["b"]["status"] == c["c"]["status"] == "inconclusive"
    assert c["d"]["status"] == c["e"]["status"] == c["f"]["status"] == "not measured"
    one_seed = summary_of({"tspin": [[0.5], [0.9], [0.1]]}, full=[0.2])
    assert by_id(one_seed)["a"]["status"] == by_id(one_seed)["c"]["status"] == "inconclusive"


# ------------------------------------------------------------ the smoke study (real runs)
@pytest.mark.slow  # 145 s here: real runs of every method; the study's logic is tested above without runs
def test_smoke_study(ray_session, tmp_path):
    raw = study_raw(tmp_path)
    cfg_path = write_config(tmp_path / "study.yaml", raw)
    full = study.load_study(cfg_path)
    narrowed = study.narrow(full, seeds=[0], iterations=1, methods=SMOKE_METHODS)
    lines: list[str] = []
    t0 = time.time()
    md = runner.run_study(narrowed, quiet=True, command=study.command_line(narrowed, full), say=lines.append)
    first_s = time.time() - t0
    out = tmp_path / "study"
    assert md == out / "results.md"

    results = json.loads((out / "results.json").read_text())
    points = {(p["method"], p["seed"], p["iteration"]): p for p in results["points"]}
    assert set(points) == {(m, 0, t) for m in SMOKE_METHODS for t in (-1, 0)}
    for p in points.values():
        assert 0.0 <= p["exact_match"] <= 1.0 and math.isfinite(p["nll"]) and p["nll"] > 0
    pi0 = json.loads((out / "seed0" / "pi0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(points[(m, 0, -1)]["exact_match"] == pi0["eval/exact_match"] for m in SMOKE_METHODS)
    assert 0.0 <= results["sft_full"][0]["exact_match"] <= 1.0
    assert [c["id"] for c in results["claims"]] == list("abcdef")
    assert {k for k in results["wall_s"]} == {f"seed0/{n}" for n in ["pi0", "sft_full", *SMOKE_METHODS]}

    text = md.read_text()
    assert "| method | pi0 | 0 |" in text and "SFT on 100%" in text
    assert all(f"| {m} |" in text for m in SMOKE_METHODS)
    assert all(f"- ({c}) " in text for c in "abcdef")
    assert "--iterations 1 --methods sft_continued tspin tspin_no_history" in text
    assert "## Self-play health" in text and set(results["health"]) == set(SMOKE_METHODS)
    assert all(results["health"][m]["0"]["best"].startswith("pi_") for m in SMOKE_METHODS)
    for png in ("results_em.png", "results_nll.png", "results_delta.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    # One iteration reads no y0 (beta = 0 in iteration 0; later ones take iteration 0's samples): no proto
    # phase ran, so there was nothing to share
    assert not any((out / "seed0" / m / "proto").exists() for m in SMOKE_METHODS)
    assert results["proto_reused"] == {} and not any("reusing the proto cache" in line for line in lines)
    # pi_0 was evaluated once, in the pi0 run; the methods' runs took that row instead of redoing it
    for m in SMOKE_METHODS:
        rows = [json.loads(x) for x in (out / "seed0" / m / "metrics.jsonl").read_text().splitlines()]
        first = [r for r in rows if r.get("iteration") == -1]
        assert len(first) == 1 and first[0]["copied_from"].endswith("seed0/pi0")
        assert first[0]["eval/exact_match"] == pi0["eval/exact_match"]

    # Rerunning is a no-op: every run skipped without starting Ray, the same results written.
    before = {f: (out / f).read_bytes() for f in ("results.json", "results.md")}
    args = ["study", "--config", str(cfg_path), "--seeds", "0", "--iterations", "1", "--methods", *SMOKE_METHODS,
            "--quiet"]
    t0 = time.time()
    proc = subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=300)
    again_s = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("complete, skipped") == 5 and f"results: {md}" in proc.stdout
    assert {f: (out / f).read_bytes() for f in before} == before
    assert again_s < min(60.0, first_s)
    print(f"smoke study: {first_s:.0f}s; rerun {again_s:.1f}s")


def test_study_cli_errors_are_one_line(tmp_path):
    raw = study_raw(tmp_path)
    raw["methods"] = {"a": {"objective": {"name": "tspin", "betta": 1}}}
    cfg = write_config(tmp_path / "bad.yaml", raw)
    proc = subprocess.run(CLI + ["study", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "methods.a (run a): unknown config key 'objective.betta'" \
        in proc.stderr


# ------------------------------------------------------------ the full study (hours on 2 cores)
@pytest.mark.study
def test_full_study():
    """jobs/study-sorting.yaml into runs/study-sorting (resumable: rerun to continue)."""
    proc = subprocess.run(CLI + ["study", "--config", "jobs/study-sorting.yaml"], cwd=REPO)
    assert proc.returncode == 0
    cfg = yaml.safe_load((REPO / "jobs" / "study-sorting.yaml").read_text())
    results = json.loads((REPO / cfg["output_dir"] / "results.json").read_text())
    n = len(cfg["seeds"]) * len(cfg["methods"]) * (cfg["iterations"] + 1)
    assert len(results["points"]) == n
    assert all(c["status"] in study.VERDICTS for c in results["claims"])


# ------------------------------------------------------------ declared claims and distribution curves
TEMPS = [0.5, 1.0, 1.5]


def declared_raw(tmp_path, claims) -> dict:
    return {**study_raw(tmp_path), "distribution": {"temperatures": TEMPS, "samples": 4, "prompts": 5},
            "claims": claims}


def fake_curves(root, run, seeds_curves: dict[int, list[float]], metric="validity", split="heldout", ckpt="pi_2"):
    for seed, values in seeds_curves.items():
        d = root / f"seed{seed}" / run
        d.mkdir(parents=True, exist_ok=True)
        f = d / "distribution.json"
        got = json.loads(f.read_text()) if f.exists() else {"spec": {}, "checkpoints": {}}
        got["checkpoints"].setdefault(ckpt, {}).setdefault(split, {})[metric] = values
        f.write_text(json.dumps(got))


@pytest.mark.parametrize("claims, message", [
    ([{"id": "x", "claim": "c", "a": "tspn", "b": "spin", "metric": "exact_match"}],
     "claims[0].a: 'tspn' is not a method of the study"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "spin", "metric": "heldout/validty"}],
     "claims[0].metric: 'heldout/validty' is not exact_match, nll or"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "spin", "metric": "heldout/validity", "at": 0.7}],
     "claims[0].at: expected best, all or one of distribution.temperatures, got 0.7"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "spin"}], "claims[0]: expected a mapping with keys"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "spin", "metric": "train/coverage", "at": True}],
     "claims[0].at: expected best, all or one of distribution.temperatures, got True"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "spin", "metric": "train/coverage", "at": "max"}],
     "claims[0].at: expected best, all or one of distribution.temperatures, got 'max'"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "pi0", "metric": "nll"}] * 2, "claims: ids must be distinct"),
    ([{"id": "x", "claim": "c", "a": "tspin@3", "b": "tspin@2", "metric": "nll"}],
     "claims[0].a: '@3' expected @best or @0..@2"),
    ([{"id": "x", "claim": "c", "a": "tspin@last", "b": "spin", "metric": "nll"}],
     "claims[0].a: '@last' expected @best or @0..@2"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "pi0@1", "metric": "nll"}], "claims[0].b: '@1' expected"),
    ([{"id": "x", "claim": "c", "a": "tspn@1", "b": "spin", "metric": "nll"}], "claims[0].a: 'tspn' is not a method"),
    ([{"id": "x", "claim": "c", "a": "tspin", "b": "spin@1", "metric": "heldout/sampled_validity", "at": 1.0}],
     "claims[0].metric: 'heldout/sampled_validity' is sampled at the final iterates only: drop the @ of spin@1"),
])
def test_bad_declared_claims_name_the_entry(tmp_path, claims, message):
    with pytest.raises(UserError) as e:
        study.parse_study(declared_raw(tmp_path, claims))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_distribution_section_is_checked(tmp_path):
    raw = declared_raw(tmp_path, [])
    raw["distribution"]["temperature"] = [1.0]
    with pytest.raises(UserError, match="distribution.temperature: unknown key"):
        study.parse_study(raw)
    raw = declared_raw(tmp_path, [])
    raw["distribution"]["temperatures"] = [0.0]
    with pytest.raises(UserError, match="distribution.temperatures: a non-empty list of temperatures > 0"):
        study.parse_study(raw)
    raw = declared_raw(tmp_path, [])
    raw["base"]["data"].pop("task")
    raw["base"]["data"]["path"] = "x.jsonl"
    with pytest.raises(UserError, match="distribution: scores answers with a built-in task's answer sets"):
        study.parse_study(raw)
    raw = study_raw(tmp_path)
    raw["claims"] = [{"id": "x", "claim": "c", "a": "tspin", "b": "spin", "metric": "train/coverage", "at": 1.0}]
    with pytest.raises(UserError, match="needs the study's distribution: section"):
        study.parse_study(raw)


def test_declared_claims_judge_paired_differences_at_one_best_and_all_temperatures(tmp_path):
    from tspin_ray.study.judge import judge

    claims = [{"id": "one", "claim": "validity at 1", "a": "tspin", "b": "sft_continued",
               "metric": "heldout/validity", "at": 1.0},
              {"id": "best", "claim": "validity at best", "a": "tspin", "b": "sft_continued",
               "metric": "heldout/validity", "at": "best"},
              {"id": "all", "claim": "validity everywhere", "a": "tspin", "b": "sft_continued",
               "metric": "heldout/validity", "at": "all"},
              {"id": "kl", "claim": "closer to uniform", "a": "tspin", "b": "sft_continued",
               "metric": "heldout/kl_uniform_model", "at": 1.0},
              {"id": "gone", "claim": "not run", "a": "space", "b": "spin", "metric": "heldout/validity"}]
    s = study.parse_study(declared_raw(tmp_path, claims))
    out = s.out
    # T-SPIN is hotter-shifted: better at T 1 (+0.10, +0.12 per seed), but SFT's best (T 0.5) beats T-SPIN's best
    fake_curves(out, "tspin", {0: [0.30, 0.40, 0.20], 1: [0.32, 0.44, 0.22]})
    fake_curves(out, "sft_continued", {0: [0.50, 0.30, 0.10], 1: [0.52, 0.32, 0.12]})
    fake_curves(out, "tspin", {0: [3.0, 2.0, 2.5], 1: [3.0, 2.2, 2.5]}, metric="kl_uniform_model")
    fake_curves(out, "sft_continued", {0: [3.0, 2.5, 2.5], 1: [3.0, 2.6, 2.5]}, metric="kl_uniform_model")
    got = {c.id: judge(s, c) for c in s.claims}
    one = got["one"]["comparisons"][0]
    assert got["one"]["status"] == "holds" and one["difference"] == pytest.approx(0.11)
    best = got["best"]["comparisons"][0]
    assert (best["t_a"], best["t_b"]) == (1.0, 0.5) and best["difference"] == pytest.approx(0.42 - 0.51)
    assert got["best"]["status"] == "does not hold"
    # per temperature: -0.2 (does not hold), +0.11 (holds), +0.1 (+0.1 each seed: std 0 -> holds): mixed
    assert [c["status"] for c in got["all"]["comparisons"]] == ["does not hold", "holds", "holds"]
    assert got["all"]["status"] == "inconclusive"
    # lower is better: T-SPIN's KL is 0.5 and 0.4 lower -> holds
    assert got["kl"]["status"] == "holds" and "(lower is better)" in got["kl"]["sentence"]
    assert got["gone"]["status"] == "not measured"
    fake_curves(out, "sft_continued", {1: [0.5, float("nan"), 0.1]})  # a NaN score is no measurement
    assert judge(s, s.claims[0])["status"] == "not measured"


def test_claim_sides_name_an_iterate_or_the_best_one(tmp_path):
    """`run@k` reads the evaluation after iteration k (`@0`: pi_0's row), `run@best` the iterate the run's
    manifest names best; per step and best-vs-final claims judge the paired per-seed differences."""
    from tspin_ray.rundir.store import RunDir
    from tspin_ray.study.judge import judge

    claims = [{"id": "step1", "claim": "iteration 1 helps", "a": "spin@1", "b": "spin@0", "metric": "nll"},
              {"id": "step2", "claim": "iteration 2 helps", "a": "spin@2", "b": "spin@1", "metric": "exact_match"},
              {"id": "best", "claim": "the best iterate recovers", "a": "spin@best", "b": "spin", "metric": "nll"},
              {"id": "vs", "claim": "best vs SFT-100%", "a": "spin@best", "b": "sft_full", "metric": "nll"}]
    s = study.parse_study(declared_raw(tmp_path, claims))
    nll = {0: [2.0, 1.0, 3.0], 1: [2.2, 1.3, 2.7]}  # pi_0, pi_1, pi_2 per seed
    em = {0: [0.1, 0.3, 0.2], 1: [0.1, 0.4, 0.1]}
    for seed in (0, 1):
        root = s.out / f"seed{seed}"
        run = RunDir(root / "spin")
        rows = [{"phase": "iteration", "iteration": t - 1, "eval/nll": nll[seed][t], "eval/exact_match": em[seed][t]}
                for t in range(3)]
        run.root.mkdir(parents=True)
        run.append_metrics(rows)
        full = RunDir(root / "sft_full")
        full.root.mkdir(parents=True)
        full.append_metrics([{"phase": "iteration", "iteration": -1, "eval/nll": 1.2, "eval/exact_match": 0.3}])
    got = {c.id: judge(s, c) for c in s.claims}
    assert got["best"]["status"] == "not measured"  # no manifest names a best iterate yet
    for seed in (0, 1):
        RunDir(s.out / f"seed{seed}" / "spin").commit("best", iterate="pi_1", metric="eval/nll")
    got = {c.id: judge(s, c) for c in s.claims}
    # NLL (lower is better): -1.0 and -0.9 at step 1 -> holds
    assert got["step1"]["status"] == "holds" and got["step1"]["comparisons"][0]["difference"] == pytest.approx(-0.95)
    assert got["step2"]["status"] == "does not hold"  # EM -0.1, -0.3
    # best (pi_1) vs final (pi_2): 1.0 - 3.0, 1.3 - 2.7 -> holds
    assert got["best"]["status"] == "holds" and got["best"]["comparisons"][0]["a"] == pytest.approx(1.15)
    assert got["vs"]["comparisons"][0]["difference"] == pytest.approx(1.15 - 1.2)
    assert "spin@best" in got["best"]["sentence"]


def test_the_health_section_names_collapsed_and_best_iterates(tmp_path):
    """Read back from the runs: seed 0's pi_2 triples the best held-out NLL (the run's own verdict: collapsed),
    seed 1's does not; both named pi_1 best; y's log-prob on the training rows fell by 2 nats."""
    from tspin_ray.rundir.store import RunDir
    from tspin_ray.study import health

    s = study.parse_study(study_raw(tmp_path))  # 2 iterations, seeds 0 and 1
    specs = {(sp.seed, sp.name): sp for sp in study.plan(s)}
    nll = {0: [0.40, 0.30, 0.90], 1: [0.42, 0.35, 0.41]}
    for seed in (0, 1):
        run = RunDir.open(specs[(seed, "spin")].config())
        run.append_metrics([{"phase": "iteration", "iteration": t - 1, "eval/nll": nll[seed][t],
                             "eval/exact_match": 0.1 * t, "health/logp_real_train": -2.0 - t,
                             "health/distinct_greedy": 1.0} for t in range(3)])
        run.commit("best", iterate="pi_1", metric="eval/nll")
    got = health.summary(s)
    assert got["spin"][0]["collapsed"] == ["pi_2"] and got["spin"][1]["collapsed"] == []
    assert (got["spin"][0]["nll_last"], got["spin"][0]["nll_best"]) == (0.90, 0.30)
    assert got["tspin"] == {0: None, 1: None}
    text = "\n".join(health.lines(s, got))
    assert "| spin | s0: pi_2; s1: none | s0: pi_1, s1: pi_1 | 0.200 → 0.100 | 0.6550 → 0.3250 | -2.00 → -4.00 |" in text
    assert "| tspin | – | – | – | – | – |" in text


def test_a_distribution_claim_at_pi0_reads_the_seeds_pi0_run(tmp_path):
    """A method's distribution.json scores its own iterates only; `tspin@0` is the seed's pi_0, scored in
    the pi0 run."""
    from tspin_ray.study.judge import judge

    claims = [{"id": "g", "claim": "T-SPIN's last beats its start", "a": "tspin", "b": "tspin@0",
               "metric": "heldout/validity", "at": 1.0}]
    s = study.parse_study(declared_raw(tmp_path, claims))
    fake_curves(s.out, "tspin", {0: [0.3, 0.5, 0.2], 1: [0.3, 0.6, 0.2]})
    fake_curves(s.out, "pi0", {0: [0.3, 0.2, 0.2], 1: [0.3, 0.3, 0.2]}, ckpt="pi_0")
    got = judge(s, s.claims[0])
    assert got["status"] == "holds" and got["comparisons"][0]["difference"] == pytest.approx(0.3)


def test_results_of_a_study_still_running_leave_its_missing_runs_empty(tmp_path):
    """Results can be written while runs are missing (a study interrupted, or still running): their cells
    are empty instead of an error naming a run directory that does not exist yet."""
    from tspin_ray.rundir.store import RunDir

    s = study.parse_study(study_raw(tmp_path))
    specs = {(sp.seed, sp.name): sp for sp in study.plan(s)}
    for seed in (0, 1):
        run = RunDir.open(specs[(seed, "pi0")].config())
        run.append_metrics([{"phase": "iteration", "iteration": -1, "eval/nll": 0.4, "eval/exact_match": 0.2}])
    data = study_results.collect(s)
    assert {p.exact_match for p in data["points"] if p.iteration == -1} == {0.2}
    assert all(p.exact_match is None for p in data["points"] if p.iteration >= 0)


def test_a_finished_run_keeps_pi0_its_final_and_its_best_iterate(tmp_path):
    """keep_checkpoints: final (the default): the study reads evaluations, not checkpoints; what went is
    named in the manifest, and a second prune finds nothing more."""
    from tspin_ray.rundir.store import RunDir

    root = tmp_path / "seed0" / "tspin"
    for t in range(4):
        (root / "checkpoints" / f"pi_{t}").mkdir(parents=True)
        (root / "checkpoints" / f"pi_{t}" / "model.safetensors").write_bytes(b"w")
    (root / "checkpoints" / "best").symlink_to("pi_1")
    RunDir(root).commit("complete", checkpoint=str(root / "checkpoints" / "pi_3"), best="pi_1", iterations=3)

    assert runner.prune_iterates(root) == ["pi_2"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best", "pi_0", "pi_1", "pi_3"]
    assert (root / "checkpoints" / "best" / "model.safetensors").exists()
    assert RunDir(root).entry("pruned") == {"iterates": ["pi_2"]}
    assert runner.prune_iterates(root) == [] and RunDir(root).entry("pruned") == {"iterates": ["pi_2"]}
    assert study.parse_study(study_raw(tmp_path)).keep_checkpoints == "final"
