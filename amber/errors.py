"""Amber's failures, by class: each one a line naming the field, file or URI at fault, and
the exit status the `amber` command ends with (docs/resource.md lists them).

Anything else that escapes a command is a bug: the CLI says so in one line and shows the
traceback only with `--debug`.
"""

from __future__ import annotations

import errno
import signal


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


# The machine, not Amber: a full, read-only or unreachable disk, permissions, a symlink
# loop, a name too long for the file system.
MACHINE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EIO,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EMFILE,
        errno.ENFILE,
    }
)


def exit_code(err: BaseException) -> int | None:
    """The exit status an exception stands for: an AmberError's class, a machine's refusal
    (an OSError of MACHINE_ERRNOS) as storage; None for anything else (a bug)."""
    if isinstance(err, AmberError):
        return err.code
    if isinstance(err, OSError) and err.errno in MACHINE_ERRNOS:
        return StorageError.code
    return None


def one_line(err: BaseException) -> str:
    """An exception as the line a person reads: an OSError names its path and cause."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        return f"{where}{err.strerror}"
    return str(err)


class Stopped(AmberError):
    """A stop signal (SIGTERM: `timeout`, systemd, a pod's end; SIGHUP: a terminal closed):
    the run stopped as Ctrl-C stops it, lease released; the exit status is 128 + signal."""

    def __init__(self, signum: int, what: str = "the run"):
        name = signal.Signals(signum).name
        super().__init__(f"{what} stopped by {name}: run the same command again to continue")
        self.signum, self.code = signum, 128 + signum


INTERRUPTED = 130  # Ctrl-C: run the same command again to continue
EXIT_CODES = {
    0: "success",
    1: "a bug in Amber (the message says so; --debug shows the traceback)",
    InvalidInput.code: "invalid input: resource, file or option (nothing written)",
    StorageError.code: "storage: unreachable, missing or damaged objects",
    StageFailed.code: "a stage failed (its own last error lines and log are printed)",
    RunLocked.code: "the run's folder is held by another run or the operator",
    128 + signal.SIGHUP: "stopped by SIGHUP, a terminal closed (run it again to continue)",
    INTERRUPTED: "interrupted (run the same command again to continue)",
    128 + signal.SIGTERM: "stopped by SIGTERM (run the same command again to continue)",
}
