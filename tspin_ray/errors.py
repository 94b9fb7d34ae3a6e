"""User-facing errors: one line, no traceback.

Anything the user can fix (a bad config key, a malformed data row, a missing path) raises `UserError`;
`tspin_ray.cli.main` prints `error: <message>` and exits 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input. The message is one line and names the file/line/field or key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class RunFailed(Exception):
    """The run could not finish (an engine kept crashing, a wait timed out). One line, exit status 1;
    the run directory stays resumable."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
