"""The checked-in OneKE profiles (profiles/*.yaml) are exactly what oneke-plan writes today, and read back.

A failure here means the planner's output changed: if the change is intended, run `python profiles/regenerate.py`
and commit the new files.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import transformers
import yaml

from oneke_plan.cli.plan import main
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.profile import read_profile

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
# profiles/ are written with transformers 5. transformers 4.x builds its rotary buffers differently (one per decoder
# layer as well, no original_inv_freq), and the planner counts the buffers the running version builds, so its
# profiles differ by those bytes; tests/api/test_plan_probe.py checks, on every version, that planned weights equal
# the bytes of transformers' own meta tensors device by device.
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
ONLY_TRANSFORMERS_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="profiles/ are written with transformers 5")


def _load_regenerate():
    spec = importlib.util.spec_from_file_location("profiles_regenerate", PROFILES_DIR / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGENERATE = _load_regenerate()
PROFILES: list[tuple[str, list[str]]] = REGENERATE.PROFILES
REQUIRED = {
    "oneke-24gib+12gib-bf16.yaml",
    "oneke-2x24gib-bf16.yaml",
    "oneke-16gib-8bit.yaml",
    "oneke-12gib-4bit.yaml",
    "oneke-24gib+12gib+8gib-bf16.yaml",
}


def test_profile_list_matches_folder_and_readme() -> None:
    names = [name for name, _ in PROFILES]
    assert len(names) == len(set(names))
    assert REQUIRED <= set(names)
    assert sorted(names) == sorted(p.name for p in PROFILES_DIR.glob("*.yaml"))  # no stale or missing files
    readme = (PROFILES_DIR / "README.md").read_text(encoding="utf-8")
    assert "python profiles/regenerate.py" in readme
    for name in names:
        assert name in readme, name
    for _, args in PROFILES:  # independent of this machine: described GPUs, no CPU offload budget detected
        assert "--gpu" in args and "--cpu-memory" in args and "--inventory" not in args


@ONLY_TRANSFORMERS_5
@pytest.mark.parametrize("name, args", PROFILES, ids=[name for name, _ in PROFILES])
def test_checked_in_profile_has_not_drifted(
    name: str, args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    fresh = tmp_path / name
    code = main([*args, "-o", str(fresh)])
    _, err = capsys.readouterr()
    assert code == 0, err
    checked_in = PROFILES_DIR / name
    expected = yaml.safe_load(checked_in.read_text(encoding="utf-8"))
    actual = yaml.safe_load(fresh.read_text(encoding="utf-8"))
    assert actual == expected, f"{name} drifted; run `python profiles/regenerate.py` if the change is intended"
    assert fresh.read_text(encoding="utf-8") == checked_in.read_text(encoding="utf-8")



@pytest.mark.parametrize("name", [name for name, _ in PROFILES])
def test_checked_in_profile_reads_back(name: str) -> None:
    path = PROFILES_DIR / name
    profile = read_profile(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert profile.device_map == data["device_map"]
    assert profile.workload == Workload(**data["workload"])
    assert profile.quantization.mode == data["quantization"]["mode"]
    by_id = {d.id: d for d in profile.devices}
    for device, est in profile.estimate.items():
        assert est.total_bytes <= by_id[device].total_bytes
        assert est.total_bytes == sum(
            getattr(est, k) for k in ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes")
        )
    assert profile.model.parameter_count == 13_254_415_360  # /work/shared/oneke/README.md


@ONLY_TRANSFORMERS_5
def test_regenerate_writes_identical_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script itself (not just its list) produces the checked-in files."""
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    assert REGENERATE.regenerate(tmp_path) == 0
    capsys.readouterr()
    for name, _ in PROFILES:
        assert (tmp_path / name).read_text(encoding="utf-8") == (PROFILES_DIR / name).read_text(encoding="utf-8")


def test_profile_format_doc_example_is_a_checked_in_profile() -> None:
    doc = REGENERATE.DOC.read_text(encoding="utf-8")
    example = (PROFILES_DIR / REGENERATE.DOC_EXAMPLE).read_text(encoding="utf-8")
    assert REGENERATE.doc_with_example(doc, example) == doc, "run `python profiles/regenerate.py`"
    assert example in doc


def test_profile_format_doc_split_example_quotes_its_profile() -> None:
    """The hand-shortened split-model excerpt (the second YAML block of docs/profile-format.md) keeps every line it
    shows, the estimate's bytes included, as profiles/oneke-24gib+12gib-bf16.yaml has them (it once kept stale
    workspace bytes after the memory model changed)."""
    doc = REGENERATE.DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 2, "docs/profile-format.md lost its split-model example"
    assert "profiles/oneke-24gib+12gib-bf16.yaml" in doc
    profile_lines = set((PROFILES_DIR / "oneke-24gib+12gib-bf16.yaml").read_text(encoding="utf-8").splitlines())
    shown = [line for line in blocks[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any("workspace_bytes" in line for line in shown)
    assert [line for line in shown if line not in profile_lines] == []
