"""Hub ids as users type them, resolved offline from a local Hugging Face cache: the real model's and an
UltraChat-shaped dataset's, as an offline cluster holds them.

    make real-model && .venv/bin/pytest tests/unit/test_hub.py
"""

from __future__ import annotations

import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import constants

from bench import real_model
from tests.helpers import CLI, REPO
from tests.helpers.real_model import HUB_ID, hub_cache_with
from tspin_ray.config.schema import from_dict
from tspin_ray.controller.prepare import prepare
from tspin_ray.errors import UserError
from tspin_ray.hub import hub_id, resolve

DATASET = "HuggingFaceH4/ultrachat_200k"


def test_what_counts_as_a_hub_id(tmp_path):
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub_id(str(tmp_path)) is None and hub_id("./org/name") is None and hub_id("jobs/demo-cpu.yaml") is None
    assert hub_id("a/b/c") is None and hub_id("name") is None
    assert hub_id("data/train.jsonl") is None and hub_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)


def ultrachat_rows(n: int, offset: int = 0) -> list[dict]:
    """The papers' data shape: prompt, prompt_id and a messages list (first user turn, first answer)."""
    rows = []
    for i in range(offset, offset + n):
        q = f"What is {i} plus {i + 3}?"
        rows.append({"prompt": q, "prompt_id": f"uc{i:04d}", "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": str(2 * i + 3)},
            {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]})
    return rows


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE with the real model and a small ultrachat_200k snapshot (train_sft, test_sft), offline."""
    hub = hub_cache_with(tmp_path)
    snap = hub / f"datasets--{DATASET.replace('/', '--')}" / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ultrachat_rows(40)), snap / "data" / "train_sft-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ultrachat_rows(8, 100)), snap / "data" / "test_sft-00000-of-00001.parquet")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return hub


def test_model_and_dataset_ids_resolve_to_their_cached_snapshots(offline_hub, tmp_path):
    path = resolve(HUB_ID, "model", "model.path")
    assert path == str(offline_hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / real_model.REVISION)
    assert resolve(f"{HUB_ID}@{real_model.REVISION}", "model", "model.path") == path
    raw = {"model": {"path": HUB_ID}, "data": {"path": DATASET, "split": "train_sft", "eval_size": 8},
           "generation": {"backend": "hf"}, "training": {"backend": "torch"}, "output_dir": str(tmp_path / "run")}
    prep = prepare(from_dict(raw))
    assert prep.cfg.model.path == path and prep.cfg.data.path.endswith("snapshots/0123abcd")
    assert len(prep.train) == 32 and len(prep.eval) == 8  # 40 rows of train_sft, 8 held out
    e = {x.prompt_id: x for x in prep.train + prep.eval}["uc0007"]
    assert (e.prompt, e.response) == ("What is 7 plus 10?", "17")  # the first exchange of the chat
    assert prep.format.response_ids(e.prompt, e.response)[-1] == prep.format.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(UserError, match=r"no split 'train' \(Should be one of \['test_sft', 'train_sft'\]\)"):
        prepare(from_dict({**raw, "data": {**raw["data"], "split": "train"}}))


def test_an_id_missing_from_the_cache_offline_is_one_line(offline_hub):
    with pytest.raises(UserError) as err:
        resolve("org/not-there", "model", "model.path")
    assert str(err.value) == (f"model.path: org/not-there is no local path, and model org/not-there is not in the "
                              f"Hugging Face cache ({offline_hub}) while HF_HUB_OFFLINE is set: download it where there "
                              "is network (`hf download org/not-there`) into that cache, or give a local path")
    with pytest.raises(UserError, match=r"^data.path: org/chats is no local path, and dataset org/chats is not in the "
                                        r"Hugging Face cache .*--repo-type dataset"):
        resolve("org/chats", "dataset", "data.path")


def test_validate_data_resolves_ids_from_the_cache_the_environment_names(offline_hub, tmp_path):
    """The CLI as a user on an offline cluster runs it: HF_HUB_CACHE and HF_HUB_OFFLINE from the environment."""
    cfg = tmp_path / "uc.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": HUB_ID}, "data": {"path": DATASET, "split": "test_sft",
                                                                        "eval_size": 2}}))
    env = {**os.environ, "HF_HUB_CACHE": str(offline_hub), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    ok = subprocess.run([*CLI, "validate-data", "--config", str(cfg)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "splits: 6 train, 2 eval" in ok.stdout
    bad = subprocess.run([*CLI, "validate-data", "--config", str(cfg), "model.path=org/not-there"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr
    assert lines[0].startswith("error: model.path: org/not-there is no local path, and model org/not-there is not in")


def test_a_study_of_a_hub_model_resumes_its_runs(offline_hub, tmp_path):
    """The runs record the cached snapshot the id resolved to; rerunning the study compares like with like
    (it used to compare the bare id with it and refused the study's own pi_0 run as another config's)."""
    from tspin_ray.rundir.store import RunDir
    from tspin_ray.study import runner
    from tspin_ray.study.plan import load_study, narrow, plan

    study = narrow(load_study(REPO / "jobs" / "study-real.yaml"), seeds=[0], iterations=1, methods=["tspin"],
                   output_dir=str(tmp_path / "study"))
    spec = plan(study)[0]
    cfg = runner.run_config(spec)
    assert cfg.model.path.startswith(str(offline_hub)) and spec.config().model.path == HUB_ID
    run = RunDir.open(cfg)  # what train() records: the resolved config
    run.commit("complete")
    assert runner.is_complete(spec, cfg)
    with pytest.raises(UserError, match="holds a run made with a different config"):
        runner.is_complete(spec, spec.config())  # the bare id: what the study compared before
