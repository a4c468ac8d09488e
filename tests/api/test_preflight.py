"""oneke-run's preflight: each check once in a whole run, and the order its docstring lists.

- Once: a real oneke-run over a tiny checkpoint, under a sys.setprofile hook that counts every call of the checks
  (the tokenizer's template check, the GPU detection, the profile read, the checkpoint resolution, ...): each is
  called exactly once, however many modules ask for what it found.
- Order: a run given two mistakes at once is refused for the one its earlier step checks, for each pair of
  neighbouring steps of api/preflight.py's table; the steps are read from that table, so a reordering of the code
  that is not also a reordering of the documented table fails here.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from oneke_plan import api
from oneke_plan.api import preflight as preflight_module
from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import BadInput, DoesNotFit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

COUNTED = {
    ("oneke_plan.formats.templates", "check_tokenizer"),
    ("oneke_plan.plan.inventory", "detect_gpus"),
    ("oneke_plan.plan.profile", "read_profile"),
    ("oneke_plan.api.preflight", "checkpoint_source"),
    ("oneke_plan.load.loader", "load_tokenizer"),
    ("oneke_plan.load.machine", "check_machine"),
    ("oneke_plan.load.machine", "check_gpus_present"),
    ("oneke_plan.measure.checkpoint", "read_checkpoint"),
    ("oneke_plan.load.loader", "check_finite_outputs"),
}


@pytest.fixture(scope="module")
def planned(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("preflight")
    profile = folder / "tiny.yaml"
    argv = [str(tiny_model_dir), "--max-input-tokens", "128", "--max-new-tokens", "4", "-o", str(profile)]
    assert plan_main(argv) == 0
    records = folder / "in.jsonl"
    lines = ['{"id": "1", "text": "张三在北京工作。"}', '{"id": "2", "text": "李四去了上海。"}']
    records.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return profile, records


def test_a_run_makes_each_check_once(planned: tuple[Path, Path], tmp_path: Path) -> None:
    profile, records = planned
    calls: Counter[tuple[str, str]] = Counter()

    def count(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call":
            key = (frame.f_globals.get("__name__", ""), frame.f_code.co_name)
            if key in COUNTED:
                calls[key] += 1

    argv = ["--profile", str(profile), "--input", str(records), "--output", str(tmp_path / "out.jsonl")]
    sys.setprofile(count)
    try:
        code = run_main([*argv, "--task", "NER", "--schema", '["人物", "地理位置"]', "--no-progress"])
    finally:
        sys.setprofile(None)
    assert code == 0
    assert dict(calls) == dict.fromkeys(COUNTED, 1)


def documented_steps() -> list[str]:
    """The first words of each row of preflight's table, in the order it lists them."""
    doc = preflight_module.__doc__ or ""
    return [m.group(1).strip() for m in re.finditer(r"^\s+\d+\s+(.+?)\s{2,}", doc, re.M)]


def test_the_table_lists_ten_steps() -> None:
    assert documented_steps()[:3] == [
        "the engine is one oneke-run has",
        "the profile reads and validates",
        "batch and answer length within the plan",
    ]
    assert len(documented_steps()) == 10


# One mistake per step (those a run can be given without a GPU), as keyword arguments of api.run, and the start of
# the line that refuses it. Steps 4 (a template is a choice the parser limits) and 9 (torchrun's variables) are
# covered by the CLI tests.
MISTAKES = {
    "the engine is one oneke-run has": ({"engine": "tgi"}, "--engine 'tgi'"),
    "the profile reads and validates": ({"profile": "missing.yaml"}, "missing.yaml"),
    "batch and answer length within the plan": ({"batch_size": 10_000}, "--batch-size 10000 is more than"),
    "keep or replace the output, not both": ({"resume": True, "overwrite": True}, "--resume keeps the answers"),
    "the checkpoint: named, or the profile's": ({"model": "no/such-model"}, "no/such-model"),
    "the adapter: valid, the planned one": ({"adapter": "no-such-adapter"}, "no-such-adapter"),
}


@pytest.mark.parametrize("earlier, later", list(zip(list(MISTAKES)[:-1], list(MISTAKES)[1:], strict=True)))
def test_two_mistakes_are_refused_for_the_earlier_step(
    earlier: str, later: str, planned: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    steps = documented_steps()
    assert steps.index(earlier) < steps.index(later)
    profile, records = planned
    arguments: dict[str, object] = {"profile": profile, "input": records, "output": tmp_path / "out.jsonl"}
    arguments |= {"task": "NER", "schema": ["人物"]}
    arguments |= MISTAKES[later][0]
    arguments |= MISTAKES[earlier][0]
    with pytest.raises((BadInput, DoesNotFit)) as refused:
        api.run(**arguments)  # type: ignore[arg-type]
    assert MISTAKES[earlier][1] in str(refused.value)
    assert not (tmp_path / "out.jsonl").exists()
