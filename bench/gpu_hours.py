"""GPU-hours per self-play iteration for Zephyr-7B at 50k prompts on 8xH100: a model, not a measurement.

    .venv/bin/python -m bench.gpu_hours          # the table docs/performance.md quotes

Two designs do the same iteration t >= 1 (and iteration 0, printed apart):
- sequential (uclaml/SPIN): HF `generate` for y', then SPIN training with the reference model's forward
  in the trainer, over the new 50k pairs plus the previous iteration's 50k, sequences padded to the
  longest of their batch; all 8 GPUs do one phase after the other; the new checkpoint is saved and loaded
  by the next generation.
- tspin-ray: vLLM generators for y', T-SPIN triplets (no reference forward, no mixing; iteration 0
  without the y0 forward), sequences packed; colocated on the 8 GPUs (engines sleep while trainers train),
  so GPU-hours = the sum of the phases as well; weights broadcast over NCCL.

Every assumption is a named range (low, most likely, high) with its source (ASSUMPTIONS). The point
estimate takes every most-likely value; the uncertainty draws every assumption independently from a
triangular distribution on its range (median and 10th-90th percentile of 20,000 draws, seed 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Assumption:
    low: float
    central: float
    high: float
    source: str


ASSUMPTIONS = {
    "params": Assumption(7.24e9, 7.24e9, 7.24e9, "Mistral-7B-v0.1 (Zephyr-7B-SFT's base): 7.24B parameters"),
    "prompts": Assumption(50e3, 50e3, 50e3, "T-SPIN / SPIN papers: 50k UltraChat prompts per iteration"),
    "prompt_tokens": Assumption(100, 150, 300, "assumed: no published UltraChat-200k token statistics; "
                                                "measure with the Mistral tokenizer"),
    "real_tokens": Assumption(150, 280, 400, "assumed: first assistant turn of UltraChat-200k"),
    "generated_tokens": Assumption(180, 230, 256, "max_new_tokens 256 (uclaml/SPIN generate.py, docs/concepts.md); "
                                                  "assumed most answers reach it"),
    "vllm_tok_s": Assumption(3281, 4000, 8088, "vLLM output tok/s on one H100: Mistral-7B 3,281 (Lambda "
                                               "vllm-benchmark, v0.5.4); Llama-3.1-8B 8,088 (v0.6.0, multi-step)"),
    "vllm_over_hf": Assumption(14, 19, 24, "vLLM blog 2023-06-20: 14x-24x HF transformers throughput "
                                           "(LLaMA-7B/A10G, LLaMA-13B/A100, ShareGPT)"),
    "mfu": Assumption(0.25, 0.40, 0.46, "llm-foundry MPT-7B on 8xH100, FSDP full shard: 40-46% MFU; lower "
                                        "for ZeRO-3 without FlashAttention and short sequences"),
    "peak_flops": Assumption(989e12, 989e12, 989e12, "H100 SXM dense BF16 peak (NVIDIA data sheet)"),
    "padded_factor": Assumption(1.3, 1.6, 2.3, "positions / tokens with each sequence padded to its batch's "
                                               "longest: 2.29 in `bench padding` (16 mixed-length rows), "
                                               "assumed lower for UltraChat's more even lengths"),
    "packed_factor": Assumption(1.0, 1.07, 1.15, "packed rows as wide as the longest sequence: 1.07 in "
                                                 "`bench padding` (padding fraction 0.063)"),
    "checkpoint_gpu_s": Assumption(8 * 60, 8 * 120, 8 * 300, "sequential: save 14.5 GB, load it into the next "
                                                             "generation (1-5 min, 8 GPUs waiting)"),
}
EPOCHS = 2  # per iteration (both papers)
GPUS = 8


def gpu_hours(a: dict[str, float]) -> dict[str, float]:
    """Per phase and in total, for iteration t >= 1 and iteration 0 of both designs."""
    n, p = a["params"], a["prompts"]
    x, y, g = a["prompt_tokens"], a["real_tokens"], a["generated_tokens"]
    rate = a["mfu"] * a["peak_flops"]  # FLOP/s per GPU
    train = 6 * n  # forward + backward FLOPs per token
    gen_tokens = p * g

    def hours(gpu_seconds: float) -> float:
        return gpu_seconds / 3600

    seq_gen = hours(gen_tokens / (a["vllm_tok_s"] / a["vllm_over_hf"]))
    pair = ((x + y) + (x + g)) * a["padded_factor"]  # positions of one pair
    seq_train = {t: hours(pairs * EPOCHS * pair * (train + 2 * n) / rate) for t, pairs in ((1, 2 * p), (0, p))}
    seq_ckpt = hours(a["checkpoint_gpu_s"])
    tsp_gen = hours(gen_tokens / a["vllm_tok_s"])
    triplet = ((x + y) + 2 * (x + g)) * a["packed_factor"]
    pair_packed = ((x + y) + (x + g)) * a["packed_factor"]  # iteration 0: beta = 0, no y0 forward
    tsp_train = {1: hours(p * EPOCHS * triplet * train / rate), 0: hours(p * EPOCHS * pair_packed * train / rate)}
    out = {}
    for t in (1, 0):
        out[f"sequential_t{t}"] = seq_gen + seq_train[t] + seq_ckpt
        out[f"tspin_ray_t{t}"] = tsp_gen + tsp_train[t]
        out[f"ratio_t{t}"] = out[f"sequential_t{t}"] / out[f"tspin_ray_t{t}"]
    out.update(sequential_generate=seq_gen, sequential_train=seq_train[1], sequential_checkpoint=seq_ckpt,
               tspin_ray_generate=tsp_gen, tspin_ray_train=tsp_train[1])
    return out


def spread(draws: int = 20_000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """(10th percentile, median, 90th percentile) of every quantity over independent triangular draws."""
    rng = np.random.default_rng(seed)
    samples = {k: rng.triangular(v.low, v.central, v.high, draws) if v.high > v.low else np.full(draws, v.central)
               for k, v in ASSUMPTIONS.items()}
    return {k: tuple(float(np.percentile(v, q)) for q in (10, 50, 90)) for k, v in gpu_hours(samples).items()}


def main() -> None:
    print("| assumption | low | most likely | high | source |\n|---|---|---|---|---|")
    for key, a in ASSUMPTIONS.items():
        print(f"| {key} | {a.low:,.4g} | {a.central:,.4g} | {a.high:,.4g} | {a.source} |")
    print()
    central = gpu_hours({k: v.central for k, v in ASSUMPTIONS.items()})
    ranges = spread()
    print("| quantity | point estimate | median | 10th-90th percentile |\n|---|---|---|---|")
    for key, value in central.items():
        lo, mid, hi = ranges[key]
        unit = "x" if key.startswith("ratio") else " GPU-h"
        print(f"| {key} | {value:.2f}{unit} | {mid:.2f}{unit} | {lo:.2f}-{hi:.2f}{unit} |")
    print(f"\nwall time on {GPUS} GPUs, iteration >= 1: sequential {central['sequential_t1'] / GPUS:.2f} h, "
          f"tspin-ray {central['tspin_ray_t1'] / GPUS:.2f} h")


if __name__ == "__main__":
    main()
