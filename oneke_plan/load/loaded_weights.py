"""What a loaded model holds, per device of its profile: the bytes of its weights as they landed (on a GPU, on the
CPU, or offloaded by accelerate to CPU memory or disk), for the planned-versus-loaded table oneke-run prints.

Reads a model that loader.py loaded; loads nothing itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oneke_plan.io import jsonfile
from oneke_plan.plan.fit import device_owner


def _tensor_bytes(tensor: Any) -> int:
    """A parameter's bytes with its 4-bit quantization state (8-bit scales are counted per module: _int8_scales)."""
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        for part in (state.absmax, state.code, getattr(state, "offset", None)):
            if part is not None:
                total += part.numel() * part.element_size()
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += nested.absmax.numel() * nested.absmax.element_size()
            total += nested.code.numel() * nested.code.element_size()
    return total


def _offload_index(offload_dir: str | None) -> dict[str, Any]:
    """accelerate's index.json in the offload folder (name -> dtype, shape); {} if there is none."""
    if not offload_dir:
        return {}
    try:
        index = jsonfile.loads((Path(offload_dir) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def measured_weight_bytes(
    model: Any,
    device_map: dict[str, Any],
    dtype: str,
    offload_dir: str | None = None,
    stored_dtypes: dict[str, str] | None = None,
) -> dict[Any, int]:
    """Bytes of parameters and buffers per profile device, as loaded (tied tensors once).

    Tensors on a real device count there. Tensors left on meta by accelerate's offload count on their device_map
    device (cpu or disk): a disk tensor at the dtype it is stored in, as `offload_dir`'s index.json records it
    (transformers 4.x writes the checkpoint's dtype there) or else as the checkpoint stores it (`stored_dtypes`:
    transformers 5 reads offloaded weights straight from the checkpoint's safetensors), and cast on every fetch, so
    an fp32 profile of a bf16 checkpoint keeps bf16 on disk; any other at the profile's dtype.
    """
    import torch

    from oneke_plan.plan.memory import DTYPE_BYTES

    index = {name: entry.get("dtype", "") for name, entry in _offload_index(offload_dir).items()}
    index = {**(stored_dtypes or {}), **index}
    seen: set[Any] = set()
    totals: dict[Any, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta":
            key: Any = ("meta", name)
            device = device_owner(name, device_map)
            stored = getattr(torch, str(index.get(name, "")), None) if device == "disk" else None
            if isinstance(stored, torch.dtype):
                size = tensor.numel() * stored.itemsize
            else:
                size = tensor.numel() * (DTYPE_BYTES[dtype] if tensor.is_floating_point() else tensor.element_size())
        else:
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            device = tensor.device.index if tensor.device.type == "cuda" else device_owner(name, device_map)
            size = _tensor_bytes(tensor)
        if key in seen:
            continue
        seen.add(key)
        totals[device] = totals.get(device, 0) + size
    for name, scales in _int8_scales(model):
        key = (scales.device, scales.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            device = scales.device.index if scales.device.type == "cuda" else device_owner(name, device_map)
            totals[device] = totals.get(device, 0) + scales.numel() * scales.element_size()
    return totals


def _int8_scales(model: Any) -> list[tuple[str, Any]]:
    """bitsandbytes 8-bit row scales (SCB): on the weight after loading, moved to the module's `state` by the first
    forward pass (the weight's SCB is then None), so both places are looked at."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        for scales in (getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)):
            if scales is not None and hasattr(scales, "untyped_storage") and scales.device.type != "meta":
                found.append((f"{name}.weight" if name else "weight", scales))
    return found
