"""oneke-run on a profile planned from a GGUF file (SmolLM2-135M-Instruct, Q4_1): it loads the GGUF as planned
(planned = loaded weights, to the byte), and answers as the same run on the same weights converted to a float32
safetensors checkpoint (transformers dequantizes Q4_1 to float32 both times); another GGUF, or a file that is not
one, is refused before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from gguf_files import write_gguf

from oneke_plan.cli import run as run_cli
from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TEXTS = [
    "Barack Obama was born in Hawaii and worked in Chicago.",
    "Apple opened an office in Berlin in 2020.",
    "Marie Curie studied in Paris.",
]
SCHEMA = '["person", "location", "organization"]'
RUN_ARGS = ["--task", "NER", "--schema", SCHEMA, "--lang", "en", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-run")
    (folder / "cpu.yaml").write_text("gpus: []\ncpu_memory: 16GiB\n")
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return folder


def plan(model: Path, out: Path, work: Path, *extra: str) -> Path:
    argv = [str(model), "--inventory", str(work / "cpu.yaml"), "--max-input-tokens", "256", "--max-new-tokens", "12"]
    assert plan_main([*argv, "--batch-size", "3", "-o", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def gguf_profile(gguf_file: Path, work: Path) -> Path:
    return plan(gguf_file, work / "gguf.yaml", work)


def run(profile: Path, model: Path, output: Path, work: Path) -> list[dict[str, Any]]:
    assert run_main(["--profile", str(profile), "--model", str(model), "--input", str(work / "in.jsonl")]
                    + ["--output", str(output), *RUN_ARGS]) == 0  # fmt: skip
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.fixture(scope="module")
def gguf_run(gguf_profile: Path, gguf_file: Path, work: Path) -> tuple[list[dict[str, Any]], dict[Any, int]]:
    """oneke-run on the GGUF, with the weights it reports loaded per device."""
    seen: dict[Any, int] = {}
    original = run_cli.RunReport.weights_loaded

    def record(self: Any, profile: Any, loaded_bytes: dict[Any, int]) -> None:
        seen.update(loaded_bytes)
        original(self, profile, loaded_bytes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_cli.RunReport, "weights_loaded", record)
        lines = run(gguf_profile, gguf_file, work / "gguf.out.jsonl", work)
    return lines, seen


def test_run_loads_the_gguf_as_planned(
    gguf_profile: Path, gguf_run: tuple[list[dict[str, Any]], dict[Any, int]]
) -> None:
    lines, loaded = gguf_run
    planned = {
        device: estimate["weights_bytes"]
        for device, estimate in yaml.safe_load(gguf_profile.read_text())["estimate"].items()
    }
    assert loaded == planned
    assert len(lines) == len(TEXTS) and all("raw_output" in line for line in lines)


def test_answers_equal_the_converted_checkpoint(
    gguf_run: tuple[list[dict[str, Any]], dict[Any, int]], smollm2_dir: Path, work: Path
) -> None:
    """The converted float32 checkpoint holds the same dequantized weights: planned in float32, it answers
    every prompt with the same text."""
    profile = plan(smollm2_dir, work / "converted.yaml", work, "--dtype", "float32")
    converted = run(profile, smollm2_dir, work / "converted.out.jsonl", work)
    assert [line["raw_output"] for line in gguf_run[0]] == [line["raw_output"] for line in converted]
    assert any(line["raw_output"].strip() for line in converted)


def test_another_gguf_is_refused(
    capsys: pytest.CaptureFixture[str], gguf_profile: Path, work: Path, tmp_path: Path
) -> None:
    """As another checkpoint is: its config is not the one planned for (exit 3, before any weight is read)."""
    other = write_gguf(tmp_path / "other" / "other.gguf", "llama")
    code = run_main(["--profile", str(gguf_profile), "--model", str(other), "--input", str(work / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), *RUN_ARGS])  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_DOES_NOT_FIT, err
    assert "config" in err and "differs" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_not_a_gguf_is_refused(
    capsys: pytest.CaptureFixture[str], gguf_profile: Path, work: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    code = run_main(["--profile", str(gguf_profile), "--model", str(bad), "--input", str(work / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), *RUN_ARGS])  # fmt: skip
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(lines) == 1, err
    assert lines[0].startswith("oneke-run: error: ") and "not a GGUF file" in lines[0]


def test_replicas_that_do_not_fit_suggest_no_quantization_of_a_gguf(
    gguf_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two copies of SmolLM2 (float32, about 540 MB) on two 300 MiB GPUs: does not fit (exit 3), and what would fit
    never says --quantize, which transformers cannot do to a GGUF (it once tried it and refused --quantize, a flag
    the user never gave)."""
    code = plan_main([str(gguf_file), "--gpu", "300MiB", "--gpu", "300MiB", "--cpu-memory", "0", "--replicas", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_DOES_NOT_FIT, err
    assert "does not fit" in err and "--quantize" not in err
