"""What the commands share: their parsers, generated from options dataclasses; error handling (one line, an exit
code, no traceback); notes and table printing."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import os
import signal
import sys
import threading
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from oneke_plan.api import Report
from oneke_plan.api.options import FLAG, Flag, Options
from oneke_plan.core import stops
from oneke_plan.core.errors import EXIT_BAD_INPUT, Interrupted, OnekePlanError, interrupted_by
from oneke_plan.core.sizes import NumberError, parse_int

EXIT_INTERNAL = 1

LIBRARY_LOGGERS = ("transformers", "accelerate", "bitsandbytes", "kernels", "huggingface_hub")
"""Loggers of the libraries the commands import: only their errors may reach stderr, and only after ours. Their
warnings are about things the commands already handle (accelerate: "device N is not available" when planning for
another machine; bitsandbytes and kernels: a CPU kernel they would fetch from the Hub, compat.stay_offline)."""


def offline_and_quiet() -> None:
    """Called first by each command: no network (compat.stay_offline, before any library is imported), and only
    the libraries' errors on stderr."""
    from oneke_plan.measure.compat import stay_offline

    stay_offline()
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what, and where to look), not the whole usage text; and a flag
    the command does not have is named as such, with the closest flag it has (unknown_flag), whatever else argparse
    found wrong first (a misspelt --profile is not a missing --profile)."""

    given: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        unknown = unknown_flag(self, self.given)
        if unknown is not None:
            self.exit(2, f"{self.prog}: error: {unknown} (see {self.prog} --help)\n")
        hint = " (a value starting with '-' needs '=', e.g. --gpu=-8GiB)" if "expected one argument" in message else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; see {self.prog} --help\n")


def unknown_flag(parser: argparse.ArgumentParser, args: Sequence[str]) -> str | None:
    """'unknown flag --profle; did you mean --profile?' for the first `--NAME` in `args` that is none of the
    parser's flags (nor, as argparse allows, the start of one); None if there is none. Words after a lone `--` are
    values, as argparse reads them."""
    flags = [name for action in parser._actions for name in action.option_strings if name.startswith("--")]
    for arg in args:
        if arg == "--":
            return None
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or any(flag.startswith(name) for flag in flags):
            continue
        close = difflib.get_close_matches(name[2:], [flag[2:] for flag in flags], n=1)
        return f"unknown flag {name}" + (f"; did you mean --{close[0]}?" if close else "")
    return None


def add_options(parser: argparse.ArgumentParser, *option_types: type) -> None:
    """One argument for each field of the options dataclasses that declares a flag (api.options.Flag), in field
    order; each --help section is made at its first field, so the sections show in the order their first flags do.
    Like transformers' HfArgumentParser and vLLM's EngineArgs, the field is the one place a flag is declared."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option_type in option_types:
        hints = typing.get_type_hints(option_type)
        for item in dataclasses.fields(option_type):
            spec = item.metadata.get(FLAG)
            if spec is None:
                continue
            if spec.group is not None and spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            names, settings = argument_for(item, spec, hints[item.name])
            (parser if spec.group is None else groups[spec.group]).add_argument(*names, **settings)


def argument_for(item: dataclasses.Field[Any], spec: Flag, hint: Any) -> tuple[list[str], dict[str, Any]]:
    """add_argument's names and settings for one field: a bool is a switch (store_true, or `--no-NAME` storing False
    where its default is True), an int is read as one, a field without a default is required."""
    required = item.default is dataclasses.MISSING
    settings: dict[str, Any] = {"help": spec.help, "default": None if required else item.default}
    if spec.metavar is not None:
        settings["metavar"] = spec.metavar
    if spec.choices is not None:
        settings["choices"] = spec.choices
    if spec.positional:
        return [item.name], {**settings, "nargs": None if required else "?"}
    spelled = spec.spellings(item.name)
    settings["dest"] = item.name
    value_type = without_none(hint)
    if value_type is bool:
        if item.default is True:
            return [f"--no-{spelled[-1][2:]}"], {**settings, "action": "store_false"}
        return spelled, {**settings, "action": "store_true"}
    if required:
        settings["required"] = True
    if spec.repeat:
        settings["action"] = "append"
    parse = spec.parse or (integer if value_type is int else None)
    if parse is not None:
        settings["type"] = parse
    return spelled, settings


