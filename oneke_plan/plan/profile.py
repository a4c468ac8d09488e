"""The placement profile: a YAML file written by `oneke-plan` and applied by `oneke-run`.

Public contract (docs/profile-format.md): `format_version`, `device_map`, `devices` (each with `id` and
`total_bytes`), `estimate.<device id>` (weights_bytes, kv_cache_bytes, workspace_bytes, reserve_bytes, total_bytes),
`quantization.mode` (none, 8bit, 4bit), `workload` (max_input_tokens, max_new_tokens, batch_size), `dtype` and
`attn_implementation` (what oneke-run loads the model with), `template` (the chat template prompts are wrapped
in), and `adapter` when planned with a LoRA adapter. A profile of several replicas (format 2) has, instead of the
first three, a `replicas` list, each with its own `devices`, `device_map` and `estimate`, and `nodes`.
Read with yaml.safe_load only: a profile is data and can never make code run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from oneke_plan.core.errors import BadInput
from oneke_plan.formats.templates import ONEKE_TEMPLATE, TEMPLATES
from oneke_plan.io import files
from oneke_plan.io.yamlfile import read_yaml
from oneke_plan.plan.memory import DTYPE_BYTES, QUANT_MODES, merges_on_load

FORMAT_VERSION = 1  # one model copy
REPLICAS_FORMAT_VERSION = 2  # several copies, each on its own devices, repeated on `nodes` identical nodes
ESTIMATE_KEYS = ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes", "total_bytes")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"  # what profiles written before the key existed were planned for


@dataclass
class ProfileDevice:
    id: int | str  # GPU index, "cpu" or "disk"
    name: str
    total_bytes: int | None
    usable_bytes: int | None = None  # what the plan was allowed to use (free memory when detected)
    compute_capability: str | None = None
    reserve_bytes: int | None = None  # the reserve this device was planned with (None: a profile from before)


@dataclass
class Replica:
    """One copy of the model: where its modules go and what each of its devices holds."""

    devices: list[ProfileDevice]
    device_map: dict[str, int | str]
    estimate: dict[int | str, dict[str, int]]
    speed: dict[str, Any] | None = None  # this copy's speed prediction (speed.SpeedPrediction.to_dict)


@dataclass
class Profile:
    model: dict[str, Any]  # source, architecture, model_type, parameter_count, config_fingerprint
    dtype: str
    quantization: dict[str, Any]  # mode, and for 4-bit quant_type and double_quant
    workload: dict[str, int]  # max_input_tokens, max_new_tokens, batch_size
    devices: list[ProfileDevice]
    device_map: dict[str, int | str]
    estimate: dict[int | str, dict[str, int]]
    strategy: str = "fill"
    offload_dir: str | None = None
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION
    template: str = ONEKE_TEMPLATE  # what profiles written before the key existed were run with
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    notes: list[str] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)  # format 2: every copy (devices & co. are the first's)
    nodes: int = 1  # format 2: the same replicas on this many identical nodes
    adapter: dict[str, Any] | None = None  # a LoRA adapter (adapter.Adapter.record): path, fingerprint, on_load, ...
    speed: dict[str, Any] | None = None  # the speed prediction (format 2: every copy together); None: from before

    def to_data(self) -> dict[str, Any]:
        """The profile's content as its YAML file holds it: the same keys, in the same order."""
        data = asdict(self)
        keys = ["format_version", "created_by", "model", "dtype", "attn_implementation", "template", "quantization"]
        keys += ["workload"]
        keys += ["adapter"] if self.adapter is not None else []  # absent without one: older readers see no change
        keys += ["strategy", "offload_dir"]
        keys += ["nodes", "replicas"] if self.replicas else ["devices", "device_map", "estimate"]
        return {key: data[key] for key in [*keys, "speed", "notes"]}

    def to_yaml(self) -> str:
        ordered = self.to_data()
        return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120)

    def gpu_ids(self) -> list[int]:
        return [d.id for d in self.devices if isinstance(d.id, int)]

    @property
    def replica_count(self) -> int:
        """Model copies per node."""
        return len(self.replicas) or 1

    def replica(self, index: int) -> Profile:
        """The profile as one replica sees it: its own devices, device_map and estimate, format 1's shape."""
        if not self.replicas:
            if index != 0:
                raise IndexError(index)
            return self
        chosen = self.replicas[index]
        return replace(
            self,
            devices=chosen.devices,
            device_map=chosen.device_map,
            estimate=chosen.estimate,
            speed=chosen.speed,
            replicas=[],
            nodes=1,
            format_version=FORMAT_VERSION,
        )


