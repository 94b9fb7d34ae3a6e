"""Run directory commits: atomic directories, checksummed checkpoints, falling back past a torn one.

    .venv/bin/pytest tests/unit/rundir/test_rundir.py
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import small_config
from tspin_ray.config.schema import from_dict
from tspin_ray.errors import UserError
from tspin_ray.rundir.store import RunDir, atomic_dir, verify_dir


def _run_with_checkpoints(tmp_path, n=3) -> RunDir:
    run = RunDir.open(from_dict(small_config(tmp_path)))
    for t in range(n):
        with atomic_dir(run.checkpoint(t)) as tmp:
            (tmp / "model.safetensors").write_bytes(bytes(range(256)) * (t + 1))
            (tmp / "config.json").write_text(json.dumps({"t": t}))
        run.commit_checkpoint(t)
        if t:
            run.commit(f"iter_{t - 1}")
    return run


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "missing_file"])
def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys, damage):
    run = _run_with_checkpoints(tmp_path)
    weights = run.checkpoint(2) / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip_byte":
        _flip_byte(weights)
    else:
        weights.unlink()
    assert RunDir(run.root).latest_good_checkpoint(2) == 1
    out = capsys.readouterr().out
    assert "pi_2 is corrupt" in out and "model.safetensors" in out
    again = RunDir(run.root)  # the fallback is persisted: pi_2 and iteration 1 are no longer committed
    assert not again.done("pi_2") and not again.done("iter_1") and again.done("pi_1")


def test_verify_dir_reports_each_problem(tmp_path):
    run = _run_with_checkpoints(tmp_path, n=1)
    files = run.entry("pi_0")["files"]
    assert verify_dir(run.checkpoint(0), files) is None
    _flip_byte(run.checkpoint(0) / "model.safetensors")
    assert "sha256 mismatch" in verify_dir(run.checkpoint(0), files)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-export")
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_replaced_whole(tmp_path):
    run = _run_with_checkpoints(tmp_path, n=2)
    assert json.loads(run.manifest_path.read_text())["entries"]["pi_1"]["files"]
    assert not list(run.root.glob(".manifest.json.tmp-*"))


def test_config_change_is_refused_and_can_be_allowed(tmp_path):
    RunDir.open(from_dict(small_config(tmp_path)))
    changed = small_config(tmp_path, training={"lr": 0.5})
    with pytest.raises(UserError, match="different config"):
        RunDir.open(from_dict(changed))
    RunDir.open(from_dict({**changed, "allow_config_change": True}))


def test_run_from_an_older_version_without_a_new_key_resumes(tmp_path):
    """An older tspin-ray wrote config.yaml without `generation.colocate` (and hashed without it): the same
    config today, with the key at its default, is the same run; a real change is still refused."""
    import hashlib

    import yaml

    cfg = from_dict(small_config(tmp_path))
    run = RunDir.open(cfg)
    old = cfg.to_dict()
    del old["generation"]["colocate"]
    (run.root / "config.yaml").write_text(yaml.safe_dump(old))
    trimmed = {k: v for k, v in old.items() if k not in ("output_dir", "allow_config_change")}
    run.manifest["config_hash"] = hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()[:16]
    run.save()
    assert run.manifest["config_hash"] != cfg.hash()
    reopened = RunDir.open(cfg)
    assert reopened.manifest["config_hash"] == cfg.hash()  # brought up to date
    (run.root / "config.yaml").write_text(yaml.safe_dump(old))
    reopened.manifest["config_hash"] = "0" * 16
    reopened.save()
    with pytest.raises(UserError, match="different config"):
        RunDir.open(from_dict(small_config(tmp_path, training={"lr": 0.5})))


def test_run_from_before_the_retired_keys_resumes(tmp_path):
    """tspin-ray before issue 15 wrote `training.seed` and `sft.fraction` into config.yaml (never read) and
    hashed the limits: such a run resumes under today's config; the keys in a user's YAML are refused in
    one line that says why."""
    import yaml

    cfg = from_dict(small_config(tmp_path))
    run = RunDir.open(cfg)
    old = cfg.to_dict()
    old["training"]["seed"], old["sft"]["fraction"] = 0, None
    (run.root / "config.yaml").write_text(yaml.safe_dump(old))
    run.manifest["config_hash"] = "0123456789abcdef"  # the old hash function's value
    run.save()
    assert RunDir.open(cfg).manifest["config_hash"] == cfg.hash()
    with pytest.raises(UserError, match=r"config key 'training.seed' was removed: it was never read"):
        from_dict(small_config(tmp_path, training={"seed": 1}))
