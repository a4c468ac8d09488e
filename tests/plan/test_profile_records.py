"""The typed profile: every profile oneke-plan writes reads back into the same records and is written again byte for
byte, and a bad value is one line naming the file and the key path (the messages below are written out by hand)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from oneke_plan import api
from oneke_plan.core.errors import BadInput
from oneke_plan.plan.fit import DeviceEstimate
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.profile import read_profile

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
FOUR_BIT = PROFILES / "oneke-12gib-4bit.yaml"
REMEDY = "; re-create the profile with oneke-plan"


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_checked_in_profiles_are_rewritten_byte_for_byte(path: Path) -> None:
    assert read_profile(path).to_yaml() == path.read_text(encoding="utf-8")


PLANS: dict[str, dict[str, Any]] = {
    "4-bit fp4 without double quant": {"gpus": ["12GiB"], "quantize": "4bit", "quant_type": "fp4",
                                       "double_quant": False, "batch_size": 2},
    "8-bit": {"gpus": ["16GiB"], "quantize": "8bit", "batch_size": 1},
    "offloaded to cpu and disk": {"gpus": ["8GiB"], "cpu_memory": "4GiB", "offload_dir": "offload"},
    "two replicas on two nodes": {"gpus": ["24GiB"] * 4, "replicas": 2, "nodes": 2},
    "eager attention, another template": {"gpus": ["24GiB", "12GiB"], "eager_attention": True, "template": "qwen"},
}  # fmt: skip


@pytest.mark.parametrize("name", PLANS)
def test_written_profiles_are_rewritten_byte_for_byte(name: str, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    api.plan("oneke", output=path, **PLANS[name])
    profile = read_profile(path)
    assert profile.to_yaml() == path.read_text(encoding="utf-8")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert profile.workload == Workload(**data["workload"])
    assert profile.quantization == Quantization(**data["quantization"])
    for replica in data.get("replicas", [data]):
        for device, est in replica["estimate"].items():
            terms = {k: v for k, v in est.items() if k != "total_bytes"}
            assert DeviceEstimate(**terms).total_bytes == est["total_bytes"], device


def test_a_profile_from_before_the_newer_keys_reads_with_their_defaults(tmp_path: Path) -> None:
    """Profiles written before attn_implementation, template, speed, reserve_bytes and the 4-bit settings existed."""
    data = yaml.safe_load(FOUR_BIT.read_text(encoding="utf-8"))
    for key in ("attn_implementation", "template", "speed"):
        del data[key]
    del data["quantization"]["quant_type"], data["quantization"]["double_quant"], data["devices"][0]["reserve_bytes"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    profile = read_profile(path)
    assert (profile.attn_implementation, profile.template, profile.speed) == ("sdpa", "llama2_zh", None)
    assert profile.quantization == Quantization("4bit", "nf4", True)
    assert profile.devices[0].reserve_bytes is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the value at a dotted key path (an int part indexes a list or names a device id)."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            data = data[part]
        data[last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[part]
        del data[last]

    return edit


CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "batch size 0": (_set("workload.batch_size", 0), "workload.batch_size must be a positive integer, not 0"),
    "batch size true": (_set("workload.batch_size", True), "workload.batch_size must be a positive integer, not True"),
    "workload a list": (_set("workload", [1]), "workload must be a mapping, not [1]"),
    "no workload key": (_drop("workload.max_new_tokens"), "missing 'workload.max_new_tokens'"),
    "no model": (_drop("model"), "missing 'model'"),
    "quant type": (_set("quantization.quant_type", "int4"), "quantization.quant_type 'int4' is not one of nf4, fp4"),
    "double quant": (_set("quantization.double_quant", "yes"),
                     "quantization.double_quant must be true or false, not 'yes'"),
    "mode": (_set("quantization.mode", "2bit"), "quantization.mode '2bit' is not one of none, 8bit, 4bit"),
    "dtype": (_set("dtype", "int8"), "dtype 'int8' is not one of float32, bfloat16, float16"),
    "device id": (_set("devices.0.id", -1), "devices[0].id -1 is not a GPU index, 'cpu' or 'disk'"),
    "device bytes": (_set("devices.0.total_bytes", "12GiB"),
                     "devices[0].total_bytes must be a byte count (a non-negative integer), not '12GiB'"),
    "estimate term": (_set("estimate.0.kv_cache_bytes", -1),
                      "estimate.0.kv_cache_bytes must be a byte count (a non-negative integer), not -1"),
    "estimate total": (_set("estimate.0.total_bytes", 1),
                       "estimate.0.total_bytes must be the sum of its terms, 10700686944, not 1"),
    "estimate entry": (_set("estimate.cpu", 5), "estimate.cpu must be a mapping, not 5"),
    "device map names a device": (_set("device_map", {"": 1}),
                                  "device_map[''] names device 1, which is not in devices"),
    "device map key": (_set("device_map", {0: 0}), "device_map key 0 is not a module name (a string)"),
    "device map empty": (_set("device_map", {}), "device_map is empty"),
    "notes": (_set("notes", [1]), "notes[0] must be a string, not 1"),
    "speed": (_set("speed", [1]), "speed must be a mapping, not [1]"),
    "adapter on_load": (_set("adapter", {"path": "a", "fingerprint": "sha256:0", "on_load": "merged"}),
                        "adapter.on_load is 'merged', but a 4bit profile's adapter is unmerged"),
    "adapter path": (_set("adapter", {"path": 3, "fingerprint": "sha256:0", "on_load": "unmerged"}),
                     "adapter.path must be a string, not 3"),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_a_bad_value_is_one_line_naming_the_file_and_the_key_path(name: str, tmp_path: Path) -> None:
    edit, message = CASES[name]
    data = yaml.safe_load(FOUR_BIT.read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "P.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(BadInput) as caught:
        read_profile(path)
    assert str(caught.value) == f"{path}: {message}{REMEDY}"


def test_disk_needs_offload_dir_and_a_replica_is_named_in_the_path(tmp_path: Path) -> None:
    data = yaml.safe_load(FOUR_BIT.read_text(encoding="utf-8"))
    data["devices"].append({"id": "disk", "name": "disk", "total_bytes": None})
    data["estimate"]["disk"] = DeviceEstimate().to_data()  # every device has an estimate
    data["device_map"] = {"": 0, "lm_head": "disk"}
    path = tmp_path / "P.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(BadInput, match=r"P.yaml: device_map offloads to disk but offload_dir is not set; re-create"):
        read_profile(path)
    two = tmp_path / "two.yaml"
    api.plan("oneke", ["24GiB"] * 4, replicas=2, output=two)
    data = yaml.safe_load(two.read_text(encoding="utf-8"))
    data["replicas"][1]["workspace"] = "ignored: a key no field names"
    estimate = data["replicas"][1]["estimate"]
    gpu = next(iter(estimate))
    estimate[gpu]["weights_bytes"] = None
    two.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(BadInput) as caught:
        read_profile(two)
    where = f"replicas[1].estimate.{gpu}.weights_bytes"
    assert str(caught.value) == f"{two}: {where} must be a byte count (a non-negative integer), not None{REMEDY}"
