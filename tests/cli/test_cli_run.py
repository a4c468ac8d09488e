"""oneke-run end to end on a tiny model and a CPU profile planned by oneke-plan: every DeepKE task file, raw text
with a schema, the machine check, too-long prompts, --resume, and the batch-size limit."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import llama2_zh_ids
from transformers import AutoTokenizer

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.extract.inputs import read_converted
from oneke_plan.extract.outputs import RunOutput, journal_path

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TASKS = ["NER", "RE", "EE", "EET", "EEA", "KG", "SPO"]
MAX_INPUT = 600  # the longest DeepKE prompt (EE, SPO) is 544 tiny-tokenizer tokens
MAX_NEW = 4  # enough to run the whole path; keeps 341 prompts fast
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA GPUs")


def plan(model_dir: Path, out: Path, *extra: str) -> Path:
    """oneke-plan MODEL ... -o OUT; without --gpu it plans for a machine without GPUs (an inventory with none, so
    the profile is the same where a GPU happens to be present)."""
    argv = [str(model_dir), "--max-new-tokens", str(MAX_NEW), "--batch-size", "8", "-o", str(out), *extra]
    if "--max-input-tokens" not in extra:
        argv += ["--max-input-tokens", str(MAX_INPUT)]
    if "--gpu" not in extra:
        inventory = out.with_suffix(".inventory.yaml")
        inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
        argv += ["--inventory", str(inventory)]
    assert plan_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def cpu_profile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """oneke-plan for this machine (no GPU: everything on "cpu"), unquantized. float32: bf16 matmuls are emulated
    on CPUs without AVX512-BF16/AMX and run several times slower; test_loader covers bf16 loading."""
    profile = plan(tiny_model_dir, tmp_path_factory.mktemp("profiles") / "cpu.yaml", "--dtype", "float32")
    data = yaml.safe_load(profile.read_text())
    assert data["device_map"] == {"": "cpu"} and data["quantization"]["mode"] == "none"
    assert data["dtype"] == "float32"
    return profile


@pytest.fixture(scope="module")
def gpu_profile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A profile planned for a described 24 GiB GPU: device_map {"": 0}."""
    profile = plan(tiny_model_dir, tmp_path_factory.mktemp("profiles") / "gpu.yaml", "--gpu", "24GiB")
    assert yaml.safe_load(profile.read_text())["device_map"] == {"": 0}
    return profile


def run(profile: Path, inp: Path, out: Path, *extra: str) -> int:
    return run_main(["--profile", str(profile), "--input", str(inp), "--output", str(out), "--no-progress", *extra])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompt_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if not line.get("merged")]


def check_output_lines(lines: list[dict[str, Any]]) -> None:
    """One line per prompt (unique keys) with exactly one of parsed, parse_error, error; after the last line of
    each id with several, its merged line."""
    prompts = prompt_lines(lines)
    assert len({line["key"] for line in prompts}) == len(prompts)
    for line in prompts:
        assert isinstance(line["output"], str)
        assert sum(name in line for name in ("parsed", "parse_error", "error")) == 1
    for n, line in enumerate(lines):
        if line.get("merged"):
            chunks = lines[n - len(line["chunks"]) : n]
            assert [c["key"] for c in chunks] == line["chunks"] and len(chunks) > 1
            assert all(c["id"] == line["id"] for c in chunks) and line["output"] == "{}"
            assert n + 1 == len(lines) or lines[n + 1]["id"] != line["id"]


# -- 4. every DeepKE task file through the CLI -----------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_deepke_task_file_end_to_end(
    task: str, cpu_profile: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = deepke_dir / task / "test.json"
    out = tmp_path / f"{task}.jsonl"
    assert run(cpu_profile, source, out) == 0
    inputs = read_jsonl(source)
    lines = read_jsonl(out)
    check_output_lines(lines)
    prompts = prompt_lines(lines)
    assert [line["key"] for line in prompts] == [str(n) for n in range(1, len(inputs) + 1)]  # input order
    assert len(lines) - len(prompts) == sum(1 for n in Counter(i["id"] for i in inputs).values() if n > 1)
    for line, given in zip(prompts, inputs, strict=True):
        for field in ("id", "instruction", "label"):
            assert line[field] == given[field]
        assert "error" not in line  # none too long: every prompt ran
    err = capsys.readouterr().err
    assert "planned weights" in err and "+0.00%" in err  # planned == loaded on an unquantized CPU profile
    assert f"{len(inputs)} prompts answered" in err


