"""Files of lines (JSON Lines: oneke-run's input, answer files) read one line at a time, in bounded memory.

A file of unknown size is never read whole, and a line of unknown length is never held whole. Each line is read
with readline(line_limit + 1): a line of at most `line_limit` bytes comes back as bytes; a longer one comes back as
a LongLine holding only its first `line_limit` bytes (enough to say what the line is), and the rest of it is read
in chunks and dropped, so a 100 MB line costs what a 2 MiB one does. The file as a whole is bounded by
`total_limit`: a regular file's size is checked (fstat) before its first byte is read; a pipe, FIFO or device
(whose size is unknown until it ends, and /dev/zero never does) is counted as it is read and refused as soon as it
passes the bound.

A leaf module: standard library, errors and sizes only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Generator
from dataclasses import dataclass

from oneke_plan.io.files import too_large

DROP_CHUNK = 1 << 20
"""Bytes read at a time while skipping the rest of a long line."""


@dataclass(frozen=True)
class LongLine:
    """A line longer than the limit: its first `line_limit` bytes. The rest was read and dropped."""

    head: bytes


def read_lines(
    path: str | os.PathLike[str], line_limit: int, total_limit: int | None, remedy: str
) -> Generator[tuple[int, bytes | LongLine], None, None]:
    """(line number from 1, the line's bytes without its newline, or a LongLine) for every line of `path`, blank
    ones included; a LongLine is handed over before the rest of its line is read. BadInput (too_large) when the
    file is over `total_limit` bytes (None: no bound); OSError as open and read raise it. Closing the iterator
    closes the file."""
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        if total_limit is not None and stat.S_ISREG(info.st_mode) and info.st_size > total_limit:
            raise too_large(path, total_limit, remedy, info.st_size)
        total = 0
        number = 0
        while True:
            line = handle.readline(line_limit + 1)
            if not line:
                return
            number += 1
            total += len(line)
            if line.endswith(b"\n") or len(line) <= line_limit:  # the whole line (the last one may lack "\n")
                _check_total(path, total, total_limit, remedy)
                yield number, line[:-1] if line.endswith(b"\n") else line
                continue
            head = line[:line_limit]
            del line
            # Handed over before the rest is read: the caller may refuse the file from its head alone (/dev/zero's
            # endless line of NUL bytes is no JSON), and then nothing more is read.
            yield number, LongLine(head)
            del head
            while True:  # the rest of the line, read and dropped
                chunk = handle.readline(DROP_CHUNK)
                total += len(chunk)
                _check_total(path, total, total_limit, remedy)
                if not chunk or chunk.endswith(b"\n"):
                    break


def _check_total(path: str | os.PathLike[str], total: int, total_limit: int | None, remedy: str) -> None:
    if total_limit is not None and total > total_limit:
        raise too_large(path, total_limit, remedy)
