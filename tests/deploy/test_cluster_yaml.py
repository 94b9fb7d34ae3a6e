"""Offline checks of the KubeRay deployment files (cluster/) and the job configs (jobs/).

RayCluster and RayJob documents are validated against the KubeRay v1.7.0 CRD schemas (../shared/kuberay-crds,
or $TSPIN_KUBERAY_CRDS) with `additionalProperties: false` injected, so a misspelled key fails instead of
being silently dropped by the API server. Then the files are cross-checked: custom resources the job
configs request exist on the worker groups, the RayJob's --config loads, the head runs no work, nothing is
exposed outside the cluster, versions agree with the Dockerfile and pyproject.toml.

    .venv/bin/pytest tests/deploy/test_cluster_yaml.py -q
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tspin_ray.config.schema import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
CRD_DIR = Path(os.environ.get("TSPIN_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
needs_crds = pytest.mark.skipif(
    not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()),
    reason=f"KubeRay CRD schemas not found in {CRD_DIR} (set TSPIN_KUBERAY_CRDS to their folder)",
)

RUNS_MOUNT = "/mnt/runs"
GPU = "nvidia.com/gpu"
RAY_STANDARD_RESOURCES = {"CPU", "GPU", "TPU", "memory"}
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


# ---------------------------------------------------------------- loading


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


DOCS = _docs()
RAY_DOCS = [(name, doc) for name, doc in DOCS if doc.get("kind") in CRD_FILES]
RAYCLUSTER = next(doc for _, doc in DOCS if doc.get("kind") == "RayCluster")
RAYJOB = next(doc for _, doc in DOCS if doc.get("kind") == "RayJob")
# Every cluster spec in the folder: the long-lived RayCluster and the one the RayJob brings.
SPECS = [("RayCluster", RAYCLUSTER["spec"]), ("RayJob.rayClusterSpec", RAYJOB["spec"]["rayClusterSpec"])]
# Run configs; study-*.yaml are study configs (tspin_ray.study.plan.load_study validates them in test_study).
JOB_FILES = sorted(p for p in JOBS.glob("*.yaml") if not p.name.startswith("study-"))
STUDY_FILES = sorted(JOBS.glob("study-*.yaml"))
ZEPHYR_FILES = sorted(p for p in JOBS.glob("zephyr-7b-*.yaml") if "-lora-" not in p.name)  # full fine-tuning


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}


def _templates(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) for the head and every worker group."""
    heads = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return heads + [(name, g["template"]["spec"]) for name, g in _groups(spec).items()]


def _quantity(value) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m and m[2] in _UNITS, f"not a Kubernetes quantity: {value!r}"
    return float(m[1]) * _UNITS[m[2]]


def _limits(pod: dict) -> dict:
    return pod["containers"][0].get("resources", {}).get("limits", {})


def _custom_resources(group: dict) -> dict[str, float]:
    """Ray custom resources a group advertises: the v1.5+ `resources` field, else rayStartParams.resources
    (an escaped JSON string such as '"{\\"generator\\": 1}"'), parsed as Ray's autoscaler does."""
    if group.get("resources"):
        return {k: _quantity(v) for k, v in group["resources"].items() if k not in RAY_STANDARD_RESOURCES}
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(raw[1:-1].replace("\\", "")) if raw else {}


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# ---------------------------------------------------------------- CRD schemas