@pytest.mark.parametrize(
    ("task", "schema", "chunks"),
    [
        ("NER", '["人物", "地理位置", "组织机构"]', 1),
        ("NER", "schema.json", 1),
        ("EE", '[{"event_type": "组织关系-裁员", "trigger": true, "arguments": ["时间", "裁员人数", "裁员方"]}]', 1),
        ("EE", "schema.json", 16),  # the authors' EE schema: 65 event types in chunks of 4, 15 x 4 + 5
    ],
)
def test_raw_text_with_task_and_schema(
    task: str, schema: str, chunks: int, cpu_profile: Path, deepke_dir: Path, tmp_path: Path
) -> None:
    source = deepke_dir / task / "sample.json"
    schema_arg = str(deepke_dir / task / schema) if schema == "schema.json" else schema
    out = tmp_path / "raw.jsonl"
    assert run(cpu_profile, source, out, "--task", task, "--schema", schema_arg) == 0
    inputs = read_jsonl(source)
    lines = read_jsonl(out)
    check_output_lines(lines)
    prompts = prompt_lines(lines)
    assert len(prompts) == len(inputs) * chunks
    assert len(lines) == len(prompts) + (len(inputs) if chunks > 1 else 0)
    authors_labels = {line["id"]: line["label"] for line in read_jsonl(deepke_dir / task / "test.json")}
    for number, given in enumerate(inputs, 1):
        mine = [line for line in prompts if line["key"].split(":")[0] == str(number)]
        text_id = hashlib.sha256(given["text"].encode("utf-8")).hexdigest()  # the authors' id for raw text
        assert mine and all(line["id"] == text_id and line["task"] == task for line in mine)
        assert all(line["source"] == task for line in mine)  # the input's folder, examples/deepke/<task>
        assert all(line["label"] == authors_labels[text_id] for line in mine)  # the label the authors converted
        assert all(json.loads(line["instruction"])["input"] == given["text"] for line in mine)


