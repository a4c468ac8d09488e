"""The placement profile: a YAML file written by `oneke-plan` and applied by `oneke-run`.

Public contract (docs/profile-format.md): `format_version`, `device_map`, `devices` (each with `id` and
`total_bytes`), `estimate.<device id>` (weights_bytes, kv_cache_bytes, workspace_bytes, reserve_bytes, total_bytes),
`quantization.mode` (none, 8bit, 4bit), `workload` (max_input_tokens, max_new_tokens, batch_size), `dtype` and
`attn_implementation` (what oneke-run loads the model with), `template` (the chat template prompts are wrapped
in), and `adapter` when planned with a LoRA adapter. A profile of several replicas (format 2) has, instead of the
first three, a `replicas` list, each with its own `devices`, `device_map` and `estimate`, and `nodes`.
Read with yaml.safe_load only: a profile is data and can never make code run.

Every part is a typed record (the planner's own Workload, Quantization and DeviceEstimate, and the records below)
whose fields declare their type, default and allowed values once, in the field's metadata; one generic reader
(core.records) checks a YAML mapping against them and says what is wrong in one line naming the file and the key
path. Dataclass metadata rather than pydantic or msgspec: no new dependency for either supported version set, a
planning layer that stays light to import, and our one-line messages without translating a library's own. What
spans several fields (a device_map naming a device the profile lists, an adapter's on_load against the
quantization, disk offload needing offload_dir, each total being the sum of its terms) is checked after reading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from oneke_plan.core.errors import BadInput
from oneke_plan.core.records import (
    Invalid,
    anything,
    byte_count,
    checks,
    count,
    list_of,
    mapping,
    mapping_of,
    null_as,
    one_of,
    optional,
    positive_int,
    read_field,
    read_fields,
    record,
    required_paths,
    shown,
    string,
    to_data,
)
from oneke_plan.formats.templates import ONEKE_TEMPLATE, TEMPLATES
from oneke_plan.io import files
from oneke_plan.io.yamlfile import read_yaml
from oneke_plan.plan.fit import DeviceEstimate, DeviceId
from oneke_plan.plan.memory import DTYPE_BYTES, Quantization, Workload, merges_on_load

FORMAT_VERSION = 1  # one model copy
REPLICAS_FORMAT_VERSION = 2  # several copies, each on its own devices, repeated on `nodes` identical nodes
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"  # what profiles written before the key existed were planned for
ON_LOAD = ("merged", "unmerged")  # what oneke-run does with a LoRA adapter: merges_on_load
REMEDY = "re-create the profile with oneke-plan"
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")



def device_id(value: Any, path: str) -> DeviceId:
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 0 or value in ("cpu", "disk")):
        raise Invalid(path, f"{shown(value)} is not a GPU index, 'cpu' or 'disk'")
    return value  # type: ignore[no-any-return]


def fingerprint(value: Any, path: str) -> str:
    """A config fingerprint as model_source.config_fingerprint writes it."""
    if not (isinstance(value, str) and _FINGERPRINT.fullmatch(value)):
        raise Invalid(path, f"must be 'sha256:' and 64 hex digits, as oneke-plan writes it, not {shown(value)}")
    return value


def module_name(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise Invalid(path, "is not a module name (a string)")
    return value


def _total_is_sum(estimate: DeviceEstimate, data: Mapping[str, Any], path: str) -> None:
    """A written total that is not the sum of the terms is a hand edit the consumers would read two ways."""
    if "total_bytes" in data and data["total_bytes"] != estimate.total_bytes:
        written = shown(data["total_bytes"])
        raise Invalid(f"{path}.total_bytes", f"must be the sum of its terms, {estimate.total_bytes}, not {written}")


@dataclass
class ProfileDevice:
    id: DeviceId = field(metadata=checks(device_id))  # GPU index, "cpu" or "disk"
    name: str = field(default="", metadata=checks(string))
    # required (the contract's); null only where no size is known (disk), a GPU's is checked in _check_devices
    total_bytes: int | None = field(default=None, metadata=checks(optional(byte_count), required=True))
    # what the plan was allowed to use (free memory when detected)
    usable_bytes: int | None = field(default=None, metadata=checks(optional(byte_count)))
    compute_capability: str | None = field(default=None, metadata=checks(optional(string)))
    # the reserve this device was planned with (None: a profile from before)
    reserve_bytes: int | None = field(default=None, metadata=checks(optional(byte_count)))


@dataclass
class ModelInfo:
    """What was planned: oneke-run refuses a model whose config has another fingerprint (load.machine), so the
    fingerprint is required; the rest is informational (the source is what oneke-run loads without --model)."""

    source: str | None = field(default=None, metadata=checks(optional(string)))  # oneke, a folder, a repo id, GGUF
    architecture: str | None = field(default=None, metadata=checks(optional(string)))
    model_type: str | None = field(default=None, metadata=checks(optional(string)))
    parameter_count: int | None = field(default=None, metadata=checks(optional(count)))  # tied weights once
    config_fingerprint: str | None = field(default=None, metadata=checks(fingerprint, required=True))  # sha256:...


@dataclass(kw_only=True)
class AdapterRecord:
    """A LoRA adapter as the profile names it (docs/profile-format.md, `adapter`); the rest is informational."""

    path: str = field(metadata=checks(string))
    fingerprint: str = field(metadata=checks(string))  # sha256: of its config and weights files
    r: int | None = field(default=None, metadata=checks(optional(positive_int)))
    lora_alpha: Any = field(default=None, metadata=checks(anything))
    target_modules: Any = field(default=None, metadata=checks(anything))  # a list, or peft's string form
    base_model_name_or_path: Any = field(default=None, metadata=checks(anything))
    modules: int | None = field(default=None, metadata=checks(optional(count)))  # layers it wraps
    file_tensor_bytes: int | None = field(default=None, metadata=checks(optional(byte_count)))
    on_load: str = field(metadata=checks(one_of(ON_LOAD)))


ESTIMATES = null_as(
    dict, mapping_of(device_id, record(DeviceEstimate, also=_total_is_sum, keys=("total_bytes",)), name="id")
)
SPEED = optional(mapping)  # the speed prediction (speed.SpeedPrediction.to_dict), informational


@dataclass
class Replica:
    """One copy of the model: where its modules go and what each of its devices holds."""

    devices: list[ProfileDevice] = field(metadata=checks(list_of(record(ProfileDevice))))
    device_map: dict[str, DeviceId] = field(
        metadata=checks(mapping_of(module_name, device_id, nonempty=True, bracket=True))
    )
    estimate: dict[DeviceId, DeviceEstimate] = field(default_factory=dict, metadata=checks(ESTIMATES, required=True))
    speed: dict[str, Any] | None = field(default=None, metadata=checks(SPEED))  # this copy's prediction


@dataclass
class Profile:
    model: ModelInfo = field(metadata=checks(record(ModelInfo)))
    dtype: str = field(metadata=checks(one_of(DTYPE_BYTES)))
    quantization: Quantization = field(metadata=checks(record(Quantization)))
    workload: Workload = field(metadata=checks(record(Workload)))
    # devices, device_map and estimate: a format-1 profile's own, or its first replica's (read as a Replica)
    devices: list[ProfileDevice]
    device_map: dict[str, DeviceId]
    estimate: dict[DeviceId, DeviceEstimate]
    strategy: str = field(default="fill", metadata=checks(string))
    offload_dir: str | None = field(default=None, metadata=checks(optional(string)))
    attn_implementation: str = field(
        default=DEFAULT_ATTN_IMPLEMENTATION, metadata=checks(one_of(ATTN_IMPLEMENTATIONS))
    )
    # what profiles written before the key existed were run with
    template: str = field(default=ONEKE_TEMPLATE, metadata=checks(one_of(TEMPLATES)))
    format_version: int = FORMAT_VERSION  # read first: it decides the shape
    created_by: str = field(default="", metadata=checks(string))
    notes: list[str] = field(default_factory=list, metadata=checks(null_as(list, list_of(string))))
    # format 2: every copy (devices & co. are the first's), on this many identical nodes
    replicas: list[Replica] = field(default_factory=list, metadata=checks(list_of(record(Replica), nonempty=True)))
    nodes: int = field(default=1, metadata=checks(positive_int))
    adapter: AdapterRecord | None = field(default=None, metadata=checks(optional(record(AdapterRecord))))
    # the speed prediction (format 2: every copy together); None: from before
    speed: dict[str, Any] | None = field(default=None, metadata=checks(SPEED))

    def to_data(self) -> dict[str, Any]:
        """The profile's content as its YAML file holds it: the same keys, in the same order."""
        data = {f.name: to_data(getattr(self, f.name)) for f in fields(self)}
        keys = ["format_version", "created_by", "model", "dtype", "attn_implementation", "template", "quantization"]
        keys += ["workload"]
        keys += ["adapter"] if self.adapter is not None else []  # absent without one: older readers see no change
        keys += ["strategy", "offload_dir"]
        keys += ["nodes", "replicas"] if self.replicas else ["devices", "device_map", "estimate"]
        return {key: data[key] for key in [*keys, "speed", "notes"]}

    def to_yaml(self) -> str:
        ordered = self.to_data()
        return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120)

    def estimate_on(self, device: DeviceId) -> DeviceEstimate:
        """What the plan charges `device`; all zero for a device it does not (a hand-edited profile may omit one)."""
        return self.estimate.get(device, DeviceEstimate())

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


