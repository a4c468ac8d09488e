"""Fuzz: random corruptions of a valid profile, inventory, config.json, input file, and LoRA adapter (its
adapter_config.json and its safetensors header), fed to the real CLIs.

Every outcome must be an answer (exit 0), one clear refusal (2 bad input, 3 does not fit) and never an internal
error (exit 1) or a traceback. The corruptions (tests/hostile.py): byte flips, truncations, deleted byte spans,
odd bytes (invalid UTF-8, NUL, BOM, escapes), and on the parsed document: deleted keys, wrong types, huge numbers,
odd strings and keys (lone surrogates, bidi overrides, NUL, 200,000 characters), 20,000-deep nesting, aliases.
A fixed seed gives the same cases everywhere; each case's name says how to rebuild it (target, kind, index).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hostile import BYTE_CORRUPTIONS, STRUCTURE_CORRUPTIONS, mutate, render_json, render_yaml

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main

SEED = 11
BYTE_CASES = 4  # per byte corruption, per target
STRUCTURE_CASES = 2  # per structure corruption, per target (successful runs cost a model load: keep it under a minute)
ADAPTER_STRUCTURE_CASES = 6  # adapter_config.json has some 40 keys, each its own check: more of them are hit
JSON_CORRUPTIONS = tuple(kind for kind in STRUCTURE_CORRUPTIONS if kind != "alias")  # JSON has no aliases
NER_FILE = Path(__file__).parents[2] / "examples" / "deepke" / "NER" / "test.json"
NER_LINE = NER_FILE.read_text("utf-8").splitlines()[0]




@dataclass
class Setup:
    """The files of one valid run, and the commands that read them."""

    folder: Path
    model: Path
    profile: Path
    inventory: Path
    input: Path


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    folder = tmp_path_factory.mktemp("fuzz")
    inventory = folder / "inventory.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    profile = folder / "profile.yaml"
    argv = [str(tiny_model_dir), "--inventory", str(inventory), "--max-new-tokens", "2", "--batch-size", "2"]
    assert plan_main([*argv, "-o", str(profile)]) == 0
    source = folder / "in.jsonl"
    source.write_text(NER_LINE + "\n", encoding="utf-8")
    return Setup(folder, tiny_model_dir, profile, inventory, source)


def _cases(target: str, original: bytes, parse: Callable[[bytes], object], render: Callable[[object], str]):  # type: ignore[no-untyped-def]
    """(name, corrupted bytes) for `target`: the byte corruptions, then the structure ones (aliases in YAML only)."""
    rng = random.Random(f"{SEED}:{target}")
    for kind, corrupt in BYTE_CORRUPTIONS.items():
        for i in range(BYTE_CASES):
            yield f"{target}:{kind}:{i}", corrupt(original, rng)
    data = parse(original)
    for kind in STRUCTURE_CORRUPTIONS if render is render_yaml else JSON_CORRUPTIONS:
        for i in range(STRUCTURE_CASES):
            yield f"{target}:{kind}:{i}", render(mutate(data, rng, kind)).encode("utf-8", "surrogatepass")


def _outcome(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int | str, str]:
    """(exit code, stderr) of a CLI run in this process; an exception escaping main is an outcome of its own."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: int | str = main(argv)
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: main must return, never raise
            code = f"raised {type(exc).__name__}: {exc}"
    return code, err.getvalue()


def _bad(code: int | str, err: str) -> str | None:
    """Why an outcome breaks the promise, or None."""
    if code not in (0, 2, 3):
        return f"exit {code}"
    if "Traceback" in err or "internal error" in err:
        return "a traceback or an internal error"
    return None


