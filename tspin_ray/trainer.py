"""Main-player trainers: N Ray actors forming one torch.distributed group (gloo on CPU, NCCL on GPU).

    .venv/bin/pytest tests/test_trainer.py

Each actor holds one model replica (DeepSpeed ZeRO 0-3 or plain torch / DDP), pulls its shard of the
triplet stream from a Ray Data `DataIterator`, computes the sequence log-probs of real, generated and
proto responses in ONE concatenated forward, applies the objective by name, and steps. An own actor
group (OpenRLHF-style) rather than Ray Train's TorchTrainer: the actors live for the whole run, so the
process group, the model and the tokenizer are set up once instead of once per iteration and epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

import numpy as np
import ray
import torch

from tspin_ray.objectives import get_objective

# Largest safetensors file of an export: what rank 0 holds in host memory at once under ZeRO-3.
EXPORT_SHARD_BYTES = 2 * 2**30


def to_list(x: Any) -> Any:
    """Ray Data hands ragged list columns over as numpy object arrays; turn them back into lists."""
    if isinstance(x, np.ndarray):
        return [to_list(v) for v in x] if x.dtype == object else x.tolist()
    return x


def batch_logprobs(model, batch: dict, objective: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Policy log-probs of every response an objective needs, from one forward over all of them.

    Rows carry k samples each (`generated_ids`, `proto_ids`: k lists of ids); SPIN and T-SPIN treat
    each sample as its own pair, SPACE keeps the k samples of a row together ([B, mu]).
    """
    from tspin_ray.logprobs import sequence_logprobs

    prompts, real = to_list(batch["prompt_ids"]), to_list(batch["real_ids"])
    b = len(prompts)
    # Everything that meets the policy's log-probs is made on their device (a CPU tensor next to CUDA
    # log-probs raises at the first step; tests run this on the meta device).
    device = next(model.parameters()).device
    lengths = torch.tensor([len(r) for r in real], dtype=torch.float32, device=device)
    if objective == "sft":
        return {"policy_real": sequence_logprobs(model, prompts, real, pad_id), "real_lengths": lengths}
    gen = to_list(batch["generated_ids"])
    k = len(gen[0])
    seq_p, seq_r = list(prompts), list(real)
    for p, g in zip(prompts, gen, strict=True):
        seq_p += [p] * k
        seq_r += g
    if objective == "tspin":
        for p, y0 in zip(prompts, to_list(batch["proto_ids"]), strict=True):
            seq_p += [p] * k
            seq_r += y0
    lp = sequence_logprobs(model, seq_p, seq_r, pad_id)
    real_lp, gen_lp = lp[:b], lp[b:b + b * k].view(b, k)
    out: dict[str, torch.Tensor] = {"real_lengths": lengths}
    if objective == "space":
        out.update(policy_real=real_lp, policy_generated=gen_lp)
    else:  # one pair (or triplet) per sample: repeat y's log-prob instead of recomputing it
        out.update(policy_real=real_lp.repeat_interleave(k), policy_generated=gen_lp.reshape(-1),
                   real_lengths=lengths.repeat_interleave(k))
    if objective == "tspin":
        out["policy_proto"] = lp[b + b * k:].reshape(-1)
    if objective in ("spin", "space"):
        ref_real = torch.tensor(np.asarray(batch["ref_real"], dtype=np.float64), dtype=torch.float32, device=device)
        ref_gen = torch.tensor(np.asarray(to_list(batch["ref_generated"]), dtype=np.float64),
                               dtype=torch.float32, device=device).view(b, k)
        if objective == "space":
            out.update(ref_real=ref_real, ref_generated=ref_gen)
        else:
            out.update(ref_real=ref_real.repeat_interleave(k), ref_generated=ref_gen.reshape(-1))
    return out


def _row_length(batch: dict, i: int) -> int:
    """Padded width this row forces on its micro-batch: prompt + the longest response it carries."""
    responses = [batch["real_ids"][i]]
    for key in ("generated_ids", "proto_ids"):
        if key in batch:
            responses += list(batch[key][i])
    return len(batch["prompt_ids"][i]) + max(len(r) for r in responses)


def length_sorted(micro_batches: list[dict]) -> list[dict]:
    """The rows of one optimizer step regrouped so each micro-batch holds rows of similar length.

    Every micro-batch keeps its size and each loss is a mean over its rows, so the step's gradient (the
    mean of the micro-batch means) is unchanged; only the padding shrinks (each forward pads to its
    longest row). The sort is stable, so equal lengths keep their stream order.
    """
    if len(micro_batches) < 2:
        return micro_batches
    rows = sorted(((b, i) for b in micro_batches for i in range(len(b["prompt_ids"]))),
                  key=lambda r: _row_length(*r))
    out, start = [], 0
    for b in micro_batches:
        chunk, start = rows[start:start + len(b["prompt_ids"])], start + len(b["prompt_ids"])
        out.append({k: _column([src[k][i] for src, i in chunk], b[k]) for k in b})
    return out


