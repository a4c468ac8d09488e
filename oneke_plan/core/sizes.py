"""Numbers users type: byte sizes parsed the way accelerate does and printed the way people read them, and the
integers and decimals of flags and files (a GPU index, a count, GB/s), in one place.

GiB/MiB/KiB are binary (2**30, 2**20, 2**10); GB/MB/KB are decimal (10**9, ...). As in accelerate's
`convert_file_size_to_int`, a lower-case trailing `b` (`"8Gb"`) means bits. A bare integer is bytes.

Only ASCII digits are digits here. Python's own readers accept more: int() and float() take any Unicode decimal
digit ('٣', fullwidth '３'), underscores ('1_000') and Unicode spaces, while str.isdigit() also says yes to
superscripts ('²') that int() then refuses; a check with one and a conversion with the other is how a flag ended
in an internal error. Every number read from text goes through parse_int, parse_number or parse_size, which accept
[0-9] (and '.', a unit, a sign where allowed) with ASCII spaces around, and a bounded length.
"""

from __future__ import annotations

import re

GiB = 2**30
MiB = 2**20
KiB = 2**10

_UNITS = {
    "TIB": 2**40,
    "GIB": GiB,
    "MIB": MiB,
    "KIB": KiB,
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
    "B": 1,
    "": 1,
}
_MAX_BYTES = 2**63  # 8 EiB: more than any machine has of anything, and what torch's int64 sizes can count
MAX_NUMBER_CHARS = 64
"""Longest text read as a number (spaces and unit included): far more than any real value needs, so that a pasted
megabyte of digits is refused before anything parses it."""
MAX_INT_DIGITS = 18
"""Most digits in an integer (an index, a count): under 2**63, more than any count of anything here."""
_SPACES = " \t"  # what may surround a number: ASCII spaces only (str.strip() would take U+3000 and NBSP too)
_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_SIZE = re.compile(rf"({_NUMBER})[ \t]*([A-Za-z]*)")
_DECIMAL = re.compile(rf"(?:{_NUMBER})(?:[eE][-+]?[0-9]{{1,3}})?")
_INT = re.compile(rf"(-?)([0-9]{{1,{MAX_INT_DIGITS}}})")


class NumberError(ValueError):
    """Text that is not the number asked for; the message says what is accepted."""


class SizeError(NumberError):
    """A size string that is not a non-negative number followed by a known unit."""


def _bounded(text: str, what: str, error: type[NumberError] = NumberError, huge: str = "any number it can be") -> str:
    """`text` without surrounding ASCII spaces, refused when longer than MAX_NUMBER_CHARS (`huge`: what a number
    that long would be larger than)."""
    if len(text) > MAX_NUMBER_CHARS:
        shown = f"{what} {text[:20]!r}... ({len(text)} characters)"
        if text.strip(_SPACES)[:1] in tuple("0123456789."):
            raise error(f"{shown} is larger than {huge}")
        raise error(f"{shown} is longer than {huge}")
    return text.strip(_SPACES)


def parse_int(text: str | int, what: str, negative: bool = False) -> int:
    """`text` as an int: ASCII digits (at most MAX_INT_DIGITS), with a leading '-' only where `negative` allows.
    `what` names the value in the message (NumberError): "--reserve device", "--batch-size". An int passes as it
    is (bool refused)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise NumberError(f"{what} {text!r} is not an integer")
    if isinstance(text, int):
        value = text
    else:
        match = _INT.fullmatch(_bounded(text, what))
        if match is None:
            kind = "an integer" if negative else "a non-negative integer"
            raise NumberError(f"{what} {text!r} is not {kind} (ASCII digits 0-9, at most {MAX_INT_DIGITS})")
        value = int(match.group(0))
    if value < 0 and not negative:
        raise NumberError(f"{what} {text!r} is negative")
    return value


def parse_number(text: str | int | float, what: str) -> float:
    """`text` as a float: ASCII digits with an optional fraction and exponent ('936', '19.5', '1e3'); an int or
    float passes as it is (bool refused). Finite or not is the caller's to check."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise NumberError(f"{what} {text!r} is not a number")
    if isinstance(text, (int, float)):
        return float(text)
    stripped = _bounded(text, what)
    if _DECIMAL.fullmatch(stripped) is None:
        raise NumberError(f"{what} {text!r} is not a number (ASCII digits 0-9, e.g. 936 or 19.5)")
    return float(stripped)


def parse_size(text: str | int) -> int:
    """Return `text` as a number of bytes (int). Raises SizeError with a message saying what is accepted."""
    if isinstance(text, bool):
        raise SizeError(f"size {text!r} is not a size")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"size {text} is negative; give bytes >= 0 or a string like '24GiB'")
        if text >= _MAX_BYTES:
            raise SizeError(f"size {text} is larger than any memory or disk (8 EiB)")
        return text
    stripped = _bounded(str(text), "size", SizeError, "any memory or disk (8 EiB)")
    match = _SIZE.fullmatch(stripped)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise SizeError(
            f"size {text!r} is not a size: write a non-negative number (digits 0-9) and a unit, e.g. '24GiB', "
            "'11.5GB', '512MiB' (GiB = 2**30 bytes, GB = 10**9 bytes)"
        )
    number = match.group(1)
    # an integer exactly (a float has 53 bits: '9007199254740993' would lose its last byte)
    value = int(number) * _UNITS[unit] if "." not in number else float(number) * _UNITS[unit]
    if value >= _MAX_BYTES:
        raise SizeError(f"size {text!r} is larger than any memory or disk (8 EiB)")
    if match.group(2).endswith("b") and unit in ("TB", "GB", "MB", "KB"):
        return int(value) // 8  # accelerate reads a lower-case b as bits
    return int(value)


def format_bytes(n: int) -> str:
    """Human form in binary units, e.g. 25769803776 -> '24.00 GiB'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def flag_size_at_least(n: int) -> str:
    """`n` bytes as a flag value ('11.99GiB'): format_bytes' unit and two decimals, rounded up, so that the size it
    parses back to is never less than `n` (a suggested --cpu-memory rounded down would not fit)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            hundredths = -(-n * 100 // size)
            while parse_size(f"{hundredths / 100:.2f}{unit}") < n:  # float parsing may land a byte short
                hundredths += 1
            return f"{hundredths / 100:.2f}{unit}"
    return f"{n}B"