@contextlib.contextmanager
def _working_in(folder: Path) -> Iterator[None]:
    """Profiles may name a relative offload folder: keep what a case writes inside its own folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield


def _run_cases(setup: Setup, target: str, cases, command: Callable[[Path, Path], tuple[Callable, list[str]]]) -> None:  # type: ignore[no-untyped-def]
    failures = []
    count = 0
    for name, data in cases:
        count += 1
        folder = setup.folder / name.replace(":", "-")
        folder.mkdir()
        with _working_in(folder):
            main, argv = command(folder, folder / "file")
            (folder / "file").write_bytes(data)
            code, err = _outcome(main, argv)
        why = _bad(code, err)
        if why:
            last = err.strip().splitlines()[-1:] or [""]
            failures.append(f"{name}: {why}: {last[0][:300]}")
    assert count > 0
    assert not failures, f"{len(failures)} of {count} {target} cases broke the promise:\n" + "\n".join(failures)


def _run_argv(setup: Setup, folder: Path, profile: Path, source: Path) -> list[str]:
    return [
        "--profile",
        str(profile),
        "--model",
        str(setup.model),
        "--input",
        str(source),
        "--output",
        str(folder / "out.jsonl"),
        "--no-progress",
    ]


def test_fuzz_profile(setup: Setup) -> None:
    original = setup.profile.read_bytes()
    cases = _cases("profile", original, yaml.safe_load, render_yaml)
    _run_cases(setup, "profile", cases, lambda folder, file: (run_main, _run_argv(setup, folder, file, setup.input)))


def test_fuzz_inventory(setup: Setup) -> None:
    original = b"gpus:\n  - {name: RTX 3090}\n  - {memory: 12GiB, compute_capability: '8.6'}\n  - 8GiB\n"
    original += b"cpu_memory: 1GiB\n"
    cases = _cases("inventory", original, yaml.safe_load, render_yaml)

    def command(folder: Path, file: Path) -> tuple[Callable, list[str]]:  # type: ignore[type-arg]
        return plan_main, [str(setup.model), "--inventory", str(file), "--max-new-tokens", "8", "--batch-size", "1"]

    _run_cases(setup, "inventory", cases, command)


def test_fuzz_config_json(setup: Setup) -> None:
    original = (setup.model / "config.json").read_bytes()
    cases = _cases("config.json", original, json.loads, functools.partial(render_json, indent=2))

    def command(folder: Path, file: Path) -> tuple[Callable, list[str]]:  # type: ignore[type-arg]
        model = folder / "model"
        model.mkdir()
        (model / "config.json").symlink_to(file)
        (model / "model.safetensors").symlink_to(setup.model / "model.safetensors")
        return plan_main, [str(model), "--gpu", "1GiB", "--max-new-tokens", "8", "--batch-size", "1"]

    _run_cases(setup, "config.json", cases, command)


def test_fuzz_input(setup: Setup) -> None:
    original = setup.input.read_bytes()
    cases = list(_cases("input", original, json.loads, render_json))
    rng = random.Random(f"{SEED}:instruction")
    instruction = json.loads(json.loads(NER_LINE)["instruction"])
    for kind in JSON_CORRUPTIONS:  # the instruction is JSON inside a JSON string: corrupt that too
        for i in range(STRUCTURE_CASES):
            line = json.loads(NER_LINE)
            line["instruction"] = render_json(mutate(instruction, rng, kind))
            cases.append((f"input-instruction:{kind}:{i}", json.dumps(line).encode() + b"\n"))
    _run_cases(setup, "input", cases, lambda folder, file: (run_main, _run_argv(setup, folder, setup.profile, file)))


@pytest.fixture(scope="module")
def adapter(setup: Setup) -> Path:
    """A LoRA adapter for the tiny model, saved by peft."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from oneke_plan.measure.compat import dtype_kw

    model = AutoModelForCausalLM.from_pretrained(setup.model, **dtype_kw(torch.float32))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    folder = setup.folder / "adapter"
    peft.get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def _adapter_command(setup: Setup, adapter: Path, replaced: str) -> Callable[[Path, Path], tuple[Callable, list[str]]]:  # type: ignore[type-arg]
    """oneke-plan with a copy of `adapter` whose file `replaced` is the case's."""

    def command(folder: Path, file: Path) -> tuple[Callable, list[str]]:  # type: ignore[type-arg]
        copy = folder / "adapter"
        copy.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (copy / name).symlink_to(file if name == replaced else adapter / name)
        argv = [str(setup.model), "--inventory", str(setup.inventory), "--max-new-tokens", "2", "--batch-size", "1"]
        return plan_main, [*argv, "--adapter", str(copy)]

    return command


def test_fuzz_adapter_config(setup: Setup, adapter: Path) -> None:
    original = (adapter / "adapter_config.json").read_bytes()
    cases = list(_cases("adapter_config.json", original, json.loads, functools.partial(render_json, indent=2)))
    rng = random.Random(f"{SEED}:adapter_config.json:more")
    data = json.loads(original)
    for kind in JSON_CORRUPTIONS:
        for i in range(STRUCTURE_CASES, ADAPTER_STRUCTURE_CASES):
            text = render_json(mutate(data, rng, kind), indent=2)
            cases.append((f"adapter_config.json:{kind}:{i}", text.encode("utf-8", "surrogatepass")))
    _run_cases(setup, "adapter_config.json", cases, _adapter_command(setup, adapter, "adapter_config.json"))


def test_fuzz_adapter_header(setup: Setup, adapter: Path) -> None:
    """The safetensors header: its bytes (the 8-byte length included) corrupted, and its JSON mutated and written
    back with its new length; the tensors' bytes after it as they were."""
    data = (adapter / "adapter_model.safetensors").read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    prefix, body = data[:end], data[end:]
    rng = random.Random(f"{SEED}:adapter header")
    cases = []
    for kind, corrupt in BYTE_CORRUPTIONS.items():
        for i in range(BYTE_CASES):
            cases.append((f"adapter-header:{kind}:{i}", corrupt(prefix, rng) + body))
    header = json.loads(prefix[8:])
    for kind in JSON_CORRUPTIONS:
        for i in range(ADAPTER_STRUCTURE_CASES):
            text = render_json(mutate(header, rng, kind)).encode("utf-8", "surrogatepass")
            cases.append((f"adapter-header:{kind}:{i}", len(text).to_bytes(8, "little") + text + body))
    _run_cases(setup, "adapter header", cases, _adapter_command(setup, adapter, "adapter_model.safetensors"))
