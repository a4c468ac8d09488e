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


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses headers over 100 MB


def _safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length in bytes, the JSON header without `__metadata__`) of a safetensors file: 8 bytes of length,
    little-endian, then that many bytes of JSON. Raises ValueError for a header over 100 MB, OSError if unreadable."""
    with file.open("rb") as raw:
        size = int.from_bytes(raw.read(8), "little")
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"header of {size} bytes, over safetensors' own limit of 100 MB")
        meta = json.loads(raw.read(size))
    return size, {k: v for k, v in meta.items() if k != "__metadata__"}


def safetensors_entries(file: Path) -> dict[str, Any]:
    """The tensors a safetensors file's header lists (name -> dtype, shape, data_offsets), after checking the file
    holds all the bytes the header says. Raises ValueError (a short file, a header over 100 MB), OSError, or what
    a damaged header raises (json, key, type errors)."""
    header, meta = _safetensors_header(file)
    end = max((v["data_offsets"][1] for v in meta.values()), default=0)
    if 8 + header + end > file.stat().st_size:
        raise ValueError("file shorter than its header says")
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
