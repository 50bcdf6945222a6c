"""Amber's failures, by class: each one a line naming the field, file or URI at fault, and
the exit status the `amber` command ends with (docs/resource.md lists them).

Anything else that escapes a command is a bug: the CLI says so in one line and shows the
traceback only with `--debug`.
"""

from __future__ import annotations


class AmberError(Exception):
    """A failure a person can act on; `code` is the command's exit status."""

    code = 1


class InvalidInput(AmberError, ValueError):
    """A resource, file or option that cannot be run; nothing has been written."""

    code = 2


class StorageError(AmberError, RuntimeError):
    """A store that cannot be reached, an object that is not there, or one that is damaged."""

    code = 3


class CorruptCommit(StorageError):
    """A committed folder whose marker or files do not hold what the marker says."""

    def __init__(self, folder: str, reason: str):
        super().__init__(f"{folder}: {reason}")
        self.folder, self.reason = folder, reason


class StageFailed(AmberError):
    """A stage's process ended without committing its output."""

    code = 4


class RunLocked(AmberError):
    """Another holder (an `amber run` or the operator) is running this resource's folder."""

    code = 5


INTERRUPTED = 130  # Ctrl-C: run the same command again to continue
EXIT_CODES = {
    0: "success",
    1: "a bug in Amber (the message says so; --debug shows the traceback)",
    InvalidInput.code: "invalid input: resource, file or option (nothing written)",
    StorageError.code: "storage: unreachable, missing or damaged objects",
    StageFailed.code: "a stage failed (its own last error lines and log are printed)",
    RunLocked.code: "the run's folder is held by another run or the operator",
    INTERRUPTED: "interrupted (run the same command again to continue)",
}
