"""One YAML file = one run: typed, frozen, documented, validated at load.

    python -m tspin_ray train --config jobs/demo-cpu.yaml training.lr=1e-4 iterations=2

`load_config(path, overrides)` reads the YAML, applies dotted overrides, and builds `RunConfig`. An unknown
key, a wrong type or a bad value raises `UserError` naming the key path (and, for a typo, the nearest valid
key). Every field carries its documentation in `metadata["doc"]`; `config/reference.py` renders them all.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tspin_ray.algorithms.objectives import OBJECTIVES, Objective, get_objective
from tspin_ray.config.resume import RETIRED, config_hash
from tspin_ray.config.typed_yaml import apply_override, build, plain, positive, read_yaml_mapping
from tspin_ray.errors import UserError


def _f(default: Any, doc: str, choices: Callable[[], Iterable[str]] | None = None) -> Any:
    """A documented field. Mutable defaults go through default_factory; `choices` names the valid values
    (a registry's keys, read at validation time)."""
    metadata = {"doc": doc, **({"choices": choices} if choices else {})}
    if isinstance(default, dict | list):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TinyModelSpec:
    family: Literal["char", "zephyr", "llama3", "qwen2"] = _f(
        "char", "Model family the tiny checkpoint is shaped like (tspin_ray/models/families.py): char (character "
                "tokenizer, fastest), zephyr (Mistral, SentencePiece-style BPE, no pad), llama3 (tied, GQA, "
                "byte-level BPE, <|eot_id|>), qwen2 (tied, GQA, ChatML).")
    hidden_size: int = _f(128, "Model width. head_dim = hidden_size / num_heads must be >= 32 for vLLM-CPU.")
    num_layers: int = _f(4, "Decoder layers.")
    num_heads: int = _f(4, "Attention heads.")
    intermediate_size: int = _f(256, "MLP width.")
    max_position_embeddings: int = _f(256, "Longest sequence the model accepts.")
    seed: int = _f(0, "Seed of the random initialisation.")

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ValueError("hidden_size / num_heads must be a whole number >= 32 (vLLM-CPU attention)")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = _f(None, "HF checkpoint directory of the initial policy (or of the base for the SFT stage), "
                                "or a hub id org/name[@revision] resolved from the local HF cache (HF_HUB_CACHE).")
    tiny: TinyModelSpec | None = _f(None, "Build a tiny random checkpoint locally instead of `path` (shaped like "
                                          "tiny.family: char, zephyr, llama3 or qwen2).")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "Weights dtype for generation and training.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the checkpoint. Off: only built-in classes.")

    def __post_init__(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path and model.tiny")


@dataclass(frozen=True)
class DataConfig:
    task: str | None = _f(None, "Built-in task name (see `tspin_ray.data.tasks.TASKS`) instead of `path`.")
    task_size: int = _f(4000, "Examples the built-in task generates (train pool + eval).")
    path: str | None = _f(None, "JSONL, Parquet or CSV file, a saved HF `datasets` directory, or a hub dataset id "
                                "org/name[@revision] resolved from the local HF cache (with data.split).")
    format: Literal["auto", "jsonl", "parquet", "csv", "hf"] = _f("auto", "File format; auto = by extension.")
    prompt_column: str = _f("prompt", "Column holding the prompt.")
    response_column: str = _f("response", "Column holding the annotated response y.")
    messages_column: str | None = _f(None, "Chat column of {role, content} turns (which exchange trains: turns). "
                                           "Unset: `messages` is used when the rows lack prompt_column or "
                                           "response_column (UltraChat's layout).")
    turns: Literal["first", "last"] = _f("first", "Which exchange of a chat row trains: first (the first user "
                                         "turn and the answer to it) or last (the final assistant turn is y; every "
                                         "turn before it, system included, is the prompt, as the chat template "
                                         "renders it).")
    id_column: str | None = _f(None, "Column with a stable example id; default: `prompt_id` when the rows have "
                                     "it, else a hash of the prompt.")
    checker: str | None = _f(None, "Built-in task whose checker verifies samples of `path`'s rows (objective rft, "
                                   "generate/valid), e.g. arithmetic for jobs/data/arithmetic*.jsonl.")
    split: str = _f("train", "Split to read from a saved HF DatasetDict or a dataset repository (e.g. train_sft).")
    eval_path: str | None = _f(None, "Held-out file for evaluation; default: `eval_size` rows held out.")
    eval_size: int = _f(200, "Rows held out for evaluation when `eval_path` is not set.")
    fraction: float = _f(1.0, "Fraction of the (remaining) training rows used, e.g. 0.25.")
    limit: int | None = _f(None, "Cap on training rows after `fraction`.")
    seed: int = _f(0, "Seed for the hold-out and subsampling shuffle.")
    max_prompt_tokens: int = _f(512, "Longer prompts (tokens of the prompt as the chat template renders it, "
                                     "system turn included) are bad rows.")
    max_response_tokens: int = _f(512, "Longer responses (y, y', y0) are cut for training; see training.max_length.")
    on_bad_rows: Literal["error", "skip"] = _f("error", "error: stop at the first bad row; skip: count and skip.")
    max_bad_fraction: float = _f(0.1, "With `skip`, fail when more than this fraction of rows is bad.")

    def __post_init__(self):
        if (self.task is None) == (self.path is None):
            raise ValueError("set exactly one of data.task and data.path")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("max_bad_fraction must be in [0, 1]")
        positive(self, "task_size", "max_prompt_tokens", "max_response_tokens")
        if self.eval_size < 0 or (self.limit is not None and self.limit <= 0):
            raise ValueError("eval_size must be >= 0 and limit > 0")


@dataclass(frozen=True)
class GenerationConfig:
    backend: Literal["hf", "vllm"] = _f("hf", "Engine: vllm (vllm-cpu here, vllm on GPUs) or HF transformers.")
    max_new_tokens: int = _f(256, "Longest synthetic response.")
    temperature: float = _f(1.0, "Sampling temperature for y' and y0 (eval is greedy).")
    top_p: float = _f(1.0, "Nucleus sampling.")
    samples_per_prompt: int = _f(1, "Synthetic responses per prompt (SPACE uses objective.mu).")
    batch_size: int = _f(64, "Prompts per generation batch handed to one actor.")
    max_attempts: int = _f(3, "Tries per batch before it is reported as failed (no infinite retry).")
    timeout_s: float = _f(1800.0, "Longest wait for one generation phase before it fails with a message.")
    gpu_memory_utilization: float = _f(0.85, "vLLM on GPU: fraction of GPU memory for weights + KV cache.")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel size: GPUs per engine (on CPU: worker processes, "
                                          "each pinned to its share of the actor's cores).")
    stream: bool = _f(True, "Train epoch 0 on y' as they are generated. false: generate them all first, then "
                            "train (where generators and trainers share the same CPU cores, overlap slows both).")
    persistent: bool = _f(False, "Long-lived generator actors (generators_max of them) that keep their engine "
                                 "across phases; false = an elastic Ray Data pool started per phase.")
    weight_sync: Literal["checkpoint", "broadcast"] = _f(
        "checkpoint", "How persistent generators get pi_{t+1}: reload the committed checkpoint, or a "
                      "bucketed broadcast from trainer rank 0 (NCCL on GPU, gloo on CPU).")
    sync_bucket_mb: float = _f(256.0, "Broadcast bucket size in MiB (weight_sync: broadcast).")
    colocate: bool = _f(False, "Generators share the trainers' GPUs (persistent engines sleep while trainers "
                               "train; generation is not streamed into training). For one node.")
    engine_batches: int = _f(1, "Batches a long-lived vLLM engine runs at once, their requests sharing its steps "
                                "(the next fills the tail of the one before). 2 is for GPUs, untested there; on CPU "
                                "it gains nothing. Which requests share a step then depends on timing, and on GPUs "
                                "so may the last bits of a sample (docs/performance.md).")

    def __post_init__(self):
        positive(self, "max_new_tokens", "samples_per_prompt", "batch_size", "max_attempts", "timeout_s",
                  "tensor_parallel_size", "sync_bucket_mb", "engine_batches")
        if self.engine_batches > 1 and not (self.persistent and self.backend == "vllm"):
            raise ValueError("engine_batches > 1 needs persistent: true and backend: vllm (HF generate runs one "
                             "batch per call; a per-phase actor gets one batch at a time)")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if (self.weight_sync == "broadcast" or self.colocate) and not self.persistent:
            raise ValueError(f"{'weight_sync: broadcast' if not self.colocate else 'colocate: true'} needs "
                             f"persistent: true (per-phase actors have no engine to keep)")
        if self.colocate and self.weight_sync == "broadcast":
            raise ValueError("colocate: true needs weight_sync: checkpoint (NCCL cannot broadcast between two "
                             "processes on one GPU)")


@dataclass(frozen=True)
class LoraSpec:
    r: int = _f(16, "Adapter rank.")
    alpha: float = _f(32.0, "Scale numerator: the update is (alpha / r) * B @ A.")
    dropout: float = _f(0.0, "Dropout on the adapter's input while training.")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "Module names (peft's target_modules) that get an adapter; [all-linear] = "
                                   "every linear layer but the output head.")
    merge_export: bool = _f(False, "Also write each iterate merged into the base (checkpoints/pi_t/merged/: "
                                   "a full HF checkpoint that transformers and vLLM load alone).")

    def __post_init__(self):
        positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def peft_config(self):
        """The peft.LoraConfig of this spec (causal LM, no bias)."""
        from peft import LoraConfig, TaskType

        targets = "all-linear" if list(self.target_modules) == ["all-linear"] else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          bias="none", task_type=TaskType.CAUSAL_LM)


