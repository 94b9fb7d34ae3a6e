"""Named fault points for the chaos tests: the process kills itself (and its process group) there.

    TSPIN_FAULT=train:3 tspin-ray train --config jobs/tiny-cpu.yaml   # dies at the 3rd `train` point

Off unless TSPIN_FAULT is set; each point is one dict lookup. Driver points: sft, proto, generate, train,
export (after the checkpoint is written, before it is committed), between (after an iteration is
committed). Worker points: `engine:<prompt_id>` makes every generator that gets that prompt exit;
`receive:<bucket>` makes an HF generator exit when that bucket of a weight broadcast arrives.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def maybe_fail(point: str) -> None:
    spec = os.environ.get("TSPIN_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        # SIGKILL, like an OOM kill or a lost node: no cleanup handlers, no atexit.
        os.killpg(os.getpgid(0), signal.SIGKILL) if os.getpgid(0) == os.getpid() else os.kill(
            os.getpid(), signal.SIGKILL)


def crash_if(point: str, keys) -> None:
    """In a worker: exit hard (like a segfaulting engine) when TSPIN_FAULT=point:key names one of `keys`."""
    spec = os.environ.get("TSPIN_FAULT", "")
    name, _, key = spec.partition(":")
    if name == point and key in set(keys):
        os._exit(1)
