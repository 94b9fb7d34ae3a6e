"""Waiting with a deadline, and failures told in one line: what the driver does around every phase.

    .venv/bin/pytest tests/unit/rollout/test_pipeline.py -k root_cause

A phase that cannot finish fails with RunFailed naming the phase and the config key of its limit; a
worker's exception is reduced to the 'Type: message' line of its root cause (Ray wraps it in text).
"""

from __future__ import annotations

import queue
import re
import threading
import time

from tspin_ray.errors import RunFailed


def consume(batches, on_batch, timeout: float, what: str, key: str = "generation.timeout_s") -> None:
    """Iterate a Ray Data batch iterator with a deadline and a one-line failure message."""
    q: queue.Queue = queue.Queue(maxsize=4)

    def pump():
        try:
            for b in batches:
                q.put(("batch", b))
            q.put(("done", None))
        except BaseException as e:  # handed over to the waiting thread
            q.put(("error", e))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.time() + timeout
    while True:
        try:
            kind, value = q.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            raise RunFailed(f"timed out after {timeout:.0f}s waiting for {what} ({key})") from None
        if kind == "done":
            return
        if kind == "error":
            raise RunFailed(f"{what} failed (each batch tried generation.max_attempts times): "
                            f"{root_cause(value)}") from value
        on_batch(value)


# The line Python prints for an exception: "RuntimeError: msg", "ray.exceptions.X: msg", "RayTaskError(E): msg".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?:\([\w.]*\))?: (\S.*)$")


def root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost exception behind Ray's wrappers, so a one-line failure names
    what went wrong. A worker's exception reaches the driver as text inside RayTaskError/UserCodeException
    (its traceback, root cause first, as Python prints chains), so the text is read before the objects.

    >>> root_cause(ValueError("outer\\ndetail"))
    'ValueError: outer'
    >>> root_cause(RuntimeError("ray::MapBatches(f)\\nKeyError: 'x'\\n\\nThe above exception ...\\nray.exceptions.UserCodeException: UDF failed"))
    "KeyError: 'x'"
    """
    for line in str(error).splitlines():
        m = _EXCEPTION_LINE.match(line.strip())
        if m:
            return f"{m.group(1)}: {m.group(2)[:300]}"
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