@dataclass(frozen=True)
class TrainingConfig:
    backend: Literal["deepspeed", "torch"] = _f("deepspeed", "DeepSpeed engine or plain torch (DDP when N > 1).")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3 (3: parameters sharded across trainers from the load on).")
    optimizer: Literal["rmsprop", "adamw", "sgd"] = _f("rmsprop", "The papers use RMSProp.")
    lr: float = _f(5e-7, "Peak learning rate.")
    lr_overrides: dict = _f({}, "Per-iteration peak lr, e.g. {2: 1.0e-7, 3: 1.0e-7} (negative = from the end).")
    weight_decay: float = _f(0.0, "Decoupled weight decay.")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "Decay after warmup, restarted each iteration.")
    warmup_ratio: float = _f(0.1, "Fraction of an iteration's steps spent warming up.")
    epochs: int = _f(2, "Epochs over each iteration's triplets.")
    global_batch_size: int = _f(64, "Examples per optimizer step across all trainers.")
    micro_batch_size: int = _f(8, "Examples per forward on one trainer; accumulation fills the global batch.")
    max_length: int = _f(1024, "Prompt + response tokens: every response keeps at most min(max_response_tokens, "
                               "max_length - prompt tokens), at least 1 (a cut one loses its end of turn); "
                               "prompts are never cut.")
    precision: Literal["fp32", "bf16"] = _f("fp32", "Training precision.")
    grad_clip: float = _f(1.0, "Max gradient norm (0 = off).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (GPU memory saver).")
    offload: Literal["none", "optimizer", "all"] = _f(
        "none", "DeepSpeed ZeRO-Offload: optimizer states (stage >= 1) or, with stage 3, parameters too, in CPU RAM.")
    stall_timeout_s: float = _f(1800.0, "Watchdog of a training phase: fail when no micro-batch arrives and no "
                                        "step completes for this long (the epoch itself may take hours; a "
                                        "streamed epoch's wait for its first triplets counts). Also the limit of "
                                        "one held-out NLL evaluation.")
    load_timeout_s: float = _f(3600.0, "Longest trainer checkpoint load or optimizer setup (a 70B from network "
                                       "storage at 100 MB/s takes ~25 min).")
    export_timeout_s: float = _f(3600.0, "Longest checkpoint export (ZeRO-3 gathers and writes 2 GiB shards).")
    lora: LoraSpec | None = _f(None, "Train LoRA adapters (peft) instead of all weights in the self-play iterations "
                                     "(the SFT stage of pi_0 trains all weights): iterates are adapters on pi_0, "
                                     "synced to generators as adapters. Off when unset.")

    def __post_init__(self):
        positive(self, "lr", "epochs", "global_batch_size", "micro_batch_size", "max_length", "stall_timeout_s",
                  "load_timeout_s", "export_timeout_s")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0, 1, 2 or 3")
        if self.offload != "none" and (self.backend != "deepspeed" or self.zero_stage == 0
                                       or (self.offload == "all" and self.zero_stage != 3)):
            raise ValueError("offload: optimizer needs backend deepspeed and zero_stage >= 1; offload: all "
                             "needs zero_stage 3")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        for key, value in self.lr_overrides.items():
            if not isinstance(key, int) or isinstance(value, bool) or not isinstance(value, int | float) \
                    or value <= 0:
                raise ValueError(f"lr_overrides maps an iteration number to a positive lr, got {key!r}: {value!r}")

    def lr_for_iteration(self, t: int, iterations: int) -> float:
        for key, value in self.lr_overrides.items():
            if (key if key >= 0 else iterations + key) == t:
                return float(value)
        return self.lr


