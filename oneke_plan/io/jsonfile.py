"""The one JSON reader for data users hand us: config.json, tokenizer files, input lines, schemas, few-shot
examples, checkpoint and offload indexes, answer files.

json.loads alone fails in ways that are no JSONDecodeError: 20,000 nested brackets raise RecursionError, an integer
of 5,000 digits a plain ValueError, and a lone surrogate escape ("\\ud800", valid JSON) parses into a string that
cannot be written anywhere later. `loads` bounds the nesting (oneke_plan.io.limits) before parsing and raises only
json.JSONDecodeError (JsonLimitError for what breaks a bound), with the line and column, so every caller's
existing one-line message covers these cases too. `read_json_file` adds the file's size bound and turns every
failure into one BadInput naming the file and line.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.io.files import os_error, read_regular, too_large
from oneke_plan.io.limits import MAX_JSON_BYTES, MAX_NESTING, is_valid_unicode
from oneke_plan.io.lines import DROP_CHUNK

# A JSON string (escapes included) or a bracket: strings are skipped whole, so brackets inside them do not count.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]|[\]}]')
# A \u escape of a surrogate, preceded by any run of backslashes (an odd run makes it an escape).
_SURROGATE_ESCAPE = re.compile(r"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_LONG_NUMBER = re.compile(r"[0-9]{1000,}")


class JsonLimitError(json.JSONDecodeError):
    """A JSON text that breaks one of our bounds (nesting, number length, valid Unicode) rather than the syntax."""


def loads(text: str, max_depth: int = MAX_NESTING) -> Any:
    """json.loads(text), refusing nesting deeper than `max_depth`, integers too long for Python, and lone
    surrogate escapes. Raises only json.JSONDecodeError (JsonLimitError for those three)."""
    _check_depth(text, max_depth)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:  # the depth is checked above; only a caller already deep in its own stack gets here
        raise JsonLimitError("nested too deeply to read", text, 0) from None
    except ValueError:  # Python's bound on integer digits (sys.get_int_max_str_digits)
        match = _LONG_NUMBER.search(text)
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise JsonLimitError(
            f"a number with more than {limit} digits, which no field needs", text, match.start() if match else 0
        ) from None
    if _SURROGATE_ESCAPE.search(text) is not None and not is_valid_unicode(json.dumps(value, ensure_ascii=False)):
        raise JsonLimitError(
            "a lone surrogate escape (\\ud800-\\udfff without its pair), which is not valid Unicode text",
            text,
            _lone_surrogate_at(text),
        )
    return value


def _check_depth(text: str, max_depth: int) -> None:
    if text.count("[") + text.count("{") <= max_depth:  # cannot be deeper: skip the scan (most lines)
        return
    depth = 0
    for match in _TOKENS.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise JsonLimitError(f"nested deeper than {max_depth} levels", text, match.start())
        elif char in "]}":
            depth -= 1


def _lone_surrogate_at(text: str) -> int:
    """Where the first unpaired surrogate escape starts in `text` (0 if none is found)."""
    high: tuple[int, int] | None = None  # (start, end) of a high-surrogate escape waiting for its low half
    for match in _SURROGATE_ESCAPE.finditer(text):
        if len(match.group(1)) % 2 == 0:  # an escaped backslash, then a plain 'u'
            continue
        start = match.end(1) - 1
        is_high = int(match.group(2), 16) < 0xDC00
        if high is not None:
            if not is_high and high[1] == start:
                high = None
                continue
            return high[0]
        if not is_high:
            return start
        high = (start, match.end())
    return high[0] if high is not None else 0


def read_bounded(path: str | os.PathLike[str], limit: int, remedy: str) -> bytes:
    """The bytes of the text file `path` (JSON, YAML, a schema), at most `limit`; BadInput (files.too_large) beyond
    it. A regular file's size is checked before anything is read; a pipe, FIFO or device is read in chunks and
    refused once it passes `limit`, or at its first NUL byte, which no JSON or YAML text holds (/dev/zero: at once)."""
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        regular = stat.S_ISREG(info.st_mode)
        if regular and info.st_size > limit:
            raise too_large(path, limit, remedy, info.st_size)
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            # a regular file in one read (one that grows, or /proc's of size 0, reads on), else a chunk at a time
            want = info.st_size + 1 if regular and not chunks else DROP_CHUNK
            chunk = handle.read(min(want, limit + 1 - total))
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise BadInput(f"{path}: holds a NUL byte (at byte {total + nul}), which no text file does; {remedy}")
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise too_large(path, limit, remedy)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_json_file(
    path: str | os.PathLike[str], remedy: str, encoding: str = "utf-8", limit: int | None = None
) -> Any:
    """The JSON value in the regular file `path` (a model's or adapter's file: a FIFO, device or folder is refused
    unopened), at most `limit` bytes (MAX_JSON_BYTES by default); every failure is one BadInput naming the file
    (and line), and `remedy`."""
    path = Path(path)
    try:
        # read_regular, not read_bounded: these are a model's or adapter's own files, never a pipe the user
        # meant, and a FIFO config.json must be refused, not waited on.
        data = read_regular(path, MAX_JSON_BYTES if limit is None else limit, remedy)
        if data is None:
            raise BadInput(f"{path}: not found; {remedy}")
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text ({exc.reason}); {remedy}") from None
    except OSError as exc:
        raise os_error(path, "be read", exc, remedy) from None
    try:
        return loads(text)
    except JsonLimitError as exc:
        raise BadInput(f"{path}:{exc.lineno}: {exc.msg} (column {exc.colno}); {remedy}") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); {remedy}") from None


def shown(value: Any, width: int = 60) -> str:
    """A JSON value as a message shows it: as JSON (ASCII), cut to about `width` characters."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):  # not JSON data, or an integer too long for text
        text = f"a {type(value).__name__}"
    return text if len(text) <= width else text[: width - 3] + "..."
