"""Profiles missing contract keys are refused: every key docs/profile-format.md lists as required is required by the
records (oneke_plan.plan.profile.required_keys, from the fields' declarations), and deleting any one of them from a
real planned profile, of either format, makes oneke-run exit 2 with one line naming the file and the key, before
anything else is read. A profile without model.config_fingerprint, or a GPU without total_bytes, used to run with
exit 0, skipping the model check and vLLM's memory share those keys feed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from oneke_plan import api
from oneke_plan.cli.run import main as run_main
from oneke_plan.plan.profile import REPLICAS_FORMAT_VERSION, read_profile, required_keys

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

DOC = Path(__file__).resolve().parents[2] / "docs" / "profile-format.md"
PLANS = {
    1: {"gpus": ["24GiB", "12GiB"]},  # split over two GPUs: two devices, two estimate entries
    2: {"gpus": ["24GiB"] * 4, "replicas": 2},  # two copies of two GPUs each
}


def documented_required_keys() -> list[str]:
    """The list between the `<!-- required-keys -->` markers of docs/profile-format.md."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- required-keys -->", 1)[1].split("<!-- /required-keys -->", 1)[0]
    return re.findall(r"`([^`]+)`", block)


def contract_table_keys() -> list[str]:
    """The keys of the Public contract table (its first column; a cell may name several, comma-separated)."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## Public contract", 1)[1].split("\n\n| key |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [key for row in rows for key in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_the_documented_required_keys_are_the_records_own() -> None:
    assert documented_required_keys() == required_keys(1)
    assert set(contract_table_keys()) <= set(required_keys(1)), set(contract_table_keys()) - set(required_keys(1))
    # format 2: the same, with a copy's keys in each replicas[] entry
    copy_keys = ("devices", "device_map", "estimate")
    expected = [k for k in required_keys(1) if not k.startswith(copy_keys)]
    expected += ["nodes", "replicas", "replicas[]"]
    expected += [f"replicas[].{k}" for k in required_keys(1) if k.startswith(copy_keys)]
    assert required_keys(REPLICAS_FORMAT_VERSION) == expected


def concrete(template: str, data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Every place `template` (`replicas[].estimate.<id>.weights_bytes`) names in `data`: (the keys and indexes
    that lead there, the path as read_profile's messages write it: `replicas[1].estimate.2.weights_bytes`)."""
    tokens = [t for t in re.split(r"(\[\])|\.", template) if t]
    found: list[tuple[tuple[Any, ...], str]] = []

    def walk(node: Any, rest: list[str], parts: tuple[Any, ...], shown: str) -> None:
        if not rest:
            found.append((parts, shown))
            return
        token, rest = rest[0], rest[1:]
        if token == "[]":
            for i, item in enumerate(node):
                walk(item, rest, (*parts, i), f"{shown}[{i}]")
        elif token == "<id>":
            for key, item in node.items():
                walk(item, rest, (*parts, key), f"{shown}.{key}")
        else:
            walk(node[token], rest, (*parts, token), f"{shown}.{token}" if shown else token)

    walk(data, tokens, (), "")
    return found


@pytest.fixture(scope="module", params=sorted(PLANS))
def planned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    path = tmp_path_factory.mktemp("planned") / "p.yaml"
    api.plan("oneke", output=path, **PLANS[request.param])
    read_profile(path)  # the control: as planned, it reads
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["format_version"] == request.param
    return request.param, data


def test_deleting_any_required_key_is_one_line_naming_it(
    planned: tuple[int, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, data = planned
    argv = ["--input", str(tmp_path / "in.json"), "--output", str(tmp_path / "out.json"), "--no-progress"]
    tried = 0
    for template in required_keys(version):
        if template == "replicas[]":
            continue  # one copy fewer is a smaller profile, not a missing key
        for parts, shown in concrete(template, data):
            edited = yaml.safe_load(yaml.safe_dump(data))
            parent = edited
            for part in parts[:-1]:
                parent = parent[part]
            del parent[parts[-1]]
            path = tmp_path / "P.yaml"
            path.write_text(yaml.safe_dump(edited, sort_keys=False), encoding="utf-8")
            code = run_main(["--profile", str(path), *argv])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1, (shown, code, err)
            # a key is named by its whole path; a deleted entry (devices[1], estimate.1) by its list or mapping
            entry = template.endswith(("[]", "<id>"))
            needle = re.findall(r"[a-z_]+", template.replace("<id>", ""))[-1] if entry else shown
            assert str(path) in err[0] and needle in err[0], (shown, err)
            assert "re-create the profile with oneke-plan" in err[0], (shown, err)
            tried += 1
    assert tried > 30


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["devices"][1].update(total_bytes=None), "devices[1].total_bytes is None, not GPU 1's memory"),
        (lambda d: d["devices"][0].update(total_bytes=0), "devices[0].total_bytes is 0, not GPU 0's memory"),
        (lambda d: d["model"].update(config_fingerprint=None), "model.config_fingerprint must be 'sha256:'"),
        (lambda d: d["model"].update(config_fingerprint=""), "model.config_fingerprint must be 'sha256:'"),
        (lambda d: d["model"].update(config_fingerprint="sha256:" + "０" * 64), "model.config_fingerprint must be"),
        (lambda d: d.update(estimate=None), "estimate has no entry for device 0"),
    ],
)
def test_a_key_present_but_empty_is_refused_too(edit, needle: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The values that would skip a check as surely as a missing key: a GPU of unknown or no memory, an empty or
    malformed fingerprint (the model check compared nothing), an estimate of null (every device's use zero)."""
    from oneke_plan.core.errors import BadInput

    path = tmp_path / "p.yaml"
    api.plan("oneke", output=path, **PLANS[1])
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(BadInput, match=re.escape(needle)):
        read_profile(path)