def _strict(node: dict) -> None:
    """Close every object schema that lists `properties`, so unknown keys are errors."""
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for sub in node.get("properties", {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _strict(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key, []):
            _strict(sub)


@functools.cache
def _published_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 40k lines; libyaml is 10x faster
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def _schema(kind: str, strict: bool = True) -> dict:
    schema = copy.deepcopy(_published_schema(kind))
    if strict:
        _strict(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def _errors(doc: dict, strict: bool = True) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema(doc["kind"], strict))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@needs_crds
@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[name for name, _ in RAY_DOCS])
def test_ray_documents_match_the_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(doc) == []


def _typo_min_replicas(d):
    g = _groups(d["spec"])["generator-gpu"]
    g["minReplica"] = g.pop("minReplicas")
    return "minReplica"


def _typo_optional_key(d):
    g = _groups(d["spec"])["trainer-gpu"]
    g["replica"] = g.pop("replicas")
    return "replica"


def _typo_in_pod_template(d):
    c = d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    c["volumeMount"] = c.pop("volumeMounts")
    return "volumeMount"


def _number_for_string(d):
    d["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams is string -> string
    return "num-cpus"


@needs_crds
@pytest.mark.parametrize("mutate", [_typo_min_replicas, _typo_optional_key, _typo_in_pod_template,
                                    _number_for_string])
def test_crd_validation_rejects_mistakes(mutate):
    doc = copy.deepcopy(RAYCLUSTER)
    key = mutate(doc)
    errors = _errors(doc)
    assert errors, f"a RayCluster with a bad {key!r} passed validation"
    assert any(key in e for e in errors), errors


@needs_crds
@pytest.mark.parametrize("mutate", [_typo_optional_key, _typo_in_pod_template])
def test_unknown_keys_pass_the_crd_as_published(mutate):
    """Why the injection is needed: the published schema leaves objects open."""
    doc = copy.deepcopy(RAYCLUSTER)
    mutate(doc)
    assert _errors(doc, strict=False) == []
    assert _errors(doc)


# ---------------------------------------------------------------- cluster shape


@pytest.mark.parametrize("label,spec", SPECS, ids=[label for label, _ in SPECS])
def test_head_runs_no_work(label, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert GPU not in _limits(head["template"]["spec"])


def test_nothing_is_exposed_outside_the_cluster():
    for name, doc in DOCS:
        assert doc.get("kind") not in {"Ingress", "Route", "Gateway", "HTTPRoute"}, name
        for node in _walk(doc):
            if node.get("kind") == "Service":
                assert node.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
            if "serviceType" in node:
                assert node["serviceType"] == "ClusterIP", name
            if "headService" in node:
                assert node["headService"].get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
            assert node.get("enableIngress") is not True, name
            assert node.get("type") not in {"LoadBalancer", "NodePort"}, name


@pytest.mark.parametrize("label,spec", SPECS, ids=[label for label, _ in SPECS])
def test_worker_groups(label, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    groups = _groups(spec)
    trainer, generator = groups["trainer-gpu"], groups["generator-gpu"]
    # Trainers are one torch.distributed group: the autoscaler must never resize it.
    assert trainer["minReplicas"] == trainer["maxReplicas"] == trainer["replicas"] >= 1
    assert _quantity(_limits(trainer["template"]["spec"])[GPU]) == 8
    assert _custom_resources(trainer).get("trainer", 0) >= 1
    # Generators are elastic.
    assert generator["minReplicas"] < generator["maxReplicas"]
    assert generator["minReplicas"] <= generator.get("replicas", 0) <= generator["maxReplicas"]
    assert _quantity(_limits(generator["template"]["spec"])[GPU]) >= 1
    assert _custom_resources(generator).get("generator", 0) >= 1


@pytest.mark.parametrize("label,spec", SPECS, ids=[label for label, _ in SPECS])
def test_pods_share_the_run_volume_and_have_shm(label, spec):
    claims = {doc["metadata"]["name"]: doc for _, doc in DOCS if doc.get("kind") == "PersistentVolumeClaim"}
    for group, pod in _templates(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        # The run directory: the same RWX claim at the same path everywhere.
        runs = volumes[mounts[RUNS_MOUNT]["name"]]
        claim = claims[runs["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"], group
        # where a user looking at a Pending claim sees it: the mode it needs and the key to set
        note = claim["metadata"]["annotations"]["tspin-ray/access-mode"]
        assert "Needs ReadWriteMany" in note and "spec.storageClassName" in note, group
        assert not mounts[RUNS_MOUNT].get("readOnly"), group
        # /dev/shm in memory and bounded; Ray's object store has to fit inside it.
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory" and "sizeLimit" in shm, group
        group_spec = spec["headGroupSpec"] if group == "head" else _groups(spec)[group]
        store = group_spec.get("rayStartParams", {}).get("object-store-memory")
        if store is not None:
            assert int(store) <= _quantity(shm["sizeLimit"]), group
        # GPUs as an extended resource in limits; a request, if given, must equal the limit.
        requests = container["resources"].get("requests", {})
        if GPU in requests:
            assert requests[GPU] == _limits(pod)[GPU], group
        assert pod["securityContext"]["runAsNonRoot"] is True, group


def test_rayjob_embeds_the_raycluster_spec():
    assert RAYJOB["spec"]["rayClusterSpec"] == RAYCLUSTER["spec"]


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text(encoding="utf-8")


def test_rayjob_lifecycle_and_runtime_env():
    spec = RAYJOB["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    # working_dir is the image's copy of the repository, so the relative --config path resolves.
    workdir = re.findall(r"^WORKDIR\s+(\S+)", _dockerfile(), re.M)[-1]
    assert runtime_env["working_dir"] == workdir
    assert re.search(r"^COPY\b.*\bjobs\s+\./jobs\s*$", _dockerfile(), re.M)


def test_versions_and_image_agree():
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"))[1]
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:([0-9.]+)-", _dockerfile(), re.M)[1]
    for label, spec in SPECS:
        assert spec["rayVersion"] == pin == base, label
        images = {c["image"] for _, pod in _templates(spec) for c in pod["containers"]}
        assert len(images) == 1, f"{label}: head and workers must run one image, got {images}"


# ---------------------------------------------------------------- jobs vs cluster


def _entrypoint_config():
    tokens = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert tokens[:2] == ["tspin-ray", "train"], tokens
    path = tokens[tokens.index("--config") + 1]
    overrides = [t for t in tokens[2:] if "=" in t and not t.startswith("-")]
    return path, overrides


def test_rayjob_entrypoint_config_loads():
    path, overrides = _entrypoint_config()
    assert (REPO / path).is_file(), f"the RayJob runs {path}, which is not in the repository"
    cfg = load_config(REPO / path, overrides)
    assert cfg.output_dir.startswith(RUNS_MOUNT + "/"), "the run directory must be on the shared volume"


def _capacity(spec: dict, custom: dict, gpus: float, cpus: float) -> int:
    """How many actors asking for (custom resources, GPUs, CPUs) fit on the groups at their max size."""
    total = 0
    for group in _groups(spec).values():
        have = _custom_resources(group)
        if not custom or not all(name in have for name in custom):
            continue
        limits = _limits(group["template"]["spec"])
        fits = [have[name] // amount for name, amount in custom.items()]
        fits += [_quantity(limits.get(GPU, 0)) // gpus] if gpus else []
        fits += [_quantity(limits["cpu"]) // cpus] if cpus else []
        total += int(min(fits)) * group["maxReplicas"]
    return total


@pytest.mark.parametrize("label,spec", SPECS, ids=[label for label, _ in SPECS])
def test_rayjob_config_fits_the_cluster(label, spec):
    path, overrides = _entrypoint_config()
    r = load_config(REPO / path, overrides).resources
    assert r.trainer_resources and r.generator_resources, "a cluster job must target its worker groups"
    assert _capacity(spec, r.trainer_resources, r.trainer_gpus, r.trainer_cpus) >= r.trainers
    assert _capacity(spec, r.generator_resources, r.generator_gpus, r.generator_cpus) >= r.generators_max


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_job_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("path", STUDY_FILES, ids=[p.name for p in STUDY_FILES])
def test_study_config_loads(path):
    from tspin_ray.study.plan import load_study, plan

    assert plan(load_study(path))  # every run of the study is a valid run config


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_job_custom_resources_exist_on_the_cluster(path):
    cfg = load_config(path)
    wanted = set(cfg.resources.generator_resources) | set(cfg.resources.trainer_resources)
    for label, spec in SPECS:
        defined = {name for g in _groups(spec).values() for name in _custom_resources(g)}
        assert wanted <= defined, f"{path.name} asks for {sorted(wanted - defined)}, not defined in {label}"
    if wanted:  # a cluster job: model, data and run directory must be on paths every pod mounts
        for label, spec in SPECS:
            for group, pod in _templates(spec):
                mounted = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
                for p in (cfg.model.path, cfg.data.path, cfg.output_dir):
                    assert p and any(p.startswith(m + "/") for m in mounted), f"{label}/{group}: {p}"


# ---------------------------------------------------------------- the 7B configs


def test_7b_configs_cover_every_method_and_layout():
    assert {p.name for p in ZEPHYR_FILES} >= {f"zephyr-7b-{m}-{n}x8.yaml" for m in ("tspin", "spin", "space")
                                              for n in (1, 2)}


@pytest.mark.parametrize("path", ZEPHYR_FILES, ids=[p.name for p in ZEPHYR_FILES])
def test_7b_configs_use_the_papers_hyperparameters(path):
    cfg = load_config(path)
    t, g, o, r = cfg.training, cfg.generation, cfg.objective, cfg.resources
    assert (t.backend, t.zero_stage, t.optimizer, t.weight_decay) == ("deepspeed", 3, "rmsprop", 0.0)
    assert (t.lr, t.schedule, t.warmup_ratio, t.epochs) == (5e-7, "linear", 0.1, 2)
    assert [t.lr_for_iteration(i, 5) for i in range(5)] == [5e-7, 5e-7, 1e-7, 1e-7, 1e-7]
    assert (t.global_batch_size, t.max_length, t.precision, cfg.model.dtype) == (64, 1024, "bf16", "bfloat16")
    assert t.micro_batch_size == 2 and t.gradient_checkpointing  # what the memory table in the file assumes
    assert (g.backend, g.max_new_tokens, cfg.iterations) == ("vllm", 256, 5)
    assert cfg.model.path == "/mnt/models/zephyr-7b-sft-full" and not cfg.model.trust_remote_code
    assert (cfg.data.path, cfg.data.messages_column, cfg.data.limit) == (
        "/mnt/data/ultrachat_200k_train_sft.parquet", "messages", 50000)
    betas = [o.for_iteration(i, cfg.iterations).beta for i in range(cfg.iterations)]
    if o.name == "tspin":
        assert o.alpha == 1.0 and betas == [0.0, 0.1, 0.1, 0.1, 0.1]
    elif o.name == "spin":
        assert betas == [0.1, 0.1, 0.1, 0.1, 5.0] and o.mixes_previous
    else:
        assert o.name == "space" and o.mu == 1 and cfg.samples_per_prompt == 1
    if "2x8" in path.name:
        assert (r.trainers, r.trainer_gpus, r.generators_min, r.generators_max) == (8, 1, 2, 8)
    else:
        assert r.trainers * r.trainer_gpus + r.generators_max * r.generator_gpus <= 8


def test_the_lora_7b_config_fits_one_gpu_and_states_its_adapter_size():
    """One GPU shared by one trainer and one engine; the adapter size in the file's arithmetic is what
    r x (in + out) over Mistral-7B's seven projections gives."""
    path = JOBS / "zephyr-7b-tspin-lora-1x1.yaml"
    cfg, text = load_config(path), path.read_text()
    t, g, r = cfg.training, cfg.generation, cfg.resources
    assert t.lora is not None and t.lora.merge_export and g.colocate and g.weight_sync == "checkpoint"
    assert r.trainers * r.trainer_gpus + r.generators_max * r.generator_gpus == 1
    hidden, kv, mlp, layers = 4096, 8 * 128, 14336, 32
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}
    params = layers * sum(t.lora.r * sum(shapes[m]) for m in t.lora.target_modules)
    assert params == 41_943_040
    assert f"= {params / 1e6:.1f}M params" in text and f"{params * 4 / 1e6:.0f} MB" in text


def test_objective_overrides_can_be_written_in_yaml(tmp_path):
    """Integer keys (iteration numbers) survive loading from YAML."""
    path = tmp_path / "spin.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "/m"}, "data": {"path": "/d.parquet"},
                                    "objective": {"name": "spin", "overrides": {-1: {"beta": 5.0}}}}))
    assert load_config(path).objective.overrides == {-1: {"beta": 5.0}}
