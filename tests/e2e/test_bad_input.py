"""The bad-input corpus: every case exits non-zero with ONE line naming the file/line/field or key, no
traceback, and no run directory left behind (or, under on_bad_rows: skip, a counted skip).

    .venv/bin/pytest tests/e2e/test_bad_input.py
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import SMALL
from tspin_ray import cli

GOOD = {"prompt": "1+2=", "response": "3"}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(n=30) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(n)]


def _data_case(tmp: Path, name: str):
    """(config data section, expected fragments of the message) for one malformed data file."""
    f = tmp / "d.jsonl"
    rows = _rows()
    if name == "truncated_line":
        _jsonl(f, rows[:3] + ['{"prompt": "9+9=", "resp'] + rows[3:])
        return {"path": str(f)}, ["d.jsonl:4", "invalid JSON"]
    if name == "wrong_type":
        _jsonl(f, rows[:1] + [{"prompt": 12, "response": "3"}])
        return {"path": str(f)}, ["d.jsonl:2", "prompt"]
    if name == "missing_field":
        _jsonl(f, rows[:2] + [{"prompt": "5+5="}])
        return {"path": str(f)}, ["d.jsonl:3", "response"]
    if name == "empty_response":
        _jsonl(f, rows[:4] + [{"prompt": "5+6=", "response": "  "}])
        return {"path": str(f)}, ["d.jsonl:5", "response"]
    if name == "non_utf8":
        f.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows[:2]) + b'{"prompt": "\xff\xfe", '
                      b'"response": "1"}\n')
        return {"path": str(f)}, ["d.jsonl:3", "UTF-8"]
    if name == "duplicate_ids":
        _jsonl(f, [{**r, "id": "x" if i in (1, 4) else str(i)} for i, r in enumerate(rows)])
        return {"path": str(f), "id_column": "id"}, ["d.jsonl:5", "duplicate", "line 2"]
    if name == "huge_prompt":
        _jsonl(f, rows[:3] + [{"prompt": "1" * 5000, "response": "1"}])
        return {"path": str(f)}, ["d.jsonl:4", "prompt", "512"]
    if name == "empty_file":
        f.write_text("")
        return {"path": str(f)}, ["d.jsonl", "no rows"]
    if name == "directory_instead_of_file":
        (tmp / "dir").mkdir()
        return {"path": str(tmp / "dir")}, ["dir"]
    if name == "missing_data_path":
        return {"path": str(tmp / "nope.jsonl")}, ["nope.jsonl", "does not exist"]
    if name == "not_an_object":
        _jsonl(f, rows[:2] + ["[1, 2, 3]"])
        return {"path": str(f)}, ["d.jsonl:3"]
    if name == "messages_without_assistant":
        _jsonl(f, [{"messages": [{"role": "user", "content": "hi"}]}])
        return {"path": str(f), "messages_column": "messages"}, ["d.jsonl:1", "assistant"]
    raise KeyError(name)


DATA_CASES = ["truncated_line", "wrong_type", "missing_field", "empty_response", "non_utf8", "duplicate_ids",
              "huge_prompt", "empty_file", "directory_instead_of_file", "missing_data_path", "not_an_object",
              "messages_without_assistant"]

CONFIG_CASES = {
    # name: (change to the raw config, fragments of the message)
    "unknown_key": ({"trainig": {"lr": 1}}, ["trainig", "did you mean 'training'"]),
    "unknown_nested_key": ({"training": {"learning_rate": 1e-4}}, ["training.learning_rate"]),
    "wrong_type": ({"training": {"epochs": "two"}}, ["training.epochs", "integer"]),
    "zero_size": ({"training": {"global_batch_size": 0}}, ["global_batch_size", "> 0"]),
    "negative_size": ({"generation": {"max_new_tokens": -4}}, ["max_new_tokens", "> 0"]),
    "bad_choice": ({"objective": {"name": "dpo"}}, ["objective.name", "tspin"]),
    "min_over_max": ({"resources": {"generators_min": 3, "generators_max": 1}}, ["generators_min"]),
    "batch_not_divisible": ({"training": {"global_batch_size": 30}}, ["global_batch_size", "micro_batch_size"]),
    "sft_batch_under_group": ({"resources": {"trainers": 2, "trainer_cpus": 0.5}},
                              ["sft.global_batch_size (32)", "sft.micro_batch_size x resources.trainers (32 x 2)"]),
    "unknown_task": ({"data": {"task": "chess"}}, ["chess", "addition"]),
    "missing_model_path": ({"model": {"path": "/no/such/model"}}, ["/no/such/model"]),
    "impossible_resources": ({"resources": {"trainers": 1, "trainer_cpus": 64}}, ["resources", "CPU"]),
    "impossible_gpus": ({"resources": {"trainer_gpus": 2}}, ["resources", "GPU"]),
    "gpus_not_tensor_parallel": ({"generation": {"backend": "vllm", "tensor_parallel_size": 2},
                                  "resources": {"generator_gpus": 1}}, ["generator_gpus (1)", "tensor_parallel_size (2)"]),
    "tensor_parallel_hf": ({"generation": {"tensor_parallel_size": 2}},
                           ["generation.tensor_parallel_size (2)", "needs backend: vllm"]),
    "broadcast_without_persistent": ({"generation": {"weight_sync": "broadcast"}}, ["needs persistent: true"]),
    "offload_without_zero": ({"training": {"offload": "optimizer"}}, ["offload", "zero_stage >= 1"]),
    "mix_previous_with_tspin": ({"objective": {"mix_previous": True}},
                                ["objective", "mix_previous: true works with name: spin only, not tspin"]),
    "y0_from_with_spin": ({"objective": {"name": "spin", "y0_from": "proto_phase"}},
                          ["objective", "y0_from: proto_phase works with name: tspin only"]),
    "first_divergence_with_spin": ({"objective": {"name": "spin", "pair_scope": "first_divergence"}},
                                   ["pair_scope: first_divergence works with name: tspin only"]),
    "dpop_with_space": ({"objective": {"name": "space", "dpop_lambda": 5.0}},
                        ["dpop_lambda works with name: spin or tspin only, not space"]),
    "negative_dpop": ({"objective": {"dpop_lambda": -1.0}}, ["dpop_lambda must be >= 0"]),
    "override_scope_with_spin": ({"objective": {"name": "spin", "overrides": {1: {"pair_scope": "first_divergence"}}}},
                                 ["overrides[1]: pair_scope: first_divergence works with name: tspin only"]),
    "override_scope_typo": ({"objective": {"overrides": {1: {"pair_scope": "first_divergance"}}}},
                            ["overrides[1]: pair_scope must be sequence or first_divergence, not 'first_divergance'"]),
    "broadcast_on_shared_gpus": ({"generation": {"persistent": True, "weight_sync": "broadcast"},
                                  "resources": {"trainer_gpus": 0.5, "generator_gpus": 0.5}},
                                 ["generation.weight_sync: broadcast with fractional GPUs (resources.trainer_gpus 0.5, "
                                  "generator_gpus 0.5)", "use whole GPUs or weight_sync: checkpoint"]),
    "rft_without_task": ({"objective": {"name": "rft"}, "data": {"task": None, "path": "tests/x.jsonl"}},
                         ["objective.name: rft keeps the samples a built-in task's checker accepts: set data.task"]),
    # Keys that were never read (they changed the config hash and nothing else) are gone.
    "removed_training_seed": ({"training": {"seed": 3}}, ["training.seed"]),
    "removed_sft_fraction": ({"sft": {"fraction": 0.5}}, ["sft.fraction"]),
    "zero_stall_timeout": ({"training": {"stall_timeout_s": 0}}, ["stall_timeout_s", "> 0"]),
}


def _raw(tmp: Path, **changes) -> dict:
    raw = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "model":
            raw[key].update(value)
        else:
            raw[key] = value
    raw["output_dir"] = str(tmp / "run")
    return raw


def _expect_one_line_error(capsys, argv, fragments, code=2):
    capsys.readouterr()
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file(tmp_path, capsys, case):
    data, fragments = _data_case(tmp_path, case)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, data={"task": None, **data})))
    _expect_one_line_error(capsys, ["train", "--config", str(cfg)], fragments)
    assert not (tmp_path / "run").exists()
    _expect_one_line_error(capsys, ["validate-data", "--config", str(cfg)], fragments)


def test_skip_mode_counts_bad_rows(tmp_path, capsys):
    f = _jsonl(tmp_path / "d.jsonl", _rows(40) + ['{"prompt": 1', {"prompt": "7+7="}, {"prompt": "", "response": "1"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, data={"task": None, "path": str(f), "on_bad_rows": "skip", "eval_size": 10})))
    assert cli.main(["validate-data", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "invalid_json" in out and "missing_field" in out and "empty_prompt" in out and "40" in out


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(ray_session, tmp_path, capsys, case):
    change, fragments = CONFIG_CASES[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, **change)))
    _expect_one_line_error(capsys, ["train", "--config", str(cfg)], ["c.yaml" if case not in (
        "unknown_task", "missing_model_path", "impossible_resources", "impossible_gpus") else "", *fragments])
    assert not (tmp_path / "run").exists()


def test_invalid_yaml_and_missing_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  tiny: {hidden_size: 64\n")
    _expect_one_line_error(capsys, ["train", "--config", str(cfg)], ["c.yaml:", "invalid YAML"])
    _expect_one_line_error(capsys, ["train", "--config", str(tmp_path / "none.yaml")], ["does not exist"])
    cfg.write_text(yaml.safe_dump(_raw(tmp_path)))
    _expect_one_line_error(capsys, ["train", "--config", str(cfg), "training.lr"], ["key.sub=value"])


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"not loaded: pickles are never unpickled")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, model={"path": str(model)})))
    _expect_one_line_error(capsys, ["eval", "--config", str(cfg), "--checkpoint", str(model)], [str(model)])


def test_unwritable_output_dir(ray_session, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    raw = _raw(tmp_path)
    raw["output_dir"] = str(blocker / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    _expect_one_line_error(capsys, ["train", "--config", str(cfg)], ["output_dir", "not writable"])


def test_disk_full_leaves_nothing_behind(ray_session, tmp_path, capsys, monkeypatch):
    import tspin_ray.rundir.store as rundir

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "write_atomic", full)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path)))
    _expect_one_line_error(capsys, ["train", "--config", str(cfg)], ["No space left on device"])
    assert not (tmp_path / "run").exists()


def test_raised_limits_resume_the_same_run(ray_session, tmp_path):
    """A phase that hit a limit names its key; raising that key (or the retry count) must resume the run,
    not be refused as a different config: limits never change what a run computes."""
    from tspin_ray.config.schema import from_dict
    from tspin_ray.rundir.store import RunDir

    RunDir.open(from_dict(_raw(tmp_path)))
    raised = from_dict(_raw(tmp_path, generation={"timeout_s": 7200, "max_attempts": 5},
                            training={"stall_timeout_s": 9000, "load_timeout_s": 9000, "export_timeout_s": 9000}))
    assert raised.hash() == from_dict(_raw(tmp_path)).hash()
    assert RunDir.open(raised).config_matches(raised)
    assert from_dict(_raw(tmp_path, training={"lr": 0.5})).hash() != raised.hash()


def test_changed_config_is_refused_on_resume(ray_session, tmp_path, capsys):
    from tspin_ray.config.schema import from_dict
    from tspin_ray.rundir.store import RunDir

    RunDir.open(from_dict(_raw(tmp_path)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, training={"lr": 0.5})))
    _expect_one_line_error(capsys, ["train", "--config", str(cfg)], ["different config", "allow_config_change"])