@dataclass(frozen=True)
class SFTConfig:
    enabled: bool = _f(False, "Train pi_0 by SFT first (always on for a tiny model).")
    epochs: int = _f(30, "Epochs over the SFT rows.")
    lr: float = _f(3e-3, "Peak learning rate.")
    optimizer: Literal["rmsprop", "adamw", "sgd"] = _f("adamw", "Optimizer for the SFT stage.")
    schedule: Literal["linear", "cosine", "constant"] = _f("cosine", "Decay after warmup.")
    warmup_ratio: float = _f(0.05, "Fraction of steps spent warming up.")
    global_batch_size: int = _f(64, "Examples per optimizer step.")
    micro_batch_size: int = _f(64, "Examples per forward on one trainer.")

    def __post_init__(self):
        positive(self, "epochs", "lr", "global_batch_size", "micro_batch_size")


def loss_params() -> set[str]:
    """Every ObjectiveConfig field some objective's loss reads (what overrides may change per iteration)."""
    return set().union(*(o.params for o in OBJECTIVES.values()))


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = _f("tspin", "Training objective (docs/concepts.md; rft: NLL on the samples the built-in task's "
                            "checker accepts).", choices=lambda: OBJECTIVES)
    beta: float | None = _f(None, "SPIN: reward scale (0.1); T-SPIN: weight of the historical term (0.1; "
                                  "always 0 in iteration 0 unless overrides[0] sets it).")
    alpha: float = _f(1.0, "T-SPIN: scale of both advantages.")
    mu: int = _f(1, "SPACE: synthetic samples per prompt (noise ratio).")
    loss_type: Literal["sigmoid", "hinge"] = _f("sigmoid", "SPIN: logistic or hinge loss.")
    nll_weight: float = _f(0.0, "Extra token-mean NLL on y (0 = the papers' loss exactly).")
    dpop_lambda: float = _f(0.0, "SPIN, T-SPIN: DPOP's hinge lambda * max(0, lp_ref(y) - lp(y)) inside the sigmoid "
                                 "(0 = off; T-SPIN then scores lp_ref(y) on the generator).")
    pair_scope: Literal["sequence", "first_divergence"] = _f("sequence", "T-SPIN: compare whole sequences, or only "
        "the first token where they differ (each pair scored at that token only).")
    mix_previous: bool | None = _f(None, "SPIN: add the previous iteration's pairs (default on; refused for the "
                                         "other objectives).")
    overrides: dict = _f({}, "Per-iteration changes, e.g. {-1: {beta: 5.0}} (negative = from the end).")
    y0_from: Literal["iteration_0", "proto_phase"] = _f("iteration_0", "T-SPIN: y0 are iteration 0's samples (no "
        "phase of their own), or a proto phase's: samples of pi_0 that iteration 0 did not train against.")

    def __post_init__(self):
        entry = self.entry  # ValueError naming the valid objectives for an unknown name
        if self.mu < 1:
            raise ValueError("mu must be >= 1")
        if self.mix_previous and not entry.mixes_previous:
            raise ValueError(f"mix_previous: true works with name: spin only, not {self.name} (its batches have "
                             f"no place for the previous iteration's pairs)")
        if self.dpop_lambda < 0:
            raise ValueError("dpop_lambda must be >= 0")
        if self.dpop_lambda and "dpop_lambda" not in entry.params:
            raise ValueError(f"dpop_lambda works with name: spin or tspin only, not {self.name}")
        if self.pair_scope != "sequence" and "pair_scope" not in entry.params:
            raise ValueError(f"pair_scope: {self.pair_scope} works with name: tspin only (SPIN and SPACE take lp_ref "
                             f"of whole sequences from the generator)")
        if self.y0_from != "iteration_0" and not entry.reads_y0:
            raise ValueError(f"y0_from: {self.y0_from} works with name: tspin only (no other objective reads y0)")
        if self.pair_scope not in ("sequence", "first_divergence"):  # overrides bypass the YAML type check
            raise ValueError(f"pair_scope must be sequence or first_divergence, not {self.pair_scope!r}")
        for key, vals in self.overrides.items():
            if not isinstance(key, int) or not isinstance(vals, dict):
                raise ValueError("overrides maps an iteration number to {field: value}")
            bad = set(vals) - loss_params()
            if bad:
                raise ValueError(f"overrides[{key}] cannot set {sorted(bad)}")
            try:  # the same rules for what an iteration will run, checked now, not at that iteration
                dataclasses.replace(self, **vals, overrides={})
            except ValueError as e:
                raise ValueError(f"overrides[{key}]: {e}") from None

    def for_iteration(self, t: int, iterations: int) -> ObjectiveConfig:
        """The hyper-parameters in force at iteration t (defaults, then per-iteration overrides)."""
        beta = self.beta if self.beta is not None else 0.1
        values: dict[str, Any] = {"beta": beta}
        if t == 0:
            values.update(self.entry.first_iteration)  # T-SPIN: beta 0, y' and y0 share a policy; overridable
        for key, vals in self.overrides.items():
            if (key if key >= 0 else iterations + key) == t:
                values.update(vals)
        return dataclasses.replace(self, **values, overrides={})

    @property
    def entry(self) -> Objective:
        """The objective's registry entry: its loss and what it reads (algorithms/objectives.py)."""
        return get_objective(self.name)

    @property
    def loss_params(self) -> dict:
        """The hyper-parameters the trainers' loss reads (Trainer.begin's params)."""
        return {k: getattr(self, k) for k in self.entry.params}

    @property
    def mixes_previous(self) -> bool:
        return self.entry.mixes_previous if self.mix_previous is None else self.mix_previous


