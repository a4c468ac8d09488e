"""oneke-plan's other outputs: --format json (against the YAML profile of the same run and hand arithmetic), the
reserve per device (--reserve INDEX=SIZE, an inventory file's reserve), the --plot picture (parsed as XML, bar
heights against the profile's bytes) and the summary's compact bar."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from oneke_plan.cli.plan import main
from oneke_plan.core.errors import EXIT_BAD_INPUT
from oneke_plan.core.sizes import GiB, MiB
from oneke_plan.plan.fit import DeviceEstimate
from oneke_plan.plan.profile import ProfileDevice, read_profile
from oneke_plan.plan.report import BAR_LEGEND, DeviceRow, bar

SVG = "{http://www.w3.org/2000/svg}"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith("oneke-plan: error: "), err
    assert needle in lines[0], err


# -- JSON ------------------------------------------------------------------------------------------------------
def test_json_is_the_yaml_profile_and_the_summarys_figures(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "machine.yaml"
    code, stdout, err = run(capsys, "oneke", "--gpu", "RTX 3090", "--gpu", "12GiB", "--cpu-memory", "0",
                            "--format", "json", "-o", out)  # fmt: skip
    assert code == 0, err
    document = json.loads(stdout)  # one JSON document, nothing else on stdout
    profile = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert document["oneke_plan_json"] == 1
    assert document["profile"] == json.loads(json.dumps(profile))  # the same content (JSON keys are strings)
    summary = document["summary"]
    assert summary["model"] == "oneke" and summary["dtype"] == "bfloat16" and summary["quantization"] == "none"
    assert summary["workload"] == {"max_input_tokens": 512, "max_new_tokens": 512, "batch_size": 4}
    devices = summary["devices"]
    assert [d["id"] for d in devices] == [0, 1]
    for device in devices:
        estimate = profile["estimate"][device["id"]]
        terms = ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes")
        assert device["used_bytes"] == sum(device[t] for t in terms) == estimate["total_bytes"]
        assert all(device[t] == estimate[t] for t in terms)
        assert device["free_bytes"] == device["usable_bytes"] - device["used_bytes"]
    rtx3090 = 24_265 * 1_048_576  # the catalog's RTX 3090: nvidia-smi's total (catalog.py), 25,443,696,640 bytes
    assert devices[0]["usable_bytes"] == rtx3090 and devices[1]["usable_bytes"] == 12 * GiB
    # the 40 layers, split where the YAML device_map splits them
    on_0 = [
        int(k.rsplit(".", 1)[1]) for k, v in profile["device_map"].items() if k.startswith("model.layers.") and v == 0
    ]
    assert devices[0]["layers"] == [0, max(on_0)] and devices[1]["layers"] == [max(on_0) + 1, 39]
    # GPU 1 is a size only: no bandwidth, so no decode speed; the reason is in the document
    assert summary["speed"]["decode_tokens_per_second"] is None
    assert any("GPU 1" in line for line in summary["speed"]["unknown"])
    assert "profile written to" in err and "Traceback" not in err


def test_json_without_o_writes_no_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(capsys, "oneke", "--gpu", "RTX 4090", "--gpu", "RTX 4090", "--cpu-memory", "0",
                            "--format", "json")  # fmt: skip
    assert code == 0, err
    document = json.loads(stdout)
    speed = document["summary"]["speed"]
    assert speed["decode_tokens_per_second"] == document["profile"]["speed"]["decode_tokens_per_second"] > 0
    assert speed["records_per_hour"] > 0 and speed["unknown"] == []


def test_json_errors_stay_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(capsys, "oneke", "--gpu", "24GiB", "--reserve", "24GiBB", "--format", "json")
    assert stdout == ""
    one_line_error(code, err, "--reserve")


# -- reserve per device --------------------------------------------------------------------------------------------
def test_reserve_for_every_gpu_and_for_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0",
                         "--reserve", "512MiB", "--reserve", "1=2GiB")  # fmt: skip
    assert code == 0, err
    data = yaml.safe_load(out)
    assert [d["reserve_bytes"] for d in data["devices"]] == [512 * MiB, 2 * GiB]
    assert data["estimate"][0]["reserve_bytes"] == 512 * MiB and data["estimate"][1]["reserve_bytes"] == 2 * GiB
    for device in (0, 1):
        est = data["estimate"][device]
        assert est["total_bytes"] == sum(est[t] for t in ("weights_bytes", "kv_cache_bytes", "workspace_bytes",
                                                          "reserve_bytes"))  # fmt: skip
        assert est["total_bytes"] <= data["devices"][device]["total_bytes"]


def test_reserve_moves_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    """A larger reserve on GPU 0 leaves room for fewer layers there (OneKE's layers weigh 605 MiB in bf16)."""
    splits = []
    for reserve in ("0=1GiB", "0=3GiB"):
        code, out, err = run(capsys, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0",
                             "--reserve", reserve)  # fmt: skip
        assert code == 0, err
        device_map = yaml.safe_load(out)["device_map"]
        splits.append(sum(1 for k, v in device_map.items() if k.startswith("model.layers.") and v == 0))
    assert splits[1] < splits[0]


def test_inventory_file_reserve_and_rates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A card's reserve, bandwidth and TFLOPS in the inventory file; the command line's per-device value wins."""
    path = tmp_path / "inventory.yaml"
    path.write_text("gpus:\n  - {memory: 24GiB, reserve: 768MiB, bandwidth: 900, tflops: 70}\n"
                    "  - {name: RTX 3060, reserve: 1.5GiB}\ncpu_memory: 0\n", encoding="utf-8")  # fmt: skip
    code, out, err = run(capsys, "oneke", "--inventory", path, "--reserve", "1=2GiB", "--tflops", "1=20")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert [d["reserve_bytes"] for d in data["devices"]] == [768 * MiB, 2 * GiB]
    speed = data["speed"]["devices"]
    assert speed[0]["bandwidth_bytes_per_second"] == 900 * 10**9 and "gpus[0].bandwidth" in speed[0]["bandwidth_source"]
    assert speed[1]["bandwidth_bytes_per_second"] == 360 * 10**9 and "catalog" in speed[1]["bandwidth_source"]
    assert speed[1]["flops_per_second"] == 20 * 10**12


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--reserve", "5=1GiB"], "there is no GPU 5"),
        (["--reserve", "x=1GiB"], "is not a GPU index or cpu"),
        (["--reserve", "1=1GiB", "--reserve", "1=2GiB"], "given twice"),
        (["--reserve", "1GiB", "--reserve", "2GiB"], "given twice"),
        (["--reserve", "0=-1GiB"], "--reserve 0=-1GiB"),
        (["--bandwidth", "0=fast"], "not a positive number of GB/s"),
        (["--tflops", "0"], "not a positive number of TFLOPS"),
        (["--bandwidth", "nan"], "not a positive number of GB/s"),
    ],
)
def test_bad_device_values(capsys: pytest.CaptureFixture[str], flags: list[str], needle: str) -> None:
    code, _, err = run(capsys, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", *flags)
    one_line_error(code, err, needle)


def test_profiles_without_the_new_keys_still_read(tmp_path: Path) -> None:
    """A profile written before devices[].reserve_bytes and speed existed (profiles/'s example, keys removed)."""
    text = (Path(__file__).parents[2] / "profiles" / "oneke-12gib-4bit.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data.pop("speed", None)
    for device in data["devices"]:
        device.pop("reserve_bytes", None)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    profile = read_profile(old)
    assert profile.speed is None and profile.devices[0].reserve_bytes is None


# -- the picture ---------------------------------------------------------------------------------------------------
def test_plot_bars_are_in_proportion_to_the_profile(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out, picture = tmp_path / "machine.yaml", tmp_path / "machine.svg"
    code, _, err = run(capsys, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0", "-o", out,
                       "--plot", picture)  # fmt: skip
    assert code == 0, err
    profile = yaml.safe_load(out.read_text(encoding="utf-8"))
    root = ET.parse(picture).getroot()  # well-formed XML
    assert root.tag == f"{SVG}svg"
    rects = root.iter(f"{SVG}rect")
    terms = {(r.get("data-device"), r.get("data-term")): r for r in rects if r.get("class") == "term"}
    boxes = {r.get("data-device"): r for r in root.iter(f"{SVG}rect") if r.get("class") == "capacity"}
    assert set(boxes) == {"0", "1"}
    # one scale for every device: height / bytes is the same for every bar
    per_byte = float(boxes["0"].get("height")) / (24 * GiB)  # type: ignore[arg-type]
    assert float(boxes["1"].get("height")) == pytest.approx(12 * GiB * per_byte, abs=1e-3)  # type: ignore[arg-type]
    for device in (0, 1):
        bottom = None
        for term in ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes"):
            rect = terms[(str(device), term)]
            assert int(rect.get("data-bytes")) == profile["estimate"][device][term]  # type: ignore[arg-type]
            height = float(rect.get("height"))  # type: ignore[arg-type]
            assert height == pytest.approx(profile["estimate"][device][term] * per_byte, abs=1e-3)
            y = float(rect.get("y"))  # type: ignore[arg-type]
            if bottom is not None:
                assert y + height == pytest.approx(bottom, abs=2e-3)  # stacked: each starts where the last ended
            bottom = y
    assert f"picture drawn to {picture}" in err


def test_plot_replaces_only_its_own_picture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    picture = tmp_path / "machine.svg"
    picture.write_text("<svg>someone else's</svg>\n", encoding="utf-8")
    code, _, err = run(capsys, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--plot", picture)
    one_line_error(code, err, "not a picture written by oneke-plan")
    assert picture.read_text(encoding="utf-8") == "<svg>someone else's</svg>\n"
    picture.unlink()
    for _ in range(2):  # drawn, then redrawn over its own picture
        code, _, err = run(capsys, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--plot", picture)
        assert code == 0, err
    code, _, err = run(capsys, "oneke", "--gpu", "24GiB", "-o", picture, "--plot", picture)
    one_line_error(code, err, "is also -o's file")


# -- the terminal bar ----------------------------------------------------------------------------------------------
def test_bar_by_hand() -> None:
    """16 characters for 16 GiB: 8 of weights, 4 of KV cache, 1/4 GiB of workspace (rounds away), 2 of reserve;
    a small term does not take a larger one's character (largest remainder)."""
    device = ProfileDevice(0, "GPU 0", 16 * GiB, 16 * GiB)
    estimate = DeviceEstimate(weights_bytes=8 * GiB, kv_cache_bytes=4 * GiB, workspace_bytes=GiB // 4,
                              reserve_bytes=2 * GiB)  # fmt: skip
    assert estimate.total_bytes == 14 * GiB + GiB // 4
    assert bar(DeviceRow(0, device, estimate, (0, 3))) == "[WWWWWWWWKKKKrr..]"
    full = replace(estimate, weights_bytes=11 * GiB)  # 17.25 GiB on 16: scaled to the whole, never wider than 16
    assert bar(DeviceRow(0, device, full, None)) == "[WWWWWWWWWWKKKKrr]"
    # 24 GiB: 4.66 GiB of weights (3.11 characters), KV 0.55 (0.37), workspace 0.24 (0.16), reserve 1 (0.67):
    # 4.3 characters round to 4, and the fourth goes to the reserve, not to the workspace
    card = ProfileDevice(1, "GPU 1", 24 * GiB, 24 * GiB)
    small = DeviceEstimate(weights_bytes=5_007_104_512, kv_cache_bytes=587_202_560, workspace_bytes=256_843_264,
                           reserve_bytes=GiB)  # fmt: skip
    assert small.total_bytes == 6_924_892_160
    assert bar(DeviceRow(0, card, small, (33, 39))) == "[WWWr............]"
    unbounded = ProfileDevice("disk", "disk", None, None)
    assert bar(DeviceRow(0, unbounded, estimate, None)) == "-"


def test_summary_shows_bars_and_speed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "oneke", "--gpu", "RTX 3090", "--gpu", "RTX 3090", "--cpu-memory", "0", "-o",
                       tmp_path / "p.yaml")  # fmt: skip
    assert code == 0, err
    assert BAR_LEGEND in err
    rows = [line for line in err.splitlines() if line.startswith("GPU ")]
    assert len(rows) == 2 and all(row.rstrip().endswith("]") for row in rows)
    assert "tokens/s" in err and "records/hour" in err
