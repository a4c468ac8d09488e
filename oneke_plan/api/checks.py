"""The checks both flows make of what they are given: choices, sizes, the model source and what it reads, the adapter
folder. Each refuses with one BadInput line that says what to do; a few also put what passed into the form the
flows use (a repeated flag as a list, a schema as JSON text). oneke-run's own checks, in their order, are
preflight's."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.options import PathLike
from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import NumberError, SizeError, parse_int, parse_size
from oneke_plan.io.files import Reads

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


def model_reads(source: ModelSource, reads: Reads | None = None) -> Reads:
    """`reads` with what loading `source` reads: a model's folder, the whole repository folder of a Hugging Face
    cache snapshot (its files are links into the repository's blobs/), or a GGUF file (not the folder it lies in,
    which may be any folder); nothing for a built-in config."""
    reads = reads or Reads()
    if source.gguf_file is not None:
        return reads.file(source.gguf_file, "the model's GGUF file")
    if source.directory is None:
        return reads
    if source.kind == "hub-cache" and source.directory.parent.name == "snapshots":
        return reads.folder(source.directory.parent.parent, "the model's folder in the Hugging Face cache")
    return reads.folder(source.directory, "the model's folder")


def file_flag(value: Any) -> Path | None:
    """The file a flag that takes inline JSON or a file name (--schema, --example) names, when it names one."""
    if isinstance(value, (str, os.PathLike)) and not str(value).lstrip().startswith(("[", "{")):
        return Path(value)
    return None


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
