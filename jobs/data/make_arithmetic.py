"""Write the real model's data in UltraChat's shape (prompt, prompt_id and a messages list): two-digit sums
and differences from the built-in task `arithmetic` (tspin_ray/data/tasks.py). Deterministic: rerunning
rewrites the same files.

    .venv/bin/python jobs/data/make_arithmetic.py

arithmetic.jsonl        160 rows (seed 0): the real-model demo (jobs/demo-real.yaml)
arithmetic-study.jsonl  240 rows (seed 1): the real-model study (jobs/study-real.yaml): 48 held out per seed,
                        192 to train on (25%: 48)

The annotated answer is in the style SmolLM2-135M-Instruct answers in by itself ("47 + 38 = 85") and always
right, so exact match checks the arithmetic alone; the model gets about a third of them right on its own,
which leaves self-play room (docs/results.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from tspin_ray.data.tasks import TASKS

FILES = {"arithmetic.jsonl": (160, 0), "arithmetic-study.jsonl": (240, 1)}


def rows(n: int = 160, seed: int = 0) -> list[dict]:
    return [{"prompt": r["prompt"], "prompt_id": f"arith-{i:03d}" if seed == 0 else f"arith{seed}-{i:03d}",
             "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for i, r in enumerate(TASKS["arithmetic"].make(n, seed))]


if __name__ == "__main__":
    for name, (n, seed) in FILES.items():
        out = Path(__file__).with_name(name)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
        print(f"wrote {out} ({n} rows)")