def integer(text: str) -> int:
    """An int flag's value (core.sizes.parse_int: ASCII digits, a sign; argparse's own `int` takes '٣' and '1_000');
    the range is the options' check (--chunk-size -1 means no split)."""
    try:
        return parse_int(text, "", negative=True)
    except NumberError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def without_none(hint: Any) -> Any:
    """`X` for `X | None`; any other type as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kept = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else hint
    return hint


def options_from(args: argparse.Namespace, options_type: type[Options]) -> Options:
    """The options dataclass from parsed arguments (its fields without a flag keep their defaults)."""
    flagged = [item.name for item in dataclasses.fields(options_type) if FLAG in item.metadata]
    return options_type(**{name: getattr(args, name) for name in flagged})


class PrintedReport(Report):
    """The API's notes, printed on stderr one line each after the command's name; held until the command's checks
    have passed (checks_passed, or `release` where the command prints its own output), so that a refusal is the one
    line a refused command prints: run_main drops the notes held when the command ends in bad input (exit 2: they
    were about what it refused) and prints them before any other ending's message."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.held: list[str] | None = []  # None: released, notes print at once

    def note(self, text: str) -> None:
        if self.held is not None:
            self.held.append(text)
        else:
            print(f"{self.prog}: {text}", file=sys.stderr)

    def checks_passed(self) -> None:
        self.release()

    def release(self) -> None:
        """Print the notes held, and every later one at once."""
        held, self.held = self.held or [], None
        for text in held:
            self.note(text)

    def drop(self) -> None:
        """Forget the notes held (the command was refused)."""
        if self.held is not None:
            self.held = []


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals(owns_process: bool) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM run core.stops' handler: the first raises Stopped (where Python's
    default would end the process at once on SIGTERM), later ones are ignored. A signal someone else chose a handler
    for (an embedding program; SIGINT ignored in a shell's background job) is left alone, as is every signal off the
    main thread. On leaving, the handlers that were there come back, except where the command is the process itself
    (`owns_process`: main() without argv): there the signals are ignored from then on, so one that comes while the
    interpreter exits cannot replace the exit code and line the command ended with by the raw signal (SIG_IGN, not
    a Python handler: the interpreter's teardown puts the default back for those)."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler, None):
                installed[signum] = signal.signal(signum, stops.on_signal)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, signal.SIG_IGN if owns_process else previous)


def run_main(
    prog: str, body: Callable[[], int], debug: bool, report: PrintedReport | None = None, *, owns_process: bool = False
) -> int:
    """Run `body`; turn our errors into 'prog: error: message' and their exit code. --debug prints the traceback
    before that line and keeps the exit code (a script that adds --debug still tells bad input, 2, from a bug, 1).

    SIGINT and SIGTERM end in one line and 128 + the signal's number, however many come and whenever they come
    (stop_signals, core.stops). An OSError that nothing below turned into a message (a full disk, a read-only or
    unreadable file met inside a library) is one line with its path and exit 2: it is about the machine or the
    files, not a bug. `report`: the command's, whose held notes are dropped when the command is refused for bad
    input (exit 2: the refusal is its one line) and printed before any other ending."""
    with stop_signals(owns_process):
        code = _outcome(prog, body, debug, report)
    return code


def _outcome(prog: str, body: Callable[[], int], debug: bool, report: PrintedReport | None) -> int:
    """run_main's exit code for `body`, and its line."""
    try:
        try:
            stops.arm()
            code = body()
        finally:
            stops.disarm()  # ended: from here on, a signal changes neither the code nor the line
    except Interrupted as exc:
        _end_notes(report, exc.exit_code)
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OnekePlanError as exc:
        _end_notes(report, exc.exit_code)
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = interrupted_by(exc)
        _end_notes(report, 128 + signum)
        print(f"{prog}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except OSError as exc:
        _end_notes(report, EXIT_BAD_INPUT)
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        if isinstance(exc, BrokenPipeError):  # the reader of our stdout went away: nothing more can reach it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, never a traceback
        _end_notes(report, EXIT_INTERNAL)
        if debug:
            traceback.print_exc(file=sys.stderr)
        hint = "" if debug else " (run again with --debug for the traceback)"
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
    _end_notes(report, code)
    return code


def _end_notes(report: PrintedReport | None, code: int) -> None:
    """The notes held when a command ends: dropped for bad input (the refusal is the one line), else printed."""
    if report is None:
        return
    if code == EXIT_BAD_INPUT:
        report.drop()
    report.release()


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: its path(s) when it has them, and the system's reason."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(paths) if paths else "a file or folder (the system did not say which)"
    return f"{where}: {reason}; check the path, its permissions and the free space there"


def wants_debug(argv: Sequence[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; indexes in `right` are right-aligned (numbers)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])