@dataclass(frozen=True)
class ResourcesConfig:
    generators_min: int = _f(1, "Fewest generator actors (the pool shrinks to this when idle).")
    generators_max: int = _f(1, "Most generator actors (the pool grows toward this while prompts wait).")
    generator_cpus: float = _f(1.0, "CPUs per generator actor.")
    generator_gpus: float = _f(0.0, "GPUs per generator actor (= tensor_parallel_size on GPU).")
    generator_resources: dict = _f({}, "Custom Ray resources per generator, e.g. {generator: 1} on KubeRay.")
    trainers: int = _f(1, "Trainer actors in the torch.distributed group.")
    trainer_cpus: float = _f(1.0, "CPUs per trainer actor.")
    trainer_gpus: float = _f(0.0, "GPUs per trainer actor.")
    trainer_resources: dict = _f({}, "Custom Ray resources per trainer, e.g. {trainer: 1}.")
    local_num_cpus: int | None = _f(None, "Logical CPUs of an embedded local Ray (default: max(8, cores)).")

    def __post_init__(self):
        positive(self, "generators_min", "generators_max", "trainers")
        if self.generators_min > self.generators_max:
            raise ValueError("generators_min must be <= generators_max")
        if min(self.generator_cpus, self.generator_gpus, self.trainer_cpus, self.trainer_gpus) < 0:
            raise ValueError("CPU and GPU counts must be >= 0")