# -- 5. the machine check --------------------------------------------------------------------------------------------
@no_gpu
def test_gpu_profile_on_cpu_machine_exits_3_with_replan(
    gpu_profile: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    assert run(gpu_profile, deepke_dir / "NER" / "test.json", out) == 3
    err = capsys.readouterr().err
    assert "places modules on GPU 0" in err
    assert "re-plan for it with:" in err and "oneke-plan " in err and "--max-new-tokens 4" in err
    assert not out.exists()


@no_gpu
def test_force_gets_past_the_check_and_fails_in_one_line(
    gpu_profile: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    earlier = '{"key": "0", "instruction": "an earlier output", "output": "keep me"}\n'
    out.write_text(earlier)
    assert run(gpu_profile, deepke_dir / "NER" / "test.json", out, "--force", "--overwrite") == 3
    err = capsys.readouterr().err
    assert "warning (--force)" in err  # the check ran and was overridden
    errors = [line for line in err.splitlines() if line.startswith("oneke-run: error:")]
    assert len(errors) == 1 and "GPU 0" in errors[0] and "no CUDA GPU" in errors[0] and "oneke-plan" in errors[0]
    assert "Traceback" not in err and "internal error" not in err
    assert out.read_text() == earlier  # --overwrite removes nothing before the model has loaded


def test_config_fingerprint_mismatch_exits_3(
    cpu_profile: Path, tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.jsonl"
    assert run(cpu_profile, deepke_dir / "NER" / "test.json", out, "--model", str(other)) == 3
    assert "config.json differs from the one the profile was planned for" in capsys.readouterr().err
    assert not out.exists()


# -- 6. too long, --resume, --batch-size -----------------------------------------------------------------------------
def test_too_long_prompts_are_reported_not_cut(
    tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = 200
    profile = plan(tiny_model_dir, tmp_path / "short.yaml", "--max-input-tokens", str(limit), "--dtype", "float32")
    source = deepke_dir / "NER" / "test.json"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = read_converted(source)
    lengths = {r.key: len(llama2_zh_ids(tokenizer, r.instruction)) for r in records}
    too_long = {key for key, n in lengths.items() if n > limit}
    assert too_long and len(too_long) < len(records)

    out = tmp_path / "out.jsonl"
    assert run(profile, source, out) == 0
    lines = read_jsonl(out)
    assert len(lines) == len(records)
    check_output_lines(lines)
    for line in lines:
        if line["key"] in too_long:
            assert line["output"] == ""
            assert f"prompt has {lengths[line['key']]} tokens" in line["error"]
            assert f"max_input_tokens ({limit})" in line["error"] and "not cut" in line["error"]
        else:
            assert line["raw_output"] != ""  # it ran
    assert f"{len(too_long)} prompts too long" in capsys.readouterr().err

    # re-planned for them, --resume runs exactly those again and keeps every other line as it was
    assert run(plan(tiny_model_dir, tmp_path / "long.yaml", "--dtype", "float32"), source, out, "--resume") == 0
    resumed = read_jsonl(out)
    assert [line["key"] for line in resumed] == [line["key"] for line in lines]  # input order, each once
    assert not any("error" in line for line in resumed)
    assert all(new == old for new, old in zip(resumed, lines, strict=True) if old["key"] not in too_long)
    assert f"{len(too_long)} prompts answered ({len(records) - len(too_long)} already done)" in capsys.readouterr().err


def test_resume_after_a_killed_run(cpu_profile: Path, deepke_dir: Path, tmp_path: Path) -> None:
    """What a SIGKILL leaves (test_reliability kills a real run): a journal with some answers and a cut last line,
    no output yet. --resume answers the rest; the output then holds every prompt once, in input order."""
    source = deepke_dir / "EEA" / "test.json"
    out = tmp_path / "out.jsonl"
    assert run(cpu_profile, source, out) == 0
    full = read_jsonl(out)
    journal = journal_path(out)
    header = json.dumps({"oneke_run_journal": 1, "mode": "new", "pid": 1}) + "\n"
    kept = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in full[3:5])
    journal.write_text(header + kept + '{"id": "f4dc", "instr', encoding="utf-8")
    out.unlink()

    assert run(cpu_profile, source, out, "--resume") == 0
    assert read_jsonl(out) == full  # same answers (greedy), every prompt once, in input order
    assert not journal.exists()

    # nothing left: a second --resume loads nothing and changes nothing
    before = out.read_bytes()
    assert run(cpu_profile, source, out, "--resume") == 0
    assert out.read_bytes() == before
    # without --resume or --overwrite an existing output is refused
    assert run(cpu_profile, source, out) == 2


def test_a_second_run_on_the_same_output_exits_2_at_once(
    cpu_profile: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = deepke_dir / "NER" / "test.json"
    out = tmp_path / "out.jsonl"
    with RunOutput(out, source, "new") as first:  # a run in progress holds the journal's lock
        first.start(read_converted(source))
        capsys.readouterr()
        for extra in ((), ("--resume",), ("--overwrite",)):
            assert run(cpu_profile, source, out, *extra) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "another oneke-run" in err[0] and str(journal_path(out)) in err[0], err
    assert not out.exists()


def test_batch_size_above_the_plan_exits_2(
    cpu_profile: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    assert run(cpu_profile, deepke_dir / "NER" / "test.json", out, "--batch-size", "9") == 2
    err = capsys.readouterr().err
    assert "--batch-size 9 is more than the profile planned for (8)" in err
    assert not out.exists()
    assert run(cpu_profile, deepke_dir / "NER" / "test.json", out, "--max-new-tokens", str(MAX_NEW + 1)) == 2
