"""A checkpoint on disk, read without loading its weights: which files, which tensor names, which dtype.

safetensors headers are read directly; pickled `.bin` files only weights-only onto the meta device, so a malicious
pickle is refused and no tensor data is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
from oneke_plan.io import files, jsonfile
from oneke_plan.io.limits import MAX_JSON_BYTES

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the index file or the single weights file
    files: tuple[Path, ...]  # the weight files themselves (the shards, or the single file)
    shapes: dict[str, tuple[int, ...]]  # every tensor's name and shape, as stored
    pickled: bool
    dtypes: dict[str, str] = field(default_factory=dict)  # torch dtype names as stored (e.g. "bfloat16")

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.shapes)


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


# Bits per element of each dtype safetensors knows (its own list, as of safetensors 0.8).
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
                    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                    "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # fmt: skip

_MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses headers over 100 MB


def _safetensors_header(file: Path, limit: int = _MAX_HEADER_BYTES) -> tuple[int, dict[str, Any]]:
    """(header length in bytes, the JSON header without `__metadata__`) of a safetensors file: 8 bytes of length,
    little-endian, then that many bytes of JSON. The length is checked against `limit` and the file's size before
    anything more is read. Raises ValueError (a header over `limit` or the file, not JSON, not an object, or a
    `__metadata__` that is not safetensors' map of strings), OSError if unreadable."""
    with file.open("rb") as raw:
        size = int.from_bytes(raw.read(8), "little")
        file_size = os.fstat(raw.fileno()).st_size
        if size > limit:
            raise ValueError(f"its header length says {size} bytes, over the limit of {format_bytes(limit)}")
        if 8 + size > file_size:
            raise ValueError(f"its header length says {size} bytes, and the file has {file_size}")
        text = raw.read(size)
    try:
        meta = jsonfile.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("its header is not UTF-8 text") from None
    except json.JSONDecodeError as exc:  # and jsonfile's bounds: nesting, long numbers, lone surrogates
        raise ValueError(f"its header is not JSON oneke-plan reads ({exc.msg}, column {exc.colno})") from None
    if not isinstance(meta, dict):
        raise ValueError("its header is not a JSON object")
    extra = meta.get("__metadata__", {})
    if not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
        raise ValueError("its header's __metadata__ is not a JSON object of strings")
    return size, {k: v for k, v in meta.items() if k != "__metadata__"}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(name: str) -> str:
    return repr(name if len(name) <= 100 else name[:100] + "...")


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's header entry by safetensors' own rules, or None."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        return f"has dtype {jsonfile.shown(dtype)}, not one of safetensors' ({', '.join(SAFETENSORS_BITS)})"
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        return f"has shape {jsonfile.shown(shape)}, not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        return f"has data_offsets {jsonfile.shown(offsets)}, not [begin, end] as two non-negative integers"
    span = offsets[1] - offsets[0]
    if span < 0:
        return f"has data_offsets {jsonfile.shown(offsets)}, which end before they begin"
    bits = 0 if 0 in shape else SAFETENSORS_BITS[dtype]
    for n in shape:
        bits *= n
        if bits > 8 * span:  # already too large: no need to multiply huge numbers on
            break
    if bits != 8 * span:
        return f"has shape {jsonfile.shown(shape)} of {dtype}, which is not the {span} bytes its data_offsets span"
    return None


def safetensors_entries(file: Path, max_header_bytes: int = _MAX_HEADER_BYTES) -> dict[str, Any]:
    """The tensors a safetensors file's header lists (name -> dtype, shape, data_offsets), after checking the
    header by safetensors' own rules, so that nothing downstream trusts a header that lies: its length within
    `max_header_bytes` and the file (checked before it is read), a known dtype, a shape whose bytes are the span
    of its data_offsets, and the tensors' spans covering the data exactly, without overlaps or gaps, to the end of
    the file. Raises ValueError saying which tensor and what is wrong, or OSError."""
    header, meta = _safetensors_header(file, max_header_bytes)
    for name, entry in meta.items():
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"tensor {_shown(name)} {problem}")
    end = 0
    for name, entry in sorted(meta.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = entry["data_offsets"]
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap after the tensor before it"
            raise ValueError(
                f"tensor {_shown(name)} has data_offsets {jsonfile.shown([begin, stop])}, which {what} (ending at "
                f"byte {end})"
            )
        end = stop
    size = file.stat().st_size
    if 8 + header + end != size:
        what = "shorter than its header says" if 8 + header + end > size else "longer than its header says"
        raise ValueError(f"file {what} ({size} bytes; the header describes {8 + header + end})")
    return meta


def _safetensors_tensors(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(name -> shape, name -> torch dtype name) of a safetensors file, from one read of its header, after
    safetensors' own reader has accepted the file."""
    from safetensors import safe_open

    if not file.is_file():
        raise BadInput(f"{file}: missing; the checkpoint's index names it: download the missing shard again")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
        meta = safetensors_entries(file)
        shapes = {key: tuple(meta[key]["shape"]) for key in keys}
    except Exception as exc:  # safetensors raises its own error types
        raise BadInput(
            f"{file}: not a complete safetensors file ({exc}); it is truncated or corrupt: download it again"
        ) from None
    return shapes, {k: _SAFETENSORS_DTYPES.get(v.get("dtype", ""), "") for k, v in meta.items()}


def _bin_tensors(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(name -> shape, {}) of a pickled file, read weights-only onto meta: no tensor data is read, and dtypes are
    not recorded (nothing needs them for a pickled checkpoint: compat.offload_writes_weights)."""
    import torch

    if not file.is_file():
        raise BadInput(f"{file}: missing; the checkpoint's index names it: download the missing shard again")
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
        return {key: tuple(tensor.shape) for key, tensor in state.items()}, {}
    except Exception as exc:
        raise BadInput(
            f"{file}: refused: a pickled checkpoint is only read weights-only, and this one is not "
            f"plain tensors or is corrupt ({type(exc).__name__}); convert it to safetensors"
        ) from None


def read_checkpoint(directory: Path) -> Checkpoint:
    """Find the weights in `directory` and read their tensor names (safetensors headers; .bin weights-only)."""
    for index_name, single_name, reader, pickled in (
        (SAFE_INDEX, SAFE_SINGLE, _safetensors_tensors, False),
        (BIN_INDEX, BIN_SINGLE, _bin_tensors, True),
    ):
        index = directory / index_name
        if os.path.lexists(index):  # not is_file(): a FIFO or folder there is refused, not passed over
            try:
                weight_map, shards = _index_shards(index)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise BadInput(f"{index}: not a valid checkpoint index (no weight_map)") from None
            shapes: dict[str, tuple[int, ...]] = {}
            dtypes: dict[str, str] = {}
            for shard in shards:
                shard_shapes, shard_dtypes = reader(shard)
                shapes.update(shard_shapes)
                dtypes.update(shard_dtypes)
            listed = set(weight_map)
            if listed - set(shapes):
                raise BadInput(
                    f"{index}: names {len(listed - set(shapes))} tensors its shards lack, e.g. "
                    f"{sorted(listed - set(shapes))[0]}; the checkpoint is incomplete"
                )
            return Checkpoint(index, shards, shapes, pickled, dtypes)
        single = directory / single_name
        if single.is_file():
            shapes, dtypes = reader(single)
            return Checkpoint(single, (single,), shapes, pickled, dtypes)
    raise BadInput(
        f"{directory}: no weights found (model.safetensors, its index, or pytorch_model.bin); "
        "oneke-plan plans without weights, oneke-run needs them"
    )


@dataclass(frozen=True)
class Mismatch:
    """How a checkpoint differs from the model, after transformers' own renaming and fusing of its names."""

    missing: list[str]  # the model's tensors no checkpoint tensor becomes
    unexpected: list[str]  # checkpoint tensors that become none of the model's
    wrong_shapes: list[str]  # "name: checkpoint (a, b), model (c, d)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shapes)


def key_mismatch(model: Any, checkpoint: Checkpoint) -> Mismatch:
    """Compare a meta model with a checkpoint as transformers' from_pretrained will load it: each checkpoint name
    renamed (and per-expert weights fused) by transformers' own conversion rules for the model (compat), the
    base-model prefix added or dropped as it does; tied weights need one name of their group on disk; names the
    model says to ignore are ignored. Shapes are compared where a name maps to one tensor unchanged."""
    from accelerate.utils import find_tied_parameters

    from oneke_plan.measure.compat import checkpoint_key_renamer

    state = model.state_dict()
    rename = checkpoint_key_renamer(model)
    renamed: dict[str, tuple[str, bool]] = {key: rename(key) for key in checkpoint.shapes}
    loaded = {target for target, _ in renamed.values()}
    groups = find_tied_parameters(model)
    tied_extra = {name for group in groups for name in group if any(other in loaded for other in group)}
    ignore_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = sorted(
        k for k in set(state) - loaded if k not in tied_extra and not any(p.search(k) for p in ignore_missing)
    )
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = sorted(
        key for key, (target, _) in renamed.items() if target not in state and not any(p.search(key) for p in ignore)
    )
    wrong = []
    for key, (target, converted) in sorted(renamed.items()):
        if not converted and target in state and tuple(state[target].shape) != checkpoint.shapes[key]:
            wrong.append(f"{key}: checkpoint {checkpoint.shapes[key]}, model {tuple(state[target].shape)}")
    return Mismatch(missing, unexpected, wrong)


def explain_mismatch(mismatch: Mismatch, where: Path) -> str:
    missing, unexpected = mismatch.missing, mismatch.unexpected
    if not missing and not unexpected:
        shown = "; ".join(mismatch.wrong_shapes[:3]) + (" ..." if len(mismatch.wrong_shapes) > 3 else "")
        return (
            f"{where}: {len(mismatch.wrong_shapes)} of the checkpoint's tensors have other shapes than the model's "
            f"config.json gives them ({shown}); nothing was loaded: the config and the weights are from different "
            "models"
        )
    lines = [f"{where}: the checkpoint's tensor names do not match the model; nothing was loaded."]
    if missing:
        lines.append(
            f"  missing from the checkpoint ({len(missing)}): {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    if unexpected:
        lines.append(
            f"  in the checkpoint but not the model ({len(unexpected)}): {', '.join(unexpected[:5])}"
            + (" ..." if len(unexpected) > 5 else "")
        )
    heads = ("lm_head.", "embed_out.", "output.")  # a causal LM's output layer under its usual names
    if unexpected and not missing and all(k.startswith(heads) for k in unexpected):
        lines.append(
            "  likely cause: a headless AutoModel built against a causal-LM checkpoint (it has no output layer for "
            "the checkpoint's lm_head, so it cannot generate); build it with AutoModelForCausalLM."
        )
    elif missing and not unexpected and all(k.startswith(heads) for k in missing):
        lines.append(
            "  likely cause: the checkpoint was saved from a headless model (AutoModel: no lm_head), so it cannot "
            "generate; use the causal-LM checkpoint."
        )
    elif unexpected and missing:
        lines.append("  likely cause: the model class does not match the checkpoint's architecture.")
    else:
        lines.append("  likely cause: a different model, an incomplete download, or the wrong config.json.")
    return "\n".join(lines)


def _index_shards(index: Path) -> tuple[dict[str, str], tuple[Path, ...]]:
    """(tensor name -> shard file name, the shard files in the order transformers reads them: sorted names) of a
    checkpoint index. Raises BadInput for an index over the JSON size bound, else what reading or indexing
    malformed JSON raises (OSError, ValueError, KeyError, ...)."""
    data = files.read_regular(index, MAX_JSON_BYTES, "download the checkpoint's index again")
    if data is None:
        raise FileNotFoundError(index)
    text = data.decode("utf-8")
    weight_map = jsonfile.loads(text)["weight_map"]
    return weight_map, tuple(index.parent / name for name in sorted(set(weight_map.values())))


def find_weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files in the order transformers reads them (sorted shard names), or [] if none.

    Cheap: reads at most the index file, never the weights."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = directory / index_name
        if index.is_file():
            try:
                return list(_index_shards(index)[1])
            except (BadInput, OSError, ValueError, KeyError, TypeError, AttributeError):
                return []
        if (directory / single_name).is_file():
            return [directory / single_name]
    return []


def checkpoint_dtype(directory: Path) -> str | None:
    """The dtype transformers' `dtype="auto"` takes from the weights when the config names none: that of the first
    floating-point tensor of the first weight file (its header only). None when there are no readable weights."""
    files = find_weight_files(directory)
    if not files:
        return None
    first = files[0]
    try:
        if first.suffix == ".safetensors":
            dtypes = [v["dtype"] for v in _safetensors_header(first)[1].values()]
            floats = ("BF16", "F16", "F32", "F64")
            return next((_SAFETENSORS_DTYPES[d] for d in dtypes if d in floats), None)
        import torch

        state = torch.load(first, map_location="meta", weights_only=True)
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
        return str(dtype).removeprefix("torch.") if dtype is not None else None
    except Exception:  # unreadable weights: the loader says what is wrong with them, planning does not need them
        return None