def _column(values: list, like):
    """Picked rows as a column of the same kind as `like` (ragged token lists stay object arrays)."""
    if not isinstance(like, np.ndarray):
        return list(values)
    if like.dtype != object:
        return np.asarray(values, dtype=like.dtype)
    column = np.empty(len(values), dtype=object)
    for j, v in enumerate(values):
        column[j] = v
    return column


def offload_config(offload: str) -> dict:
    """DeepSpeed `zero_optimization` entries for training.offload (none / optimizer / all)."""
    cpu = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"none": {}, "optimizer": {"offload_optimizer": cpu},
            "all": {"offload_optimizer": cpu, "offload_param": cpu}}[offload]


def ds_config(zero_stage: int, offload: str, precision: str, micro_batch_size: int = 1,
              accumulation: int = 1, world_size: int = 1, grad_clip: float = 0.0) -> dict:
    """The DeepSpeed config of one training phase (and, under ZeRO-3, of the zero.Init model load)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage, **offload_config(offload)},
        "zero_force_ds_cpu_optimizer": False,  # offloaded states stepped by the torch optimizer
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Trainer:
    """One rank of the trainer group. Plain class so a test can run it in-process; `TrainerActor` is it
    as a Ray actor."""

    def __init__(self, rank: int, world_size: int, backend: str, zero_stage: int = 0,
                 precision: str = "fp32", gradient_checkpointing: bool = False, offload: str = "none"):
        self.rank, self.world_size = rank, world_size
        self.backend, self.zero_stage, self.precision = backend, zero_stage, precision
        self.gradient_checkpointing, self.offload = gradient_checkpointing, offload
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        self.model = self.engine = self.optimizer = self.scheduler = None
        self.loaded_from: str | None = None
        self._zero3_hook = None  # transformers' HfDeepSpeedConfig, kept alive (it is held by weakref)

    # ------------------------------------------------------------ setup
    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1", free_port()

    def init_group(self, master_addr: str, master_port: int) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        dist_backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.backend == "deepspeed":
            import deepspeed

            # On CPU, skip DeepSpeed's shared-memory comm op: it is a 45 s C++ build on every new machine.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=dist_backend, verbose=False)
        elif not torch.distributed.is_initialized():
            torch.distributed.init_process_group(dist_backend)

    def load(self, path: str, trust_remote_code: bool = False) -> None:
        """Load the policy to train from an HF checkpoint (pi_t at the start of iteration t)."""
        from tspin_ray.modeling import load_format, load_model

        if self.loaded_from == path and self.model is not None:
            return
        dtype = "bfloat16" if self.precision == "bf16" else "float32"
        if hasattr(self.engine, "destroy"):  # a DeepSpeed engine: unhook it so its memory can go
            self.engine.destroy()
        self.engine = self.model = None  # drop the previous iterate before building the next
        if self.backend == "deepspeed" and self.zero_stage == 3:
            # from_pretrained then builds the model inside deepspeed.zero.Init and fills it shard by shard:
            # each rank holds 1/world of the weights from the start, never the whole model on its device
            # (a 7B in bf16 would put 14.5 GB on every GPU before DeepSpeed partitions it).
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_hook = HfDeepSpeedConfig(
                ds_config(3, self.offload, self.precision, world_size=self.world_size))
            self.model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            self.model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        fmt = load_format(path, trust_remote_code=trust_remote_code)
        self.tokenizer, self.pad_id = fmt.tokenizer, fmt.pad_id  # a pad id even when the tokenizer has none
        self.engine = None
        self.loaded_from = path

    # ------------------------------------------------------------ one iteration
    def begin(self, *, objective: str, params: dict, optimizer: str, lr: float, weight_decay: float,
              schedule: str, warmup_ratio: float, total_steps: int, micro_batch_size: int,
              global_batch_size: int, grad_clip: float) -> None:
        """Fresh optimizer and schedule for one training phase (SPIN and T-SPIN restart them per iteration)."""
        from transformers import get_scheduler

        self.objective, self.params = objective, params
        self.micro = micro_batch_size
        self.accum = global_batch_size // (micro_batch_size * self.world_size)
        self.grad_clip, self.total_steps, self.step = grad_clip, total_steps, 0
        module = self.model
        opt = make_optimizer(optimizer, module.parameters(), lr, weight_decay)
        sched_name = "constant_with_warmup" if schedule == "constant" else schedule
        sched = get_scheduler(sched_name, opt, num_warmup_steps=int(warmup_ratio * total_steps),
                              num_training_steps=max(total_steps, 1))
        if self.backend == "deepspeed":
            import deepspeed

            if hasattr(self.engine, "destroy"):  # the previous phase's engine: its ZeRO-3 hooks would run beside ours
                self.engine.destroy()
            config = ds_config(self.zero_stage, self.offload, self.precision, micro_batch_size, self.accum,
                               self.world_size, grad_clip)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=opt, lr_scheduler=sched, config=config)
        else:
            self.optimizer, self.scheduler = opt, sched
            if self.world_size > 1 and not isinstance(module, torch.nn.parallel.DistributedDataParallel):
                self.engine = torch.nn.parallel.DistributedDataParallel(module)
            else:
                self.engine = module
        self.model.train()

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        module = self.engine
        inputs = batch_logprobs(module, batch, self.objective, self.pad_id)
        losses, metrics = get_objective(self.objective)(**inputs, **self.params)
        return losses.mean(), {k: float(v) for k, v in metrics.items()}

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches (a global batch across the group)."""
        totals: dict[str, float] = {}
        for batch in micro_batches:
            loss, metrics = self._loss(batch)
            if self.backend == "deepspeed":
                self.engine.backward(loss)  # scales by 1/accum itself
                self.engine.step()  # steps optimizer and scheduler at the accumulation boundary
            else:
                (loss / len(micro_batches)).backward()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / len(micro_batches)
        if self.backend == "deepspeed":
            lr = self.scheduler.get_last_lr()[0]
        else:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**self._all_mean(totals), "lr": lr}

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def train_epoch(self, iterator, max_steps: int | None = None) -> list[dict]:
        """Consume this rank's shard; returns one record per optimizer step (same count on every rank).

        The shard is an `equal=True` split, so every rank sees the same number of micro-batches and the
        ranks step in lock-step; a trailing partial global batch is skipped on every rank alike.
        """
        records, pending = [], []
        limit = self.total_steps if max_steps is None else max_steps
        for batch in iterator.iter_batches(batch_size=self.micro, batch_format="numpy", drop_last=False):
            if self.step >= limit:
                continue  # drain the shard so the split coordinator is not left waiting
            pending.append(batch)
            if len(pending) == self.accum:
                rec = self.train_step(length_sorted(pending))
                rec.update(step=self.step, time=time.time(), rows=sum(len(b["prompt_ids"]) for b in pending))
                records.append(rec)
                pending = []
        return records

    # ------------------------------------------------------------ evaluation and export
    @torch.no_grad()
    def nll(self, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64) -> tuple[float, int]:
        """Summed NLL and token count of `responses` on this rank's slice (rank::world) of the rows."""
        from tspin_ray.logprobs import sequence_logprobs

        if self.engine is None and self.backend == "deepspeed" and self.zero_stage == 3:
            self._zero3_engine()  # a freshly loaded ZeRO-3 model holds placeholders until DeepSpeed wraps it
        model = self.engine.module if hasattr(self.engine, "module") else self.model
        model.eval()
        total, tokens = 0.0, 0
        mine = list(range(self.rank, len(prompts), self.world_size))
        # Every rank runs the same number of forwards: under ZeRO-3 each one gathers parameters collectively,
        # so a rank with one batch fewer would leave the others waiting. Its extra forward is thrown away.
        for s in range(0, -(-len(prompts) // self.world_size), batch_size):
            idx = mine[s:s + batch_size]
            lp = sequence_logprobs(model, [prompts[i] for i in idx or [0]], [responses[i] for i in idx or [0]],
                                   self.pad_id)
            if idx:
                total -= float(lp.sum())
                tokens += sum(len(responses[i]) for i in idx)
        if self.world_size > 1:
            t = torch.tensor([total, tokens], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            total, tokens = float(t[0]), int(t[1])
        self.model.train()
        return total, tokens

    def _zero3_engine(self) -> None:
        """DeepSpeed engine without an optimizer: installs the ZeRO-3 gather hooks for forwards only."""
        import deepspeed

        self.engine = deepspeed.initialize(model=self.model, config=ds_config(
            3, self.offload, self.precision, world_size=self.world_size))[0]

    def export(self, out_dir: str, shard_bytes: int = EXPORT_SHARD_BYTES) -> float:
        """Write the current weights as an HF checkpoint (safetensors) from rank 0; returns seconds."""
        t0 = time.time()
        if self.backend == "deepspeed" and self.zero_stage == 3:
            self._export_zero3(out_dir, shard_bytes)
        elif self.rank == 0:  # every rank holds the whole model: transformers writes it as it is
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its "Writing model shards" bar would reach the driver's output
            self.model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=shard_bytes)
        if self.rank == 0:
            self.tokenizer.save_pretrained(out_dir)
        if self.world_size > 1:
            torch.distributed.barrier()
        return time.time() - t0

    def _export_zero3(self, out_dir: str, shard_bytes: int) -> None:
        """Gather and write one safetensors shard at a time (all ranks gather, rank 0 writes), so rank 0
        never holds more than one shard of a model that no rank holds whole: a 7B in bf16 is 14.5 GB, the
        default shard 2 GiB. Same files as `save_pretrained`: shards, index, config, generation config."""
        from safetensors.torch import save_file

        from tspin_ray.weight_sync import plan_buckets

        shards = plan_buckets(self.weight_specs(), shard_bytes)
        params = dict(self.model.named_parameters())
        n = len(shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        if self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        for shard, file in zip(shards, files, strict=True):
            tensors = [params[s.name] for s in shard]
            with self._gathered(tensors):
                if self.rank == 0:
                    save_file({s.name: t.detach().to("cpu").contiguous() for s, t in zip(shard, tensors, strict=True)},
                              os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({s.name: file for s in shard})
        if self.rank != 0:
            return
        if n > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for shard in shards for s in shard)},
                     "weight_map": weight_map}
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        self.model.config.dtype = str(next(iter(params.values())).dtype).split(".")[1]  # as save_pretrained does
        self.model.config.save_pretrained(out_dir)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(out_dir)

    def _gathered(self, params: list):
        """Full tensors of ZeRO-3 shards inside the block (a no-op for every other stage)."""
        if any(hasattr(p, "ds_id") for p in params):  # partitioned by zero.Init or DeepSpeed's initialize
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def weight_specs(self) -> list:
        """Name, full shape and dtype of every parameter, in the order `send_weights` sends them."""
        from tspin_ray.weight_sync import ParamSpec, dtype_name

        return [ParamSpec(name, tuple(getattr(p, "ds_shape", p.shape)), dtype_name(p.dtype))
                for name, p in self.model.named_parameters()]

    def send_weights(self, host: str, port: int, world_size: int, bucket_bytes: int, timeout_s: float) -> dict:
        """Broadcast the current weights to the generators (weight_sync.py). Every rank calls this: under
        ZeRO-3 each bucket is gathered from all ranks; rank 0 alone joins the broadcast group."""
        from tspin_ray.weight_sync import open_group, plan_buckets, send

        t0 = time.time()
        buckets = plan_buckets(self.weight_specs(), bucket_bytes)
        params = dict(self.model.named_parameters())
        group = store = None
        if self.rank == 0:
            group, store = open_group(host, port, 0, world_size, timeout_s, self.device)
        sent = 0
        for bucket in buckets:
            tensors = [params[s.name] for s in bucket]
            with self._gathered(tensors):
                if group is not None:
                    sent += send(group, [bucket], lambda _, t=tensors: t, self.device)
        del group, store
        return {"seconds": time.time() - t0, "bytes": sent, "buckets": len(buckets)}

    def param_counts(self) -> dict[str, int]:
        """Parameters this rank holds in memory vs the model's: under ZeRO-3 each rank holds its shard only
        (a gathered parameter's placeholder has 0 elements outside GatheredParameters)."""
        params = list(self.model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return {"held": held, "full": sum(getattr(p, "ds_numel", p.numel()) for p in params)}

    def state_fingerprint(self) -> float:
        """Sum of all parameters: a cheap equality check for tests (ZeRO-3 shards gathered first)."""
        params = list(self.model.parameters())
        with self._gathered(params):
            return float(sum(p.detach().double().sum() for p in params))

    def ping(self) -> int:
        return self.rank


TrainerActor = ray.remote(Trainer)


def start_trainers(world: int, backend: str, zero_stage: int = 0, *, options: dict | None = None,
                   **trainer_kwargs) -> list:
    """`world` trainer actors joined into one process group: for tests and benchmarks. A run's group
    (trainer_group.py) adds its placement group, resources and timeouts around the same two calls."""
    actors = [TrainerActor.options(**(options or {})).remote(rank, world, backend, zero_stage, **trainer_kwargs)
              for rank in range(world)]
    addr, port = ray.get(actors[0].address.remote())
    ray.get([a.init_group.remote(addr, port) for a in actors])
    return actors