def required_keys(version: int = FORMAT_VERSION) -> list[str]:
    """Every key path a profile of format `version` must hold (`devices[].total_bytes`, `estimate.<id>.reserve_bytes`),
    as the records declare them (core.records.required_paths): read_profile refuses a profile without one, in one
    line naming it, and docs/profile-format.md's list is checked against this one (tests)."""
    if version == REPLICAS_FORMAT_VERSION:
        copies = ["nodes", "replicas", "replicas[]", *required_paths(Replica, "replicas[]")]
    else:
        copies = required_paths(Replica)
    return ["format_version", *required_paths(Profile), *copies]


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


def read_profile(path: Path) -> Profile:
    """Load and check a profile file; every problem is one BadInput naming the file and the key path."""
    where = str(path)
    data = read_yaml(path, "profile", f"create one with oneke-plan MODEL -o {where}")
    if data is None:
        raise BadInput(f"{where}: the profile is empty; create one with oneke-plan MODEL -o {where}")
    if not isinstance(data, dict):
        raise BadInput(f"{where}: a profile is a YAML mapping, not {type(data).__name__}")
    version = _format_version(data, where)
    try:
        profile = _read(data, version)
    except Invalid as problem:
        raise BadInput(f"{where}: {problem}; {REMEDY}") from None
    return profile


