"""Typed records read from and written to plain data (YAML/JSON mappings), checked where they are declared.

A record is a dataclass whose fields carry their check in the field's metadata (`field(metadata=checks(...))`):
the field's type is its annotation, its default is the dataclass default, its allowed values are the check. One
generic reader (`read_record`) walks the fields, applies each check with the key path it is at, and raises
`Invalid(path, phrase)`; the caller turns that into its one BadInput line ("FILE: workload.batch_size must be a
positive integer, not 0; REMEDY"). `to_data` writes a record back as plain data, in field order.

Why not pydantic or msgspec: neither is in the oldest supported environment (a new dependency of the planning
layer, which must stay light to import), and both word their own errors (several lines, their own type names),
which would have to be parsed back into our one-line messages. A check here is a small function; the reader is
a loop over dataclasses.fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

Check = Callable[[Any, str], Any]  # (value, key path) -> the value as the field holds it; raises Invalid
CHECK = "check"  # the field metadata key
REQUIRED = "required"  # the field metadata key: the file must have the key, though the dataclass has a default
REPR_LIMIT = 80  # characters of a refused value shown in a message (a fuzzed file may hold a huge one)


class Invalid(Exception):
    """A value that is not what its field declares: `path` (workload.batch_size) and the rest of the sentence."""

    def __init__(self, path: str, phrase: str) -> None:
        super().__init__(f"{path} {phrase}" if path else phrase)
        self.path = path
        self.phrase = phrase


def checks(check: Check, required: bool = False) -> dict[str, Any]:
    """Field metadata declaring how the field is read: `field(default=..., metadata=checks(positive_int))`. A field
    without a default is required in the file; `required` makes one with a default (for the code that builds the
    record) required in the file too."""
    return {CHECK: check, REQUIRED: required}


def is_required(f: dataclasses.Field[Any]) -> bool:
    """Whether a file must hold the key of field `f` (a field without a default, or one declared required)."""
    return not _has_default(f) or bool(f.metadata.get(REQUIRED))


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is no count


def positive_int(value: Any, path: str) -> int:
    if not _is_int(value) or value <= 0:
        raise Invalid(path, f"must be a positive integer, not {shown(value)}")
    return int(value)


def byte_count(value: Any, path: str) -> int:
    if not _is_int(value) or value < 0:
        raise Invalid(path, f"must be a byte count (a non-negative integer), not {shown(value)}")
    return int(value)


def count(value: Any, path: str) -> int:
    if not _is_int(value) or value < 0:
        raise Invalid(path, f"must be a non-negative integer, not {shown(value)}")
    return int(value)


def string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise Invalid(path, f"must be a string, not {shown(value)}")
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(path, f"must be true or false, not {shown(value)}")
    return value


def mapping(value: Any, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise Invalid(path, f"must be a mapping, not {shown(value)}")
    return value


def anything(value: Any, path: str) -> Any:
    """An informational value kept as written."""
    return value


def one_of(choices: Collection[Any]) -> Check:
    """One of `choices` (compared as written: a list or a mapping is none of them)."""

    def check(value: Any, path: str) -> Any:
        if isinstance(value, (list, dict)) or isinstance(value, bool) or value not in choices:
            raise Invalid(path, f"{shown(value)} is not one of {', '.join(map(str, choices))}")
        return value

    return check


def _nests(check: Check, inner: Check, suffix: str = "") -> Check:
    """`check`, marked as reading values with `inner` at `suffix` below its own path (required_paths follows it)."""
    check.inner = inner  # type: ignore[attr-defined]
    check.suffix = suffix  # type: ignore[attr-defined]
    return check


def optional(check: Check) -> Check:
    """null, or what `check` accepts."""
    return _nests(lambda value, path: None if value is None else check(value, path), check)


def null_as(empty: Callable[[], Any], check: Check) -> Check:
    """null reads as `empty()` (a key written as `notes: null` by hand means none)."""
    return _nests(lambda value, path: empty() if value is None else check(value, path), check)


def list_of(item: Check, nonempty: bool = False) -> Check:
    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise Invalid(path, f"must be a list, not {shown(value)}")
        if nonempty and not value:
            raise Invalid(path, "is empty")
        return [item(entry, f"{path}[{i}]") for i, entry in enumerate(value)]

    return _nests(check, item, "[]")


def mapping_of(key: Check, item: Check, nonempty: bool = False, bracket: bool = False, name: str = "key") -> Check:
    """A mapping whose keys pass `key` and values `item`. A value's path is `path.KEY`, or `path['KEY']` with
    `bracket` (keys that hold dots, like module names); `name` stands for any key in required_paths (`<id>`)."""

    def check(value: Any, path: str) -> dict[Any, Any]:
        mapping(value, path)
        if nonempty and not value:
            raise Invalid(path, "is empty")
        read = {}
        for k, v in value.items():
            where = f"{path}[{k!r}]" if bracket else join(path, str(k))
            read[key(k, f"{path} key {shown(k)}" if bracket else where)] = item(v, where)
        return read

    return _nests(check, item, f".<{name}>")


def record(
    cls: type, also: Callable[[Any, Mapping[str, Any], str], None] | None = None, keys: tuple[str, ...] = ()
) -> Check:
    """A mapping read as the record `cls`; `also(read, data, path)` checks what spans fields. `keys`: keys the
    mapping must hold besides the fields' (what `also` reads, e.g. a written total)."""

    def check(value: Any, path: str) -> Any:
        read = cls(**read_fields(cls, value, path))
        for name in keys:
            if name not in value:
                raise Invalid("", f"missing '{join(path, name)}'")
        if also is not None:
            also(read, value, path)
        return read

    check.record = cls  # type: ignore[attr-defined]
    check.keys = keys  # type: ignore[attr-defined]
    return check


