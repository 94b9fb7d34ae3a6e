"""The tspin-ray benchmark suite: what docs/performance.md reports, as JSON and Markdown.

    .venv/bin/python -m bench                       # full suite (about 10-15 minutes on 2 CPU cores)
    .venv/bin/python -m bench --quick               # tiny sizes, a few minutes (what tests/e2e/test_bench.py runs)
    .venv/bin/python -m bench --only generation scaling --out /tmp/bench

Every figure is reported next to the baseline it is compared with, measured in the same run, as a ratio
(candidate / baseline). One module per benchmark (`generation`, `training`, `weights`, `pipeline`,
`scaling`), each a `run(ctx) -> dict`; `__main__` runs each one in its own child process and writes
`bench-<timestamp>.json` / `.md` (and `latest.json` / `latest.md`) under `--out`. Never a timed unit test:
the numbers are for reading, not for asserting.
"""

import os

# The same process environment the test-suite and the Ray workers use (tspin_ray.controller.trainer_group.WORKER_ENV):
# no hub access, no tokenizer thread pools fighting torch's, vLLM's in-process engine core on CPU.
for _key, _value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_key, _value)
