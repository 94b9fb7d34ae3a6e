"""Main-player trainers: N Ray actors forming one torch.distributed group (gloo on CPU, NCCL on GPU).

    .venv/bin/pytest tests/unit/workers/test_trainer.py

Each actor holds one model replica (DeepSpeed ZeRO 0-3 or plain torch / DDP), pulls its shard of the
triplet stream from a Ray Data `DataIterator`, computes the sequence log-probs of real, generated and
proto responses in ONE concatenated forward, applies the objective by name, and steps. An own actor
group (OpenRLHF-style) rather than Ray Train's TorchTrainer: the actors live for the whole run, so the
process group, the model and the tokenizer are set up once instead of once per iteration and epoch.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time
from pathlib import Path

import ray
import torch

from tspin_ray.algorithms.inputs import length_sorted, step_losses
from tspin_ray.algorithms.logprobs import sequence_logprobs
from tspin_ray.algorithms.objectives import get_objective
from tspin_ray.checksums import checksum_dir
from tspin_ray.models.checkpoints import MERGED, load_format, load_model
from tspin_ray.models.lora import merge, wrap
from tspin_ray.workers.devices import flush_denormals, local_device, trainer_env
from tspin_ray.workers.records import ExportResult, OptimizerSetup, SendResult, StepRecord
from tspin_ray.workers.weight_broadcast import handshake, rejoin
from tspin_ray.workers.weight_export import (
    broadcast_weights,
    export_adapter,
    export_zero3,
    gathered,
    weight_specs,
)

# Largest safetensors file of an export: what rank 0 holds in host memory at once under ZeRO-3.
EXPORT_SHARD_BYTES = 2 * 2**30


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


def release_engine(engine) -> None:
    """Let a DeepSpeed engine go. Its destroy() (0.19) leaves the engine's forward hooks on the module, so
    the module kept every earlier engine alive, optimizer states included, and ran their hooks on each
    forward; remove them too. Under ZeRO-3 every parameter also points at the optimizer
    (`p._z3_optimizer = self`, runtime/zero/stage3.py), which destroy() leaves: two full sets of fp32
    master weights and optimizer states while the next begin() builds its own. A torch module or DDP
    wrapper needs nothing."""
    if not hasattr(engine, "destroy"):
        return
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if hasattr(handle, "remove"):
            handle.remove()
    for p in engine.module.parameters():
        if hasattr(p, "_z3_optimizer"):
            del p._z3_optimizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def micro_batches(iterator, size: int):
    """A rank's micro-batches as each arrives. No prefetch: Ray Data's prefetch window hands a block out
    only once the next block exists, so a streamed epoch's first step would wait for the second generation
    batch instead of the first (and phases.ramp's small first batches would gain nothing). Ray 2.60 still
    starts its block-prefetcher thread and, with no prefetch, never stops it: one parked thread per call
    (per epoch), holding no data."""
    return iterator.iter_batches(batch_size=size, batch_format="numpy", drop_last=True, prefetch_batches=0)


class Trainer:
    """One rank of the trainer group. Plain class so a test can run it in-process; `TrainerActor` is it
    as a Ray actor."""

    def __init__(self, rank: int, world_size: int, backend: str, zero_stage: int = 0,
                 precision: str = "fp32", gradient_checkpointing: bool = False, offload: str = "none"):
        flush_denormals()  # first: before anything in this process starts OpenMP's threads
        self.rank, self.world_size = rank, world_size
        self.backend, self.zero_stage, self.precision = backend, zero_stage, precision
        self.gradient_checkpointing, self.offload = gradient_checkpointing, offload
        self.device = local_device()
        self.model = self.engine = self.optimizer = self.scheduler = None
        self.loaded_from: str | None = None
        self.step = 0
        self.sync = None  # weight_broadcast.SyncGroup to the generators (rank 0), kept across iterations
        self._zero3_hook = None  # transformers' HfDeepSpeedConfig, kept alive (it is held by weakref)
        self.trust_remote_code = False

    # ------------------------------------------------------------ setup
    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1", free_port()

    def init_group(self, master_addr: str, master_port: int, timeout_s: float = 1800.0) -> None:
        """Join the trainers' process group; a collective that waits longer than timeout_s fails there
        (a run: controller/trainer_group.group_timeout_s, above every driver-side limit; else torch's 30 min)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.device.index or 0))
        dist_backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.backend == "deepspeed":
            import deepspeed

            if dist_backend == "gloo":
                # On CPU, skip DeepSpeed's shared-memory comm op: it is a 45 s C++ build on every new machine.
                # (Only here: reading __compatible_ops__ probes every op builder, nvcc included, on a GPU.)
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=dist_backend, verbose=False, timeout=timeout)
        elif not torch.distributed.is_initialized():
            torch.distributed.init_process_group(dist_backend, timeout=timeout)

    def load(self, path: str, trust_remote_code: bool = False, lora=None) -> None:
        """Load the policy to train from an HF checkpoint (pi_t at the start of iteration t). With `lora`
        (config.LoraSpec) only an adapter trains: the one of an adapter iterate, else a fresh one."""

        if self.loaded_from == path and self.model is not None:
            if lora is None or self.has_adapter:
                return
            if not (self.backend == "deepspeed" and self.zero_stage == 3):  # pi_0 just trained in full: wrap it
                self.model = wrap(self.model, lora, path)
                return
        dtype = "bfloat16" if self.precision == "bf16" else "float32"
        release_engine(self.engine)  # unhook it so its memory can go
        self.engine = self.model = self.optimizer = self.scheduler = None
        gc.collect()  # drop the previous iterate before building the next
        if self.backend == "deepspeed" and self.zero_stage == 3:
            # from_pretrained then builds the model inside deepspeed.zero.Init and fills it shard by shard:
            # each rank holds 1/world of the weights from the start, never the whole model on its device
            # (a 7B in bf16 would put 14.5 GB on every GPU before DeepSpeed partitions it).
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_hook = HfDeepSpeedConfig(
                ds_config(3, self.offload, self.precision, world_size=self.world_size))
            self.model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                    trainable_adapter=lora is not None)
        else:
            self.model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                    trainable_adapter=lora is not None).to(self.device)
        if lora is not None and not self.has_adapter:
            self.model = wrap(self.model, lora, path)
        elif lora is None and self.has_adapter:  # an adapter iterate trained in full from here on
            self.model = self.model.merge_and_unload()
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if self.has_adapter:  # frozen embeddings: the checkpointed blocks need an input that wants grad
                self.model.enable_input_require_grads()
        fmt = load_format(path, trust_remote_code=trust_remote_code)
        self.trust_remote_code = trust_remote_code
        self.tokenizer, self.pad_id = fmt.tokenizer, fmt.pad_id  # a pad id even when the tokenizer has none
        self.engine = None
        self.loaded_from = path

    @property
    def has_adapter(self) -> bool:
        """Whether the model is a peft PeftModel (LoRA: only its adapter trains)."""
        return hasattr(self.model, "peft_config")

    # ------------------------------------------------------------ one iteration
    def begin(self, setup: OptimizerSetup) -> None:
        """Fresh optimizer and schedule for one training phase (SPIN and T-SPIN restart them per iteration)."""
        from transformers import get_scheduler

        s = setup
        self.objective, self.params = get_objective(s.objective), dict(s.params)
        self.micro = s.micro_batch_size
        self.accum = s.global_batch_size // (s.micro_batch_size * self.world_size)
        self.grad_clip, self.total_steps, self.step = s.grad_clip, s.total_steps, 0
        # The previous phase's engine, optimizer and schedule go before the next are built: held while
        # DeepSpeed initializes, a 7B's Adam states would be in memory twice for a moment.
        release_engine(self.engine)  # a DeepSpeed engine's ZeRO-3 hooks would also run beside the new one's
        self.engine = self.optimizer = self.scheduler = None
        gc.collect()
        module = self.model
        # Frozen weights (LoRA's base) get no optimizer state.
        opt = make_optimizer(s.optimizer, [p for p in module.parameters() if p.requires_grad], s.lr, s.weight_decay)
        sched_name = "constant_with_warmup" if s.schedule == "constant" else s.schedule
        sched = get_scheduler(sched_name, opt, num_warmup_steps=int(s.warmup_ratio * s.total_steps),
                              num_training_steps=max(s.total_steps, 1))
        if self.backend == "deepspeed":
            import deepspeed

            config = ds_config(self.zero_stage, self.offload, self.precision, s.micro_batch_size, self.accum,
                               self.world_size, s.grad_clip)
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
        losses, metrics = step_losses(self.engine, batch, self.objective, self.params, self.pad_id)
        return losses.mean(), {k: float(v) for k, v in metrics.items()}

    def train_step(self, micro_batches: list[dict], data_wait: float = 0.0) -> StepRecord:
        """One optimizer step over `accum` micro-batches (a global batch across the group); `data_wait`:
        what this rank waited for them, for the record."""
        start = time.time()
        totals: dict[str, float] = {}
        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses, read before anything steps the schedule
        for batch in micro_batches:
            loss, metrics = self._loss(batch)
            if self.backend == "deepspeed":
                self.engine.backward(loss)  # scales by 1/accum itself
                self.engine.step()  # steps optimizer and scheduler at the accumulation boundary
            else:
                (loss / len(micro_batches)).backward()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / len(micro_batches)
        if self.backend != "deepspeed":  # DeepSpeed's engine.step did all of this at the boundary
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        means = self._all_mean(totals)
        loss = means.pop("loss")
        return StepRecord(step=self.step, loss=loss, lr=lr, time=time.time(), data_wait=data_wait,
                          rows=sum(len(b["prompt_ids"]) for b in micro_batches), step_s=time.time() - start,
                          metrics=means)

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def train_epoch(self, iterator, max_steps: int | None = None) -> list[StepRecord]:
        """Consume this rank's shard; returns one record per optimizer step (same count on every rank)."""
        return [r for r in self.steps(iterator, max_steps) if r is not None]

    def steps(self, iterator, max_steps: int | None = None):
        """train_epoch as it happens: yields None as each micro-batch arrives and each step's record as
        it completes. The group runs it as a streaming generator, so its watchdog sees progress without
        calling into the actor while it trains (a threaded actor, to answer such calls, trained ~8%
        slower: docs/performance.md).

        The shard is an equal split, so every rank sees the same number of micro-batches and the ranks
        step in lock-step. Only full micro-batches train and a trailing partial global batch is skipped
        on every rank alike, so each epoch makes the same (rows // global batch) steps the schedule was
        sized for (a partial micro-batch would add a step and take it from the next epoch).
        """
        pending = []
        limit = self.total_steps if max_steps is None else max_steps
        ready = time.time()  # since when this rank has waited for data: the epoch's start, then each step's end
        for batch in micro_batches(iterator, self.micro):
            yield None
            if self.step >= limit:
                continue  # drain the shard so the split coordinator is not left waiting
            pending.append(batch)
            if len(pending) == self.accum:
                yield self.train_step(length_sorted(pending), data_wait=time.time() - ready)
                pending = []
                ready = time.time()

    # ------------------------------------------------------------ evaluation and export
    def nll(self, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64) -> tuple[float, int]:
        """Summed NLL and token count of `responses` over all ranks (each forwards its slice rank::world)."""
        total, tokens = 0.0, 0
        for idx, lp in self._row_logprobs(prompts, responses, batch_size):
            total -= float(lp.sum())
            tokens += sum(len(responses[i]) for i in idx)
        if self.world_size > 1:
            t = torch.tensor([total, tokens], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            total, tokens = float(t[0]), int(t[1])
        return total, tokens

    def row_logprobs(self, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64) -> list[float]:
        """Summed log-prob of each response, in row order, on every rank (the sync probe compares rows)."""
        out = torch.zeros(len(prompts), dtype=torch.float64, device=self.device)
        for idx, lp in self._row_logprobs(prompts, responses, batch_size):
            out[idx] = lp.detach().to(device=self.device, dtype=torch.float64)
        if self.world_size > 1:
            torch.distributed.all_reduce(out)
        return out.tolist()

    def _row_logprobs(self, prompts, responses, batch_size: int):
        """(row indices, their summed log-probs) for this rank's slice rank::world, in eval mode."""
        if self.engine is None and self.backend == "deepspeed" and self.zero_stage == 3:
            self._zero3_engine()  # a freshly loaded ZeRO-3 model holds placeholders until DeepSpeed wraps it
        model = self.engine.module if hasattr(self.engine, "module") else self.model
        model.eval()
        mine = list(range(self.rank, len(prompts), self.world_size))
        try:
            with torch.no_grad():
                # Every rank runs the same number of forwards: under ZeRO-3 each one gathers parameters
                # collectively, so a rank with one batch fewer would leave the others waiting. Its extra
                # forward is thrown away.
                for s in range(0, -(-len(prompts) // self.world_size), batch_size):
                    idx = mine[s:s + batch_size]
                    lp = sequence_logprobs(model, [prompts[i] for i in idx or [0]],
                                           [responses[i] for i in idx or [0]], self.pad_id)
                    if idx:
                        yield idx, lp
        finally:
            self.model.train()

    def _zero3_engine(self) -> None:
        """DeepSpeed engine without an optimizer: installs the ZeRO-3 gather hooks for forwards only."""
        import deepspeed

        self.engine = deepspeed.initialize(model=self.model, config=ds_config(
            3, self.offload, self.precision, world_size=self.world_size))[0]

    def export(self, out_dir: str, shard_bytes: int = EXPORT_SHARD_BYTES, merged: str | None = None) -> ExportResult:
        """Write the current weights as an HF checkpoint (safetensors) from rank 0, or with LoRA the adapter
        (plus, into `merged`, base and adapter merged into one checkpoint). Rank 0, the writer, also returns
        the files' checksums, read back from its own page cache: the driver never re-reads the checkpoint."""
        t0 = time.time()
        if self.has_adapter:
            export_adapter(self.model, self.rank, out_dir)
        elif self.backend == "deepspeed" and self.zero_stage == 3:
            export_zero3(self.model, self.rank, out_dir, shard_bytes)
        elif self.rank == 0:  # every rank holds the whole model: transformers writes it as it is
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its "Writing model shards" bar would reach the driver's output
            self.model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=shard_bytes)
        files = {}
        if self.rank == 0:
            self.tokenizer.save_pretrained(out_dir)
            files = checksum_dir(Path(out_dir), skip=(MERGED,))
            if merged and self.has_adapter:
                merge(out_dir, merged, dtype="bfloat16" if self.precision == "bf16" else "float32",
                      trust_remote_code=self.trust_remote_code)
        if self.world_size > 1:
            torch.distributed.barrier()
        return ExportResult(seconds=time.time() - t0, files=files)

    def release_memory(self) -> int:
        """Give the allocator's cached, unused blocks back to the device (a colocated engine wakes into them;
        the model and optimizer states stay). Returns the bytes still reserved (0 on CPU)."""
        gc.collect()
        if self.device.type != "cuda":
            return 0
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)

    def weight_specs(self) -> list:
        return weight_specs(self.model)

    def send_weights(self, key: str, host: str, port: int, world_size: int, bucket_bytes: int,
                     timeout_s: float) -> SendResult:
        """Broadcast the current weights to the generators (workers/weight_broadcast.py). Every rank calls this: under
        ZeRO-3 each bucket is gathered from all ranks; rank 0 alone joins the sync group, which it keeps
        while the generator set (`key`) stays the same. Rank 0 meets every receiver (the handshake) before
        any rank gathers: when it cannot, no rank starts. A failed send aborts the group on this side."""

        t0 = time.time()
        group, error = None, None
        if self.rank == 0:
            try:
                self.sync = rejoin(self.sync, key, host, port, 0, world_size, timeout_s, self.device)
                handshake(self.sync.group, self.device, timeout_s)
                group = self.sync.group
            except Exception as e:  # a receiver never joined or never listened
                error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if self.world_size > 1:  # rank 0 tells the others whether to start gathering at all
            met = torch.tensor([0 if error else 1], device=self.device)
            torch.distributed.broadcast(met, 0)
            if not met.item():
                self.close_sync(failed=True)
                return SendResult(seconds=time.time() - t0, bytes=0, buckets=0, error=error or "rank 0 met no receivers")
        sent, buckets, failed = (0, 0, None) if error else broadcast_weights(self.model, group, bucket_bytes,
                                                                              self.device, timeout_s)
        error = error or failed
        if error:
            self.close_sync(failed=True)
        return SendResult(seconds=time.time() - t0, bytes=sent, buckets=buckets, error=error)

    def close_sync(self, failed: bool = False) -> None:
        if self.sync is not None:
            self.sync.close(failed)
            self.sync = None

    def param_counts(self) -> dict[str, int]:
        """Parameters this rank holds in memory vs the model's: under ZeRO-3 each rank holds its shard only
        (a gathered parameter's placeholder has 0 elements outside GatheredParameters)."""
        params = list(self.model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return {"held": held, "full": sum(getattr(p, "ds_numel", p.numel()) for p in params)}

    def state_fingerprint(self) -> float:
        """Sum of all parameters: a cheap equality check for tests (ZeRO-3 shards gathered first)."""
        params = list(self.model.parameters())
        with gathered(params):
            return float(sum(p.detach().double().sum() for p in params))

    def ping(self) -> int:
        return self.rank


TrainerActor = ray.remote(Trainer)


def start_trainers(world: int, backend: str, zero_stage: int = 0, *, options: dict | None = None,
                   **trainer_kwargs) -> list:
    """`world` trainer actors joined into one process group: for tests and benchmarks. A run's group
    (controller/trainer_group.py) adds its placement group, resources and timeouts around the same two calls."""
    options = dict(options or {})
    env = trainer_env(options.get("num_gpus") or 0)
    if env and "runtime_env" not in options:  # as a run's trainers (TrainerGroup) get it
        options["runtime_env"] = {"env_vars": env}
    actors = [TrainerActor.options(**options).remote(rank, world, backend, zero_stage, **trainer_kwargs)
              for rank in range(world)]
    addr, port = ray.get(actors[0].address.remote())
    ray.get([a.init_group.remote(addr, port) for a in actors])
    return actors
