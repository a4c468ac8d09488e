"""A checkpoint on disk, read without loading its weights: which files, which tensor names, which dtype.

safetensors headers are read directly; pickled `.bin` files only weights-only onto the meta device, so a malicious
pickle is refused and no tensor data is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneke_plan import jsonfile
from oneke_plan.errors import BadInput

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # what accelerate's load_checkpoint_in_model takes: the index file or the single weights file
    files: tuple[Path, ...]  # the weight files themselves (the shards, or the single file)
    keys: frozenset[str]
    pickled: bool


def _safetensors_keys(file: Path) -> set[str]:
    from safetensors import safe_open

    if not file.is_file():
        raise BadInput(f"{file}: missing; the checkpoint's index names it: download the missing shard again")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
        size = file.stat().st_size
        header = int.from_bytes(file.open("rb").read(8), "little")
        with file.open("rb") as raw:
            raw.seek(8)
            meta = json.loads(raw.read(header))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + header + end > size:
            raise ValueError("file shorter than its header says")
    except Exception as exc:  # safetensors raises its own error types
        raise BadInput(
            f"{file}: not a complete safetensors file ({exc}); it is truncated or corrupt: download it again"
        ) from None
    return keys


def _bin_keys(file: Path) -> set[str]:
    import torch

    if not file.is_file():
        raise BadInput(f"{file}: missing; the checkpoint's index names it: download the missing shard again")
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as exc:
        raise BadInput(
            f"{file}: refused: a pickled checkpoint is only read weights-only, and this one is not "
            f"plain tensors or is corrupt ({type(exc).__name__}); convert it to safetensors"
        ) from None
    return set(state)


def read_checkpoint(directory: Path) -> Checkpoint:
    """Find the weights in `directory` and read their tensor names (safetensors headers; .bin weights-only)."""
    for index_name, single_name, reader, pickled in (
        (SAFE_INDEX, SAFE_SINGLE, _safetensors_keys, False),
        (BIN_INDEX, BIN_SINGLE, _bin_keys, True),
    ):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = jsonfile.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise BadInput(f"{index}: not a valid checkpoint index (no weight_map)") from None
            shards = tuple(directory / name for name in sorted(set(weight_map.values())))
            keys: set[str] = set()
            for shard in shards:
                keys |= reader(shard)
            listed = set(weight_map)
            if listed - keys:
                raise BadInput(
                    f"{index}: names {len(listed - keys)} tensors its shards lack, e.g. "
                    f"{sorted(listed - keys)[0]}; the checkpoint is incomplete"
                )
            return Checkpoint(index, shards, frozenset(keys), pickled)
        single = directory / single_name
        if single.is_file():
            return Checkpoint(single, (single,), frozenset(reader(single)), pickled)
    raise BadInput(
        f"{directory}: no weights found (model.safetensors, its index, or pytorch_model.bin); "
        "oneke-plan plans without weights, oneke-run needs them"
    )


def key_mismatch(model: Any, checkpoint_keys: frozenset[str]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) tensor names between a meta model and a checkpoint.

    Tied weights need only one name of their group on disk; persistent buffers count, non-persistent don't;
    names the model says to ignore (`_keys_to_ignore_on_load_unexpected`, e.g. old rotary inv_freq) are ignored.
    """
    from accelerate.utils import find_tied_parameters

    expected = set(model.state_dict().keys())
    groups = find_tied_parameters(model)
    tied_extra = {name for group in groups for name in group if any(other in checkpoint_keys for other in group)}
    missing = sorted(k for k in expected - checkpoint_keys if k not in tied_extra)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = sorted(k for k in checkpoint_keys - expected if not any(p.search(k) for p in ignore))
    return missing, unexpected


def explain_mismatch(missing: list[str], unexpected: list[str], where: Path) -> str:
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
    if missing and all(("model." + k) in unexpected or k.startswith("lm_head") for k in missing[:20]):
        lines.append(
            "  likely cause: a headless AutoModel built against a ForCausalLM checkpoint (its names lack "
            "the 'model.' prefix and the lm_head); build it with AutoModelForCausalLM."
        )
    elif unexpected and all(("model." + k) in missing for k in unexpected[:20]):
        lines.append(
            "  likely cause: the checkpoint was saved from a headless model (AutoModel: no 'model.' prefix, no "
            "lm_head), so it cannot generate; use the causal-LM checkpoint."
        )
    elif unexpected and all(k.startswith("model.") or k.startswith("lm_head") for k in unexpected) and missing:
        lines.append("  likely cause: the model class does not match the checkpoint's architecture.")
    else:
        lines.append("  likely cause: a different model, an incomplete download, or the wrong config.json.")
    return "\n".join(lines)


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses headers over 100 MB
_SAFETENSORS_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def find_weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files in the order transformers reads them (sorted shard names), or [] if none.

    Cheap: reads at most the index file, never the weights."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = jsonfile.loads(index.read_text(encoding="utf-8"))["weight_map"]
                return [directory / name for name in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
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
            with first.open("rb") as raw:
                size = int.from_bytes(raw.read(8), "little")
                if size > _MAX_HEADER_BYTES:
                    return None
                header = json.loads(raw.read(size))
            dtypes = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
            return next((_SAFETENSORS_FLOAT_DTYPES[d] for d in dtypes if d in _SAFETENSORS_FLOAT_DTYPES), None)
        import torch

        state = torch.load(first, map_location="meta", weights_only=True)
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
        return str(dtype).removeprefix("torch.") if dtype is not None else None
    except Exception:  # unreadable weights: the loader says what is wrong with them, planning does not need them
        return None
