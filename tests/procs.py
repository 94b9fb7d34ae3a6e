"""Process helpers for tests that start their own Ray clusters: mark every process of a test cluster
through its environment, so teardown ends exactly those (never another session's Ray)."""

from __future__ import annotations

import os
import signal
import socket
import time

MARK = "TSPIN_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (a pytest killed by a
    timeout runs no fixture teardown; `ray start --block` stops its node's processes on SIGTERM)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries MARK=mark: the test cluster's and nothing else."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def end_marked(mark: str, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(mark):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while marked_pids(mark) and time.time() < deadline:
            time.sleep(0.2)
