"""Every class of bad input is refused in bounded memory (#30): a file that is huge (a 4 GiB sparse file, which costs
no disk), endless (/dev/zero) or lying about its size (a safetensors header that claims a terabyte), given where
each command reads a file, is one line and exit 2, and the command's peak resident memory stays within
REFUSAL_BUDGET of what merely importing the libraries takes (hostile.imports_peak_bytes). Each case is one real
command in its own process, measured by os.wait4; before #30 several of these read the whole file (4 to 12 GB)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile import cli, imports_peak_bytes, measured

from oneke_plan.cli import plan as plan_cli

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

REFUSAL_BUDGET = 300 * 2**20
"""Bytes a refusal may cost above the imports: the issue's "a few hundred MB"; reading any of these files whole
would cost 4 GiB or more."""
HUGE = 4 * 2**30
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}


def _sparse(path: Path, size: int = HUGE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def _endless(path: Path) -> Path:
    """A name for /dev/zero where a file is expected (a link: the tools follow it, as they follow a hub cache's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/zero")
    return path


def _huge_header(path: Path) -> Path:
    """A safetensors file whose 8-byte header length claims 1 TiB; the file itself is 4 GiB of sparse zeros."""
    _sparse(path)
    with open(path, "r+b") as handle:
        handle.write((2**40).to_bytes(8, "little"))
    return path


class Setup:
    def __init__(self, model: Path, profile: Path) -> None:
        self.model, self.profile = model, profile


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    profile = tmp_path_factory.mktemp("refusal-memory") / "tiny.yaml"
    argv = [str(tiny_model_dir), "--max-input-tokens", "256", "--max-new-tokens", "4", "--batch-size", "2"]
    assert plan_cli.main([*argv, "-o", str(profile)]) == 0
    return Setup(tiny_model_dir, profile)


def _damaged(setup: Setup, tmp: Path, name: str, make: Callable[[Path], Path]) -> Path:
    """A copy of the tiny model whose file `name` (one it really has) is replaced by what `make` makes."""
    folder = Path(shutil.copytree(setup.model, tmp / "model"))
    assert (folder / name).is_file(), f"the tiny model has no {name}"
    (folder / name).unlink()
    make(folder / name)
    return folder


def _adapter(tmp: Path, config: Callable[[Path], Path] | None, weights: Callable[[Path], Path] | None) -> Path:
    """An adapter folder: adapter_config.json made by `config` (None: a valid one), the weights by `weights`."""
    folder = tmp / "adapter"
    folder.mkdir()
    if config is None:
        (folder / "adapter_config.json").write_text(json.dumps(LORA))
    else:
        config(folder / "adapter_config.json")
    if weights is not None:
        weights(folder / "adapter_model.safetensors")
    return folder


def _plan(setup: Setup, tmp: Path, *extra: str | Path, model: Path | None = None) -> list[str | Path]:
    return [*cli("oneke-plan"), model or setup.model, "--gpu", "24GiB", *extra, "-o", tmp / "out.yaml"]


def _run(setup: Setup, tmp: Path, *extra: str | Path, model: Path | None = None) -> list[str | Path]:
    flags = {"--profile": setup.profile, "--model": model or setup.model, "--output": tmp / "out.jsonl"}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        flags[str(flag)] = value
    input_file = tmp / "input.jsonl"
    if "--input" not in flags:
        input_file.write_text('{"id": "1", "instruction": "x"}\n')
        flags["--input"] = input_file
    return [*cli("oneke-run"), *[part for item in flags.items() for part in item], "--no-progress"]


Case = Callable[[Setup, Path], list[str | Path]]
CASES: dict[str, Case] = {
    # oneke-plan: the model folder, the inventory, the adapter
    "plan: config.json of 4 GiB": lambda s, t: _plan(s, t, model=_damaged(s, t, "config.json", _sparse)),
    "plan: --inventory /dev/zero": lambda s, t: [
        *cli("oneke-plan"), s.model, "--inventory", _endless(t / "inv.yaml"), "-o", t / "out.yaml",
    ],
    "plan: --inventory of 4 GiB": lambda s, t: [
        *cli("oneke-plan"), s.model, "--inventory", _sparse(t / "inv.yaml"), "-o", t / "out.yaml",
    ],
    "plan: adapter_config.json of 4 GiB": lambda s, t: _plan(s, t, "--adapter", _adapter(t, _sparse, None)),
    "plan: adapter header claims 1 TiB": lambda s, t: _plan(s, t, "--adapter", _adapter(t, None, _huge_header)),
    # oneke-run: the profile, the input, the schema, the model's own files
    "run: --profile /dev/zero": lambda s, t: _run(s, t, "--profile", _endless(t / "p.yaml")),
    "run: --profile of 4 GiB": lambda s, t: _run(s, t, "--profile", _sparse(t / "p.yaml")),
    "run: --input /dev/zero": lambda s, t: _run(s, t, "--input", _endless(t / "in.jsonl")),
    "run: --input of 5 GiB": lambda s, t: _run(s, t, "--input", _sparse(t / "in.jsonl", 5 * 2**30)),
    "run: --schema /dev/zero": lambda s, t: [
        *_run(s, t, "--input", _raw_input(t)), "--task", "NER", "--schema", _endless(t / "schema.json"),
    ],
    "run: tokenizer.json is /dev/zero": lambda s, t: _run(s, t, model=_damaged(s, t, "tokenizer.json", _endless)),
    "run: weights header claims 1 TiB": lambda s, t: _run(
        s, t, model=_damaged(s, t, "model.safetensors", _huge_header)
    ),
}  # fmt: skip


def _raw_input(tmp: Path) -> Path:
    path = tmp / "raw.jsonl"
    path.write_text('{"text": "Alice met Bob."}\n')
    return path


@pytest.mark.parametrize("case", CASES)
def test_a_huge_or_endless_file_is_refused_in_bounded_memory(setup: Setup, tmp_path: Path, case: str) -> None:
    command = CASES[case](setup, tmp_path)
    done = measured(command, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = done.stderr.strip().splitlines()
    above = done.peak_bytes - imports_peak_bytes()
    print(f"{case}: exit {done.code}, peak {done.peak_bytes / 2**20:.0f} MiB ({above / 2**20:+.0f} MiB vs imports)")
    assert done.code == 2 and len(lines) == 1, done.stderr
    assert above < REFUSAL_BUDGET, (case, done.peak_bytes, imports_peak_bytes())