def required_paths(cls: type, path: str = "") -> list[str]:
    """The key paths a file must hold for record `cls` (at `path`), in field order, records within records
    followed: `devices[].total_bytes`, `estimate.<id>.weights_bytes`. A field without a check (its reader gives it)
    is left out, and so are the keys of a record a field holds that is not required itself (an adapter's keys are
    required only when it is there). The one list of required keys: read_fields refuses a file without one of
    them, and the format's documentation is checked against it."""
    found: list[str] = []
    for f in dataclasses.fields(cls):
        check = f.metadata.get(CHECK)
        if check is None or not is_required(f):
            continue
        here = join(path, f.name)
        found.append(here)
        suffix = ""
        while not hasattr(check, "record") and hasattr(check, "inner"):  # through list_of, mapping_of, optional
            suffix += check.suffix
            check = check.inner
        if hasattr(check, "record"):
            inner = here + suffix
            if suffix:
                found.append(inner)
            found += required_paths(check.record, inner)
            found += [join(inner, name) for name in check.keys]
    return found


def read_fields(cls: type, data: Any, path: str = "", given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of record `cls` read from mapping `data` (at `path`): each field by its check, its
    default when the key is absent. Fields in `given` are the caller's (read another way); keys no field names
    are ignored (informational keys of a newer writer)."""
    if not isinstance(data, dict):
        raise Invalid(path, f"must be a mapping, not {shown(data)}")
    values = dict(given or {})
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and (f.name in data or is_required(f)):
            values[f.name] = read_field(cls, f.name, data, path)
    return values


def read_field(cls: type, name: str, data: Mapping[str, Any], path: str = "") -> Any:
    """Field `name` of record `cls` from mapping `data` by the field's check (Invalid: missing, or refused)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    check = f.metadata.get(CHECK)
    if check is None:
        raise TypeError(f"{cls.__name__}.{name} declares no check: its reader must give it")
    if name not in data:
        if not is_required(f):
            return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        raise Invalid("", f"missing '{join(path, name)}'")
    return check(data[name], join(path, name))


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def to_data(value: Any) -> Any:
    """A record as plain data: its own `to_data()` where it has one (what it writes differs from its fields),
    else its fields in order; lists and mappings recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own = getattr(value, "to_data", None)
        if own is not None:
            return own()
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: to_data(v) for k, v in value.items()}
    return value
