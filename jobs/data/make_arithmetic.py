"""Write jobs/data/arithmetic.jsonl: 160 two-digit sums and differences in UltraChat's shape (prompt,
prompt_id and a messages list), the real-model demo's data. Deterministic: rerunning rewrites the same file.

    .venv/bin/python jobs/data/make_arithmetic.py

The annotated answer is in the style SmolLM2-135M-Instruct answers in by itself ("47 + 38 = 85") and always
right, so exact match checks the arithmetic alone; the model gets about a third of them right on its own,
which leaves self-play room (docs/results.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("arithmetic.jsonl")


def rows(n: int = 160, seed: int = 0) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        question = f"What is {a} {op} {b}?"
        answer = f"{a} {op} {b} = {a + b if op == '+' else a - b}"  # the model's own style, always right
        out.append({"prompt": question, "prompt_id": f"arith-{len(out):03d}",
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {OUT} ({len(rows())} rows)")
