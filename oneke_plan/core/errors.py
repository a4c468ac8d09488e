"""Errors the API raises and the CLIs turn into one clear line and an exit code (no traceback)."""

from __future__ import annotations

import signal

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


class OnekePlanError(Exception):
    """Base: a message meant for the user, and the exit code that goes with it."""

    exit_code = 1


class BadInput(OnekePlanError):
    """A file, flag or value the user gave is wrong. The message says what, where and what to do."""

    exit_code = EXIT_BAD_INPUT


class DoesNotFit(OnekePlanError):
    """The model and workload do not fit the machine, or the machine does not match a profile."""

    exit_code = EXIT_DOES_NOT_FIT


class Interrupted(OnekePlanError):
    """The command was stopped by SIGINT or SIGTERM. The message says what was kept and how to continue; the exit
    code is the shell's for that signal (128 + its number: 130, 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def interrupted_by(exc: BaseException) -> int:
    """The signal number behind a KeyboardInterrupt: the one core.stops.Stopped carries (`signum`), SIGINT
    otherwise (Python's own Ctrl-C)."""
    return int(getattr(exc, "signum", signal.SIGINT))
