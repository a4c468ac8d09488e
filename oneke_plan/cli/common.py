"""What both commands share: error handling (one line, an exit code, no traceback) and table printing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from oneke_plan.errors import OnekePlanError

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what, and where to look), not the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = " (a value starting with '-' needs '=', e.g. --gpu=-8GiB)" if "expected one argument" in message else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; see {self.prog} --help\n")


def run_main(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run `body`; turn our errors into 'prog: error: message' and their exit code. --debug shows tracebacks."""
    try:
        return body()
    except OnekePlanError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, never a traceback
        if debug:
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


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


def device_label(device_id: int | str) -> str:
    """'GPU 0' for a GPU index; 'cpu' and 'disk' as they are."""
    return device_id if isinstance(device_id, str) else f"GPU {device_id}"