def write_atomic(path: Path, text: str, expected: os.stat_result | None = None) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the new one, never half of one.

    `expected`: what the caller checked `path` was (oneke_plan.io.files.write_atomic); every failure is one BadInput.
    """
    path = Path(path)
    files.require_folder(path)  # again: the folder may have gone while the plan was made
    files.write_atomic(path, [text.encode("utf-8")], expected)


def written_by_oneke_plan(path: Path) -> bool:
    """Whether `path` starts as every profile oneke-plan writes does (to_yaml's first two keys). Checked on the
    text, without parsing YAML (files.starts_with)."""
    return files.starts_with(path, rb"format_version: \d+\ncreated_by: oneke-plan ")


def _need(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BadInput(f"{where}: missing '{key}'; re-create the profile with oneke-plan")
    if not isinstance(data[key], kind):
        raise BadInput(f"{where}: '{key}' has the wrong type ({type(data[key]).__name__}); re-create the profile")
    return data[key]


def _bytes_or_none(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise BadInput(f"{where}: {value!r} is not a byte count (a non-negative integer); re-create the profile")


def _device_id(value: Any, where: str) -> int | str:
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 0 or value in ("cpu", "disk")):
        raise BadInput(f"{where}: device {value!r} is not a GPU index, 'cpu' or 'disk'")
    return value  # type: ignore[no-any-return]


def read_profile(path: Path) -> Profile:
    """Load and check a profile file; every problem is a BadInput naming the file and the key."""
    where = str(path)
    data = read_yaml(path, "profile", f"create one with oneke-plan MODEL -o {where}")
    if data is None:
        raise BadInput(f"{where}: the profile is empty; create one with oneke-plan MODEL -o {where}")
    if not isinstance(data, dict):
        raise BadInput(f"{where}: a profile is a YAML mapping, not {type(data).__name__}")
    version = _need(data, "format_version", int, where)
    if version not in (FORMAT_VERSION, REPLICAS_FORMAT_VERSION):
        raise BadInput(
            f"{where}: format_version {version} is not supported (this tool reads {FORMAT_VERSION} and "
            f"{REPLICAS_FORMAT_VERSION}); re-create the profile with this version of oneke-plan"
        )
    model = _need(data, "model", dict, where)
    quant = _need(data, "quantization", dict, where)
    if quant.get("mode") not in QUANT_MODES:
        raise BadInput(f"{where}: quantization.mode must be one of {', '.join(QUANT_MODES)}")
    if quant.get("quant_type", "nf4") not in ("nf4", "fp4"):
        raise BadInput(f"{where}: quantization.quant_type must be nf4 or fp4, not {quant.get('quant_type')!r}")
    if not isinstance(quant.get("double_quant", True), bool):
        raise BadInput(f"{where}: quantization.double_quant must be true or false")
    workload = _need(data, "workload", dict, where)
    for key in ("max_input_tokens", "max_new_tokens", "batch_size"):
        value = workload.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInput(f"{where}: workload.{key} must be a positive integer, not {value!r}")
    dtype = _need(data, "dtype", str, where)
    if dtype not in DTYPE_BYTES:
        raise BadInput(f"{where}: dtype {dtype!r} is not bfloat16, float16 or float32")
    attn = data.get("attn_implementation", DEFAULT_ATTN_IMPLEMENTATION)
    if attn not in ATTN_IMPLEMENTATIONS:
        raise BadInput(f"{where}: attn_implementation {attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    template = data.get("template", ONEKE_TEMPLATE)
    if not isinstance(template, str) or template not in TEMPLATES:  # a list or a mapping is no dict key
        raise BadInput(f"{where}: template {template!r} is not one of {', '.join(TEMPLATES)}")
    replicas: list[Replica] = []
    nodes = 1
    if version == REPLICAS_FORMAT_VERSION:
        nodes = _need(data, "nodes", int, where)
        if isinstance(nodes, bool) or nodes < 1:
            raise BadInput(f"{where}: nodes must be a positive integer, not {nodes!r}")
        entries = _need(data, "replicas", list, where)
        if not entries:
            raise BadInput(f"{where}: replicas is empty; re-create the profile with oneke-plan")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise BadInput(f"{where}: replicas[{i}] must be a mapping with devices, device_map and estimate")
            replicas.append(_read_replica(entry, f"{where}: replicas[{i}]"))
        first = replicas[0]
    else:
        first = _read_replica(data, where)
    devices, device_map, estimate = first.devices, first.device_map, first.estimate
    if not isinstance(data.get("notes") or [], list):
        raise BadInput(f"{where}: notes must be a list of strings")
    adapter = data.get("adapter")
    if adapter is not None:
        if not isinstance(adapter, dict):
            raise BadInput(f"{where}: adapter must be a mapping (path, fingerprint, on_load); re-create the profile")
        for key in ("path", "fingerprint"):
            if not isinstance(adapter.get(key), str):
                raise BadInput(f"{where}: adapter.{key} must be a string; re-create the profile with oneke-plan")
        merged = "merged" if merges_on_load(str(quant["mode"])) else "unmerged"  # what oneke-plan plans
        if adapter.get("on_load") != merged:
            raise BadInput(
                f"{where}: adapter.on_load is {adapter.get('on_load')!r}, but a {quant['mode']} profile's adapter is "
                f"{merged}; re-create the profile with oneke-plan"
            )
    offload_dir = data.get("offload_dir")
    if any("disk" in r.device_map.values() for r in replicas or [first]) and not offload_dir:
        raise BadInput(f"{where}: device_map offloads to disk but offload_dir is not set")
    return Profile(
        model=model,
        dtype=dtype,
        quantization=quant,
        workload=workload,
        devices=devices,
        device_map=device_map,
        estimate=estimate,
        strategy=str(data.get("strategy", "fill")),
        offload_dir=str(offload_dir) if offload_dir is not None else None,
        attn_implementation=attn,
        template=template,
        format_version=version,
        created_by=str(data.get("created_by", "")),
        notes=list(data.get("notes") or []),
        replicas=replicas,
        nodes=nodes,
        adapter=adapter,
        speed=_speed(data, where),
    )


def _speed(data: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The informational `speed` key: a mapping when present (profiles from before it existed have none)."""
    speed = data.get("speed")
    if speed is not None and not isinstance(speed, dict):
        raise BadInput(f"{where}: speed must be a mapping (oneke-plan's prediction); re-create the profile")
    return speed


def _read_replica(data: dict[str, Any], where: str) -> Replica:
    """devices, device_map and estimate of one copy (a format-1 profile's top level, or a replicas[] entry)."""
    devices = []
    for i, entry in enumerate(_need(data, "devices", list, where)):
        if not isinstance(entry, dict):
            raise BadInput(f"{where}: devices[{i}] must be a mapping with id and total_bytes")
        devices.append(
            ProfileDevice(
                id=_device_id(entry.get("id"), f"{where}: devices[{i}].id"),
                name=str(entry.get("name", "")),
                total_bytes=_bytes_or_none(entry.get("total_bytes"), f"{where}: devices[{i}].total_bytes"),
                usable_bytes=_bytes_or_none(entry.get("usable_bytes"), f"{where}: devices[{i}].usable_bytes"),
                compute_capability=entry.get("compute_capability"),
                reserve_bytes=_bytes_or_none(entry.get("reserve_bytes"), f"{where}: devices[{i}].reserve_bytes"),
            )
        )
    device_map = _need(data, "device_map", dict, where)
    if not device_map:
        raise BadInput(f"{where}: device_map is empty; re-create the profile with oneke-plan")
    known = {d.id for d in devices}
    for module, device in device_map.items():
        if not isinstance(module, str):
            raise BadInput(f"{where}: device_map key {module!r} is not a module name (a string); re-create the profile")
        device = _device_id(device, f"{where}: device_map[{module!r}]")
        if device not in known:
            raise BadInput(f"{where}: device_map[{module!r}] names device {device!r}, which is not in devices")
    estimate = data.get("estimate") or {}
    if not isinstance(estimate, dict):
        raise BadInput(f"{where}: estimate must be a mapping of device id to byte counts")
    for device, counts in estimate.items():
        if not isinstance(counts, dict):
            raise BadInput(f"{where}: estimate.{device} must map {', '.join(ESTIMATE_KEYS)} to byte counts")
        for key, value in counts.items():
            _bytes_or_none(value, f"{where}: estimate.{device}.{key}")
    return Replica(devices, device_map, estimate, _speed(data, where))