def _format_version(data: dict[str, Any], where: str) -> int:
    """Read before the rest: it says whether devices & co. are at the top or in each of `replicas`."""
    version = data.get("format_version")
    if "format_version" not in data:
        raise BadInput(f"{where}: missing 'format_version'; {REMEDY}")
    if isinstance(version, bool) or version not in (FORMAT_VERSION, REPLICAS_FORMAT_VERSION):
        raise BadInput(
            f"{where}: format_version {shown(version)} is not supported (this tool reads {FORMAT_VERSION} and "
            f"{REPLICAS_FORMAT_VERSION}); re-create the profile with this version of oneke-plan"
        )
    return int(version)


def _read(data: dict[str, Any], version: int) -> Profile:
    """The profile's records from the parsed file (Invalid at the first problem), then what spans them."""
    if version == REPLICAS_FORMAT_VERSION:
        for key in ("nodes", "replicas"):
            if key not in data:
                raise Invalid("", f"missing '{key}'")
        replicas = read_field(Profile, "replicas", data)
        copies = {"replicas": replicas, "nodes": read_field(Profile, "nodes", data)}
        paths = [f"replicas[{i}]." for i in range(len(replicas))]
    else:
        replicas, paths = [Replica(**read_fields(Replica, data))], [""]
        copies = {"replicas": [], "nodes": 1}
    first = replicas[0]
    given = {"devices": first.devices, "device_map": first.device_map, "estimate": first.estimate}
    profile = Profile(**read_fields(Profile, data, given={**given, **copies, "format_version": version}))
    for replica, path in zip(replicas, paths, strict=True):
        _check_devices(replica, path)
        _check_device_map(replica, path)
    _check_adapter(profile)
    if any("disk" in r.device_map.values() for r in replicas) and not profile.offload_dir:
        raise Invalid("", "device_map offloads to disk but offload_dir is not set")
    return profile


def _check_devices(replica: Replica, path: str) -> None:
    """What the machine check and the engines read of each device is there: a GPU's memory (vLLM's share of it),
    and the plan's use of every device (estimate), which the machine check compares with what is free."""
    for i, device in enumerate(replica.devices):
        if isinstance(device.id, int) and not device.total_bytes:
            raise Invalid(
                f"{path}devices[{i}].total_bytes", f"is {shown(device.total_bytes)}, not GPU {device.id}'s memory"
            )
        if device.id not in replica.estimate:
            raise Invalid(f"{path}estimate", f"has no entry for device {device.id!r}, which devices lists")


def _check_device_map(replica: Replica, path: str) -> None:
    known = {d.id for d in replica.devices}
    for module, device in replica.device_map.items():
        if device not in known:
            raise Invalid(f"{path}device_map[{module!r}]", f"names device {device!r}, which is not in devices")


def _check_adapter(profile: Profile) -> None:
    """oneke-plan plans a LoRA adapter merged into 16-bit weights and unmerged over 8/4-bit ones."""
    adapter, mode = profile.adapter, profile.quantization.mode
    merged = "merged" if merges_on_load(mode) else "unmerged"
    if adapter is not None and adapter.on_load != merged:
        raise Invalid("adapter.on_load", f"is {adapter.on_load!r}, but a {mode} profile's adapter is {merged}")
