"""Byte sizes: parse them the way accelerate does, print them the way people read them.

GiB/MiB/KiB are binary (2**30, 2**20, 2**10); GB/MB/KB are decimal (10**9, ...). As in accelerate's
`convert_file_size_to_int`, a lower-case trailing `b` (`"8Gb"`) means bits. A bare integer is bytes.
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
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class SizeError(ValueError):
    """A size string that is not a non-negative number followed by a known unit."""


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
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise SizeError(
            f"size {text!r} is not a size: write a non-negative number and a unit, e.g. '24GiB', '11.5GB', "
            "'512MiB' (GiB = 2**30 bytes, GB = 10**9 bytes)"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value >= _MAX_BYTES:  # also catches inf ('9' * 400 parses as a float)
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