@dataclass(frozen=True)
class LmEvalSpec:
    tasks: list[str] = _f([], "lm-evaluation-harness task names (their YAML in the harness or in include_path); "
                              "tspin_heldout = this run's held-out rows, exported as a harness task.")
    include_path: str | None = _f(None, "Directory of extra task YAMLs (and their local data files).")
    num_fewshot: int | None = _f(None, "Few-shot examples (default: each task's own).")
    limit: float | None = _f(None, "Documents per task: a count, or a fraction when < 1 (default: all).")
    batch_size: int = _f(8, "Requests per forward.")
    apply_chat_template: bool = _f(True, "Render each request with the checkpoint's chat template, as training does.")
    backend: Literal["auto", "hf", "vllm"] = _f("auto", "Harness model: auto = vllm where CUDA and vLLM are "
                                                       "there, else hf.")

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if self.limit is not None and (self.limit <= 0 or (self.limit >= 1 and self.limit != int(self.limit))):
            raise ValueError("limit must be a fraction in (0, 1) or a whole count")
        positive(self, "batch_size")


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = _f(64, "Greedy decoding length for exact-match evaluation.")
    size: int | None = _f(None, "Evaluate on at most this many held-out rows (default: all).")
    lm_eval: LmEvalSpec | None = _f(None, "Also score every committed checkpoint with lm-evaluation-harness "
                                          "(pip install -e .[eval]); scores go to eval/lm_eval/<task>/<metric>.")
    select: str = _f("nll", "How the best iterate is chosen (checkpoints/best, the manifest, the report): nll "
                            "(held-out NLL of y, lowest), exact_match, or an lm-eval score lm_eval/<task>/<metric>.")
    collapse_nll_factor: float = _f(1.5, "Warn that an iterate collapsed when its held-out NLL exceeds this "
                                         "times the best so far.")
    collapse_min_distinct: float = _f(0.2, "Warn that an iterate collapsed when fewer than this share of its "
                                           "greedy held-out answers are distinct.")
    collapse_max_unfinished: float = _f(0.5, "Warn that an iterate collapsed when more than this share of its "
                                             "greedy held-out answers reach eval.max_new_tokens without ending "
                                             "(and more than pi_0's): the answer form is lost.")
    stop_on_collapse: bool = _f(False, "Stop the run at an iterate that looks collapsed (committed iterates stay; "
                                       "checkpoints/best still points to the best).")

    def __post_init__(self):
        if self.select not in ("nll", "exact_match") and not self.select.startswith("lm_eval/"):
            raise ValueError(f"select must be nll, exact_match or lm_eval/<task>/<metric>, not {self.select!r}")
        if self.select.startswith("lm_eval/") and (
                self.lm_eval is None or self.select.split("/")[1] not in self.lm_eval.tasks):
            raise ValueError(f"select: {self.select} names a task that eval.lm_eval.tasks does not run")
        if self.collapse_nll_factor <= 1.0:
            raise ValueError("collapse_nll_factor must be > 1 (held-out NLL relative to the best so far)")
        if not 0.0 <= self.collapse_max_unfinished <= 1.0:
            raise ValueError("collapse_max_unfinished must be a share in [0, 1]")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = _f(None, "The initial policy.")
    data: DataConfig = _f(None, "SFT data: prompts x and annotated responses y.")
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"doc": "Opponent sampling."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"doc": "Main-player training."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"doc": "Optional SFT stage producing pi_0."})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"doc": "Loss and hyper-params."})
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata={"doc": "Actors and placement."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Per-iteration evaluation."})
    iterations: int = _f(3, "Self-play iterations t = 0 .. iterations-1.")
    output_dir: str = _f("runs/run", "Run directory (created; rerunning resumes it).")
    seed: int = _f(0, "Seed of sampling (per iteration, prompt id and sample), data order and SFT shuffles.")
    allow_config_change: bool = _f(False, "Resume a run whose config hash differs from the stored one.")

    def __post_init__(self):
        if self.model is None or self.data is None:
            raise ValueError("model and data are required")
        if self.iterations < 0:
            raise ValueError("iterations must be >= 0")
        # Each rank accumulates global / (micro x trainers) micro-batches per step: 0 would never step.
        for name, t in [("training", self.training)] + ([("sft", self.sft)] if self.needs_sft_stage else []):
            if t.global_batch_size % (t.micro_batch_size * self.resources.trainers):
                raise ValueError(f"{name}.global_batch_size ({t.global_batch_size}) must be a multiple of "
                                 f"{name}.micro_batch_size x resources.trainers "
                                 f"({t.micro_batch_size} x {self.resources.trainers})")
        g, r = self.generation, self.resources
        if g.backend == "vllm" and r.generator_gpus >= 1 and r.generator_gpus != g.tensor_parallel_size:
            # Ray hides all but the actor's GPUs; vLLM then asks for tensor_parallel_size of them
            # ("invalid device ordinal" when more, idle GPUs when fewer).
            raise ValueError(f"resources.generator_gpus ({r.generator_gpus:g}) must equal "
                             f"generation.tensor_parallel_size ({g.tensor_parallel_size}): one engine per actor")
        if g.weight_sync == "broadcast" and (0 < r.trainer_gpus < 1 or 0 < r.generator_gpus < 1):
            raise ValueError(f"generation.weight_sync: broadcast with fractional GPUs (resources.trainer_gpus "
                             f"{r.trainer_gpus:g}, generator_gpus {r.generator_gpus:g}): Ray may place trainer rank 0 "
                             f"and a generator on one GPU, where NCCL cannot connect them; use whole GPUs or "
                             f"weight_sync: checkpoint")
        if g.colocate and r.generators_max != r.trainers:
            raise ValueError(f"generation.colocate pairs one engine with each trainer rank on its GPU: "
                             f"resources.generators_max ({r.generators_max}) must equal trainers ({r.trainers})")
        if self.eval.lm_eval is not None and g.persistent and r.generator_gpus > 0:
            raise ValueError("eval.lm_eval runs the harness in a task of its own with a generator's resources; "
                             "long-lived GPU generators leave none free: set generation.persistent: false, or "
                             "score the checkpoints with lm_eval after the run")
        if self.training.lora is not None and g.weight_sync == "broadcast":
            raise ValueError("training.lora syncs each iterate as its adapter (megabytes, read from the committed "
                             "checkpoint): set generation.weight_sync: checkpoint")
        if self.objective.entry.verified and self.data.task is None and self.data.checker is None:
            raise ValueError("objective.name: rft keeps the samples a built-in task's checker accepts: set data.task, "
                             "or data.checker for user data")
        if g.tensor_parallel_size > 1 and g.backend != "vllm":
            raise ValueError(f"generation.tensor_parallel_size ({g.tensor_parallel_size}) needs backend: vllm "
                             f"(an HF engine runs on one device)")

    @property
    def samples_per_prompt(self) -> int:
        param = self.objective.entry.samples_param  # SPACE: mu
        return getattr(self.objective, param) if param else self.generation.samples_per_prompt

    @property
    def needs_sft_stage(self) -> bool:
        return self.sft.enabled or self.model.tiny is not None

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """Hash of everything that changes results (config/resume.py says what is left out)."""
        return config_hash(self.to_dict())


# ---------------------------------------------------------------- parsing (config/typed_yaml.py)


def from_dict(raw: dict, overrides: typing.Sequence[str] = ()) -> RunConfig:
    raw = copy.deepcopy(raw)  # keeps int keys such as objective.overrides {-1: ...}
    for o in overrides:
        apply_override(raw, o)
    return build(RunConfig, raw, "", RETIRED)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply dotted overrides."""
    raw = read_yaml_mapping(path)
    try:
        return from_dict(raw, overrides)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
