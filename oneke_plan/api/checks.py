"""The checks both flows make of what they are given: choices, sizes, output paths, the model source, the adapter
folder. Each refuses with one BadInput line that says what to do; a few also put what passed into the form the
flows use (a repeated flag as a list, a schema as JSON text). oneke-run's own checks, in their order, are
preflight's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.options import PathLike
from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import NumberError, SizeError, parse_int, parse_size

if TYPE_CHECKING:
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.model_source import ModelSource


def one_of(flag: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise BadInput(f"{flag} {value!r}: give one of {', '.join(repr(a) for a in allowed if a is not None)}")


def listed(value: Any) -> list[Any]:
    """A flag that may be given once or repeated: None -> [], one value -> [value], a list as it is."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def size_bytes(flag: str, value: str | int) -> int:
    """`value` in bytes: an int as it is, a string such as "24GiB" parsed (BadInput naming `flag` otherwise)."""
    try:
        return parse_size(value)
    except SizeError as exc:
        raise BadInput(f"{flag}: {exc}") from None


def replica_count(replicas: int | str) -> int | str:
    """A number of replicas, or "auto"."""
    if replicas == "auto" or isinstance(replicas, int):
        return replicas
    try:
        return parse_int(replicas, "--replicas")
    except NumberError:
        raise BadInput(f"--replicas {replicas!r}: give a number of replicas, or auto") from None


def output_target(
    path: Path,
    flag: str,
    overwrite: bool,
    model_dir: Path | None,
    ours: Callable[[Path], bool],
    what: str,
    suffix: str,
) -> os.stat_result | None:
    """Check an output path (`-o`, `--plot`) before planning; return what it is now (None: absent) for the write
    to confirm.

    Replaced only if it is a regular single-link file (oneke_plan.io.files) and `ours` (a `what` oneke-plan wrote), or
    --overwrite says so; a file of the model's own directory never. `suffix`: the file kind's, for the example name.
    """
    from oneke_plan.io.files import replaceable_stat

    if path.is_dir():
        raise BadInput(f"{flag} {path}: is a folder; give a file name such as {path}/machine{suffix}")
    existing = replaceable_stat(path, flag)
    if existing is None:
        return None
    if model_dir is not None and Path(model_dir).resolve() in path.resolve().parents:
        raise BadInput(
            f"{flag} {path}: is a file of the model {model_dir}; oneke-plan never replaces it: choose another path"
        )
    if not overwrite and not ours(path):
        raise BadInput(
            f"{flag} {path}: exists and is not {what} written by oneke-plan; choose another path, or pass --overwrite "
            "to replace it"
        )
    return existing


def json_text(value: str | list[Any] | dict[str, Any]) -> str:
    """A schema or example as oneke-run's flags give it: text (inline JSON or a file name) as it is, else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def model_source(name: str) -> ModelSource:
    """plan.model_source.resolve_model, with GGUF files read through transformers (measure.gguf.read_gguf)."""
    from oneke_plan.measure.gguf import read_gguf
    from oneke_plan.plan.model_source import resolve_model

    return resolve_model(name, read_gguf)


def checked_adapter(directory: PathLike) -> Adapter:
    """The adapter folder, read and fingerprinted, once peft is known to be there (BadInput otherwise)."""
    from oneke_plan.measure.adapter import read_adapter, require_peft

    require_peft()
    return read_adapter(Path(directory))
