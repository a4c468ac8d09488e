"""SIGINT and SIGTERM while a command runs: the first stops it, once, and never in the middle of a file's change.

The commands (cli.common.run_main) install `on_signal` for both signals while their work runs. The first signal
raises Stopped in the main thread, so the command unwinds as for Ctrl-C: finally blocks run, temporary files are
removed, locks released, and one line says what was kept (exit 128 + the signal's number: 130, 143). Every later
signal is ignored: the command is already stopping, and a second Ctrl-C or `kill` (a supervisor that repeats its
SIGTERM, an impatient user) would otherwise cut that cleanup, or the line, short, or end the process with the raw
signal. Code that changes a file together with what records it (a journal line and the run's count of them, a
temporary file and its rename) runs `held()`: a signal that comes inside waits for the block's end, so a stop never
leaves half of such a change. Standard library only; without run_main's handler (the API in a program of its own)
nothing here does anything.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command was (a KeyboardInterrupt, so it unwinds as Ctrl-C does);
    `signum` says which (core.errors.interrupted_by reads it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class _State:
    armed: bool = False  # a command's work is running: the first signal stops it
    first: int | None = None  # the signal that stopped it
    depth: int = 0  # held() blocks open
    pending: int | None = None  # the first signal, come inside a held() block: raised at its end


_state = _State()


def on_signal(signum: int, frame: object) -> None:
    """The handler run_main installs for SIGINT and SIGTERM (the module docstring says what it does)."""
    if not _state.armed or _state.first is not None:
        return  # the command is stopping, or has finished: its exit code and its line are decided
    _state.first = signum
    if _state.depth:
        _state.pending = signum
        return
    raise Stopped(signum)


def arm() -> None:
    """A command's work starts: the next signal stops it."""
    _state.armed, _state.first, _state.pending, _state.depth = True, None, None, 0


def disarm() -> int | None:
    """The command's work has ended (done, failed or stopped): later signals are ignored. Returns the signal that
    stopped it, if one did."""
    _state.armed = False
    return _state.first


def seen() -> int | None:
    """The signal that stopped the command running now, if one has (raised already, or waiting in held())."""
    return _state.first


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Within the block, a stop waits: a signal that comes inside raises Stopped when the outermost held block
    ends (even if the block ends with an error: the user asked to stop). Only the main thread, where Python runs
    signal handlers, holds anything."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0 and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            raise Stopped(signum)
