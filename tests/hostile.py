"""Hostile data for the reliability tests and the fuzz test: alias bombs, deep nesting, and random corruptions of
YAML and JSON documents (byte flips, truncations, deleted keys, wrong types, huge numbers, deep nesting, aliases,
Unicode oddities). Every function takes a random.Random, so a fixed seed gives the same cases on every machine.
And the one way the reliability tests measure a command's peak memory (`measured`, `imports_peak_bytes`)."""

from __future__ import annotations

import functools
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from allocated_peak import Measured, measured  # noqa: F401 - tools/, shared with the benchmarks; tests import them here


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """The classic YAML alias bomb: `levels` anchors of `width` aliases each, 10**9 'lol's once expanded.

    Under 1 KB with the default sizes; expanded, it would take gigabytes."""
    lines = [f"lol0: &lol0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def deep_list(depth: int = 20_000) -> str:
    """`depth` nested JSON/YAML flow lists around a 1: the text is the same in both languages."""
    return "[" * depth + "1" + "]" * depth


# ---------------------------------------------------------------- structure-aware corruptions

_DEEP = "@@DEEP@@"
_ALIAS = "@@ALIAS@@"
_HUGE = "@@HUGE@@"  # an integer of 5,000 digits, which Python itself cannot turn into text to write
ODD_STRINGS = [
    "\ud800",  # a lone surrogate: valid JSON as an escape, not valid Unicode
    "\udfff",
    "\ud83d",  # half of an emoji's pair
    "\u202e" + "cpu",  # right-to-left override
    "\x00",
    "\ufeff",
    "e\u0301",  # a combining accent
    "\uff43\uff50\uff55",  # fullwidth 'cpu'
    "\U0001f600",
    "\u2028line\u2029",
    "x" * 200_000,
    "",
    " ",
]
WRONG_VALUES: list[Any] = ["text", "", [], {}, None, True, False, -1, 0, 1.5, [1, 2], {"a": 1}, "24GiB", "nan", -0.0]
HUGE_NUMBERS: list[Any] = [10**400, _HUGE, 2**64, -(2**63), 1e308, float("inf"), float("-inf"), float("nan"), 2**63 - 1]


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indexes) to a value inside `data`, the root excluded."""
    found: list[tuple[Any, ...]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        found.extend(_paths(value, (*prefix, key)))
    return found


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


def mutate(data: Any, rng: random.Random, kind: str) -> Any:
    """A copy of `data` with one value changed as `kind` says (delete, wrong_type, huge_number, odd_string,
    odd_key, deep, alias); deep and alias leave a marker that `render` replaces in the text."""
    data = json.loads(json.dumps(data))
    paths = _paths(data)
    if not paths:
        return data
    path = rng.choice(paths)
    parent, key = _parent(data, path), path[-1]
    if kind == "delete":
        del parent[key]
    elif kind == "wrong_type":
        parent[key] = rng.choice(WRONG_VALUES)
    elif kind == "huge_number":
        parent[key] = rng.choice(HUGE_NUMBERS)
    elif kind == "odd_string":
        parent[key] = rng.choice(ODD_STRINGS)
    elif kind == "odd_key" and isinstance(parent, dict):
        parent[rng.choice(ODD_STRINGS)] = parent.pop(key)
    elif kind == "deep":
        parent[key] = _DEEP
    elif kind == "alias":
        parent[key] = _ALIAS
    return data


def render_yaml(data: Any) -> str:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False, width=120)
    text = text.replace(f"'{_DEEP}'", deep_list()).replace(f"'{_HUGE}'", "9" * 5000)
    bomb = "[" + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 9) + "]" for i in range(10)) + "]"
    return text.replace(f"'{_ALIAS}'", bomb)


def render_json(data: Any, indent: int | None = None) -> str:
    text = json.dumps(data, indent=indent)  # ensure_ascii: lone surrogates become \ud800 escapes, as a file has them
    text = text.replace(f'"{_DEEP}"', deep_list()).replace(f'"{_HUGE}"', "9" * 5000)
    return text.replace(f'"{_ALIAS}"', '"*alias"')


# ---------------------------------------------------------------- byte-level corruptions


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def delete_span(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 40) :]


def insert_odd_bytes(data: bytes, rng: random.Random) -> bytes:
    odd = rng.choice(
        [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf", b"\r", b"\t", b"\\ud800", b"\x1b[2J"]
    )
    at = rng.randrange(len(data) + 1)
    return data[:at] + odd + data[at:]


BYTE_CORRUPTIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": flip_bits,
    "truncate": truncate,
    "delete_span": delete_span,
    "odd_bytes": insert_odd_bytes,
}
STRUCTURE_CORRUPTIONS = ("delete", "wrong_type", "huge_number", "odd_string", "odd_key", "deep", "alias")


def replaced(make: Callable[[Path], object]) -> Callable[[Path], None]:
    """A damage for a test's table: the file at the path is removed and `make` puts something else there (a FIFO,
    a folder, a link to /dev/zero)."""

    def damage(path: Path) -> None:
        path.unlink()
        make(path)

    return damage


# ---------------------------------------------------------------- peak memory of one command (measured: tools/)


BIN = Path(sys.executable).parent


def cli(name: str) -> list[str | Path]:
    """The command line that starts one of the tools (oneke-plan, oneke-run, oneke-score) in this environment."""
    return [BIN / name]


@functools.cache
def imports_peak_bytes() -> int:
    """The peak resident memory of a process that only imports what the tools import before a refusal can come
    (torch, transformers, peft and both CLIs): the floor every refusal's memory is compared with."""
    imports = "import torch, transformers, peft, oneke_plan.cli.plan, oneke_plan.cli.run"
    done = measured([sys.executable, "-c", imports])
    assert done.code == 0, done.stderr
    return done.peak_bytes
