"""Benchmark scores of every committed iterate with lm-evaluation-harness (`eval.lm_eval`), as the papers
report them.

    .venv/bin/pytest tests/unit/evaluation/test_harness.py -q

`scores(path, spec, ...)` runs `lm_eval.simple_evaluate` on one checkpoint (a LoRA iterate through the
harness's own `peft=` / `lora_local_path=` arguments) and flattens its results to
`eval/lm_eval/<task>/<metric>`. `export_task` writes held-out rows as a harness task (a YAML plus a JSONL
file beside it, read by the `json` dataset builder, so nothing is fetched); the task name
`tspin_heldout` is the run's own held-out rows, exported into the run directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tspin_ray.deadlines import root_cause
from tspin_ray.errors import RunFailed, UserError
from tspin_ray.models.checkpoints import base_of, is_adapter, rank_of
from tspin_ray.workers.engines import vllm_lora_rank

HELDOUT = "tspin_heldout"
PREFIX = "eval/lm_eval"


def model_args(path: str | Path, backend: str, dtype: str, trust_remote_code: bool) -> dict:
    """The harness model's arguments for a full checkpoint or a LoRA iterate (base + adapter)."""

    base = str(base_of(path).resolve())
    args = {"pretrained": base, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if is_adapter(path):
        adapter = str(Path(path).resolve())
        if backend == "vllm":
            args.update(lora_local_path=adapter, max_lora_rank=vllm_lora_rank(rank_of(path)))
        else:
            args["peft"] = adapter
    return args


def flatten(results: dict) -> dict[str, float]:
    """simple_evaluate's {task: {"metric,filter": value}} as {eval/lm_eval/task/metric: value}; a filter
    other than `none` joins the metric name; non-numbers (names, aliases, "N/A" errors) are left out."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or key in ("sample_len", "alias"):
                continue
            if "," not in key or math.isnan(float(value)):
                continue
            metric, filt = key.split(",", 1)
            out[f"{PREFIX}/{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    return out


def task_manager(tasks, include: list[str]):
    """The harness's task index: the include paths alone when they hold every task (indexing the harness's
    ~15k built-in tasks takes ~20 s here), else those and the built-in ones."""
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_path=include or None, include_defaults=False) if include else None
    if own is not None and set(tasks) <= set(own.all_tasks):
        return own
    return TaskManager(include_path=include or None)


def check_tasks(spec) -> None:
    """Before any work: lm-eval installed, include_path a directory, every task name known (one line)."""
    import difflib


    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("eval.lm_eval needs lm-evaluation-harness: pip install -e .[eval]") from None
    if spec.include_path and not Path(spec.include_path).is_dir():
        raise UserError(f"eval.lm_eval.include_path: {spec.include_path} is not a directory")
    named = [t for t in spec.tasks if t != HELDOUT]
    if not named:
        return
    known = task_manager(named, [spec.include_path] if spec.include_path else []).all_tasks
    for t in named:
        if t not in known:
            near = difflib.get_close_matches(t, known, n=1)
            raise UserError(f"eval.lm_eval.tasks: no harness task {t!r}" + (f" (did you mean {near[0]!r}?)" if near
                                                                            else " (add its YAML to include_path)"))


def include_paths(spec, run_root: str | Path, heldout, max_new_tokens: int) -> list[str]:
    """include_path, and the run's held-out rows exported as the tspin_heldout task when it is asked for."""
    paths = [spec.include_path] if spec.include_path else []
    if HELDOUT in spec.tasks:
        out = Path(run_root) / "lm_eval_tasks"
        export_task(heldout, out, HELDOUT, max_new_tokens)
        paths.append(str(out))
    return paths


def run_remote(cfg, path: str | Path, include: list[str], what: str) -> dict[str, float]:
    """`scores` in a Ray task with a generator's resources (a GPU where generators get one); waits at most
    generation.timeout_s. Returns the scores and timing/lm_eval."""
    import time

    import ray


    r, t0 = cfg.resources, time.time()
    task = ray.remote(scores).options(num_cpus=r.generator_cpus, num_gpus=r.generator_gpus,
                                      resources=r.generator_resources or None, max_retries=0)
    ref = task.remote(str(path), cfg.eval.lm_eval, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                      include_path=include, seed=cfg.seed,
                      vllm_args={"gpu_memory_utilization": cfg.generation.gpu_memory_utilization})
    try:
        out = ray.get(ref, timeout=cfg.generation.timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise RunFailed(f"lm-eval of {what}: no result after {cfg.generation.timeout_s:.0f}s "
                        f"(generation.timeout_s)") from None
    except ray.exceptions.RayError as e:  # the task raised, or its worker died (out of memory, killed)
        raise RunFailed(f"lm-eval of {what} failed: {root_cause(e)}") from None
    return {**out, "timing/lm_eval": time.time() - t0}


def checkpoint_scores(cfg, run_root: str | Path, heldout, path: str | Path, label: str, say) -> dict[str, float]:
    """The driver's step: the scores of the checkpoint at `path` (and timing/lm_eval), each said in one
    line. A failure is a warning and no scores: the iterate is trained and exported, and keeps that."""

    include = include_paths(cfg.eval.lm_eval, run_root, heldout, cfg.eval.max_new_tokens)
    try:
        out = run_remote(cfg, path, include, label)
    except RunFailed as e:
        say(f"warning: {e}; {label} has no eval/lm_eval scores")
        return {}
    named = ", ".join(f"{k.removeprefix(PREFIX + '/')} {v:.3f}" for k, v in out.items() if k.startswith(PREFIX))
    say(f"[lm_eval {label}] {named} in {out['timing/lm_eval']:.1f}s")
    return out


def scores(path: str | Path, spec, *, dtype: str, trust_remote_code: bool, include_path: list[str],
           seed: int, vllm_args: dict | None = None) -> dict[str, float]:
    """Run the harness on the checkpoint at `path` in this process; returns the flattened scores.
    `vllm_args`: extra arguments of lm-eval's vLLM model (the generators' gpu_memory_utilization)."""
    import torch

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task data come from local files only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate

    backend = spec.backend
    if backend == "auto":
        import importlib.util

        backend = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    args = model_args(path, backend, dtype, trust_remote_code)
    if backend == "hf":
        args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        args.update(vllm_args or {})
    limit = spec.limit if spec.limit is None or spec.limit < 1 else int(spec.limit)
    out = simple_evaluate(model=backend, model_args=args, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
                          limit=limit, batch_size=spec.batch_size, apply_chat_template=spec.apply_chat_template,
                          task_manager=task_manager(spec.tasks, include_path), log_samples=False,
                          bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    return flatten(out["results"])


def export_task(examples, out_dir: str | Path, name: str = HELDOUT, max_gen_toks: int = 64) -> Path:
    """Write `examples` (data.Example) as a harness task: out_dir/<name>.yaml + <name>.jsonl. Greedy
    generation scored by exact match, surrounding whitespace ignored (tasks.exact_match's rule)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / f"{name}.jsonl"
    rows.write_text("".join(json.dumps({"id": e.prompt_id, "prompt": e.prompt, "response": e.response}) + "\n"
                            for e in examples), encoding="utf-8")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rows.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{response}}",
        "generation_kwargs": {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
    }
    path = out / f"{name}.yaml"
    path.write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path
