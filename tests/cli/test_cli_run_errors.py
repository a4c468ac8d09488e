"""Every bad input oneke-run can meet gets exit 2 and one line on stderr naming the problem, never a traceback:
profiles, checkpoints, input lines, schemas, output paths and counts."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hostile import billion_laughs, deep_list
from safetensors.torch import load_file, save_file

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.plan.fit import DeviceEstimate

NER_LINE = (
    (Path(__file__).parents[2] / "examples" / "deepke" / "NER" / "test.json").read_text("utf-8").splitlines()[0]
)


def _cpu_profile(model_dir: Path, folder: Path) -> dict:
    """oneke-plan for a machine without GPUs, as a dict."""
    (folder / "inventory.yaml").write_text("gpus: []\ncpu_memory: 16GiB\n")
    out = folder / "cpu.yaml"
    argv = [str(model_dir), "--inventory", str(folder / "inventory.yaml"), "--max-new-tokens", "2", "-o", str(out)]
    assert plan_main(argv) == 0
    return yaml.safe_load(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def profile_data(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _cpu_profile(tiny_model_dir, tmp_path_factory.mktemp("errors"))


@pytest.fixture(scope="module")
def tied_profile_data(tiny_tied_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _cpu_profile(tiny_tied_dir, tmp_path_factory.mktemp("errors_tied"))


class Case:
    """A working run (profile, model, input, output) that one setup function breaks in one way."""

    def __init__(self, tmp: Path, profile: dict, model: Path):
        self.tmp = tmp
        self.model = tmp / "model"
        shutil.copytree(model, self.model)
        self.profile = tmp / "profile.yaml"
        self.profile.write_text(yaml.safe_dump(profile), encoding="utf-8")
        self.input = tmp / "in.jsonl"
        self.input.write_text(NER_LINE + "\n", encoding="utf-8")
        self.output = tmp / "out.jsonl"
        self.extra: list[str] = []

    def edit_profile(self, change: Callable[[dict], None]) -> None:
        data = yaml.safe_load(self.profile.read_text(encoding="utf-8"))
        change(data)
        self.profile.write_text(yaml.safe_dump(data), encoding="utf-8")

    def argv(self) -> list[str]:
        return [
            "--profile",
            str(self.profile),
            "--model",
            str(self.model),
            "--input",
            str(self.input),
            "--output",
            str(self.output),
            "--no-progress",
            *self.extra,
        ]


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _headless_checkpoint(case: Case) -> None:
    file = case.model / "model.safetensors"
    tensors = {k.removeprefix("model."): v for k, v in load_file(file).items() if not k.startswith("lm_head")}
    save_file(tensors, file, metadata={"format": "pt"})


def _set(key: str, value: object) -> Callable[[Case], None]:
    return lambda case: case.edit_profile(lambda d: d.__setitem__(key, value))


def _input(content: bytes) -> Callable[[Case], None]:
    return lambda case: case.input.write_bytes(content)


def _flags(*flags: str) -> Callable[[Case], None]:
    return lambda case: case.extra.extend(flags)


def _yaml_value(case: Case, key: str, text: str) -> None:
    """Set a top-level profile key to raw YAML `text` (what yaml.safe_dump would never write)."""
    case.edit_profile(lambda d: d.__setitem__(key, "@@VALUE@@"))
    case.profile.write_text(case.profile.read_text(encoding="utf-8").replace("'@@VALUE@@'", text), encoding="utf-8")


def _line_with_instruction(instruction: str) -> bytes:
    return (json.dumps({"id": 1, "instruction": instruction}) + "\n").encode()


def _schema_file(case: Case, text: str) -> None:
    (case.tmp / "schema.json").write_text(text, encoding="utf-8")
    case.extra += ["--task", "NER", "--schema", str(case.tmp / "schema.json")]


def _offload_to(case: Case, folder: str, make_file: bool = False) -> None:
    if make_file:
        (case.tmp / "a-file").write_text("my notes")
    case.extra += ["--offload-dir", str(case.tmp / folder)]


def _all_on_disk(case: Case, folder: str) -> None:
    def edit(data: dict) -> None:
        data["device_map"] = {"": "disk"}
        data["devices"].append({"id": "disk", "name": "disk", "total_bytes": None})
        data["estimate"]["disk"] = DeviceEstimate().to_data()  # every device has an estimate
        data["offload_dir"] = str(case.tmp / folder)

    case.edit_profile(edit)
    case.extra += ["--offload-dir", str(case.tmp / folder)]


def _tokenizer_code(case: Case) -> None:
    """A tokenizer_config.json naming a tokenizer class shipped as Python in the model folder."""
    marker = case.tmp / "tokenizer-code-ran"
    (case.model / "tokenization_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((case.model / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (case.model / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


CASES: dict[str, tuple[Callable[[Case], None], str]] = {
    "profile empty": (lambda c: c.profile.write_text(""), "empty"),
    "profile not YAML": (lambda c: c.profile.write_text("device_map: [\n"), "not valid YAML"),
    "profile other format version": (_set("format_version", 99), "format_version 99"),
    "profile without device_map": (lambda c: c.edit_profile(lambda d: d.pop("device_map")), "device_map"),
    "profile names a module the model lacks": (
        _set("device_map", {"model.decoder.layers.0": "cpu", "": "cpu"}),
        "not a module",
    ),
    "profile workload not positive": (
        lambda c: c.edit_profile(lambda d: d["workload"].update(batch_size=0)),
        "workload.batch_size",
    ),
    "checkpoint truncated": (lambda c: _truncate(c.model / "model.safetensors", 0.5), "truncated or corrupt"),
    "checkpoint names do not match": (_headless_checkpoint, "do not match"),
    "checkpoint missing": (lambda c: (c.model / "model.safetensors").unlink(), "no weights found"),
    "input not UTF-8": (_input(b'{"id": 1, "instruction": "\xff\xfe"}\n'), "UTF-8"),
    "input not JSON": (_input(b"{id: 1}\n"), "line 1"),
    "input line without instruction": (_input(b'{"id": 1}\n'), "instruction"),
    "instruction not JSON": (_input(b'{"id": 1, "instruction": "not json"}\n'), "instruction"),
    "input empty": (_input(b""), "empty"),
    "unknown task": (_flags("--task", "FOO", "--schema", '["x"]'), "FOO"),
    "empty schema": (_flags("--task", "NER", "--schema", "[]"), "schema"),
    "malformed schema": (_flags("--task", "NER", "--schema", '["a",'), "schema"),
    "schema without task": (_flags("--schema", '["x"]'), "--task"),
    "output is the input": (lambda c: setattr(c, "output", c.input), "is the input file"),
    "output in a missing folder": (lambda c: setattr(c, "output", c.tmp / "nope" / "out.jsonl"), "does not exist"),
    "batch size zero": (_flags("--batch-size", "0"), "--batch-size"),
    "max new tokens negative": (_flags("--max-new-tokens=-1"), "--max-new-tokens"),
    "model path missing": (lambda c: shutil.rmtree(c.model), "no such directory"),
    # hostile files and flags: refused at their line, before anything is loaded (issue 11)
    "profile alias bomb": (lambda c: c.profile.write_text(billion_laughs()), "profile.yaml:2: aliases"),
    "profile nested deeply": (lambda c: c.profile.write_text("devices: " + deep_list()), "profile.yaml:1: nested"),
    "profile lone surrogate": (lambda c: _yaml_value(c, "strategy", '"\\ud800"'), "lone surrogate"),
    "profile device_map key not a name": (_set("device_map", {0: "cpu"}), "not a module name"),
    "input line nested deeply": (_input(b'{"id": 1, "instruction": ' + deep_list().encode() + b"}"), "nested"),
    "input line lone surrogate": (_input(b'{"id": 1, "instruction": "\\ud800"}\n'), "in.jsonl, line 1: a lone"),
    "instruction nested deeply": (_input(_line_with_instruction(deep_list())), "in.jsonl, line 1: 'instruction'"),
    "schema nested deeply": (_flags("--task", "NER", "--schema", deep_list()), "nested deeper"),
    "schema file nested deeply": (lambda c: _schema_file(c, deep_list()), "schema.json: nested deeper"),
    "example nested deeply": (_flags("--task", "NER", "--schema", '["x"]', "--example", deep_list()), "--example:"),
    "example lone surrogate": (
        _flags("--task", "NER", "--schema", '["x"]', "--example", '[{"input": "\\udc00", "output": {}}]'),
        "lone surrogate",
    ),
    "device_map all on disk": (lambda c: _all_on_disk(c, "offload"), "every module is on disk"),
    "offload folder is a file": (lambda c: _offload_to(c, "a-file", make_file=True), "is a file, not a folder"),
    "offload folder under a file": (lambda c: _offload_to(c, "a-file/sub", make_file=True), "is a file, not a folder"),
    "tokenizer missing": (lambda c: (c.model / "tokenizer.json").unlink(), "the tokenizer cannot be loaded"),
    "tokenizer truncated": (lambda c: _truncate(c.model / "tokenizer.json", 0.5), "tokenizer.json:"),
    "tokenizer config nested deeply": (
        lambda c: (c.model / "tokenizer_config.json").write_text('{"a": ' + deep_list() + "}"),
        "tokenizer_config.json:1: nested deeper",
    ),
    "tokenizer ships code": (_tokenizer_code, "--trust-remote-code"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(
    name: str, profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = Case(tmp_path, profile_data, tiny_model_dir)
    breaks, needle = CASES[name]
    breaks(case)
    output_existed = case.output.exists()
    code = run_main(case.argv())
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines[0].startswith("oneke-run: error:") and needle in lines[0], err
    if name == "checkpoint names do not match":  # the names and the cause follow on the lines below
        assert "saved from a headless model" in err
    else:
        assert len(lines) == 1, err
    assert not (tmp_path / "tokenizer-code-ran").exists()
    assert case.output.exists() == output_existed and not (tmp_path / "out.jsonl.journal").exists()


def test_missing_shard(tiny_sharded_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "sharded"
    shutil.copytree(tiny_sharded_dir, model)
    shard = sorted(set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (model / shard).unlink()
    folder = tmp_path / "plan"
    folder.mkdir()
    (folder / "inventory.yaml").write_text("gpus: []\ncpu_memory: 16GiB\n")
    assert plan_main([str(model), "--inventory", str(folder / "inventory.yaml"), "-o", str(folder / "p.yaml")]) == 0
    (tmp_path / "in.jsonl").write_text(NER_LINE + "\n", encoding="utf-8")
    capsys.readouterr()
    code = run_main(
        [
            "--profile",
            str(folder / "p.yaml"),
            "--model",
            str(model),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and shard in err[0] and "missing" in err[0]


def test_tied_weights_split_across_devices(
    tied_profile_data: dict,
    tiny_tied_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the profile's relative offload_dir lands here
    case = Case(tmp_path, tied_profile_data, tiny_tied_dir)

    def split(data: dict) -> None:
        data["device_map"] = {"model": "cpu", "lm_head": "disk"}
        data["devices"].append({"id": "disk", "name": "disk", "total_bytes": None})
        data["estimate"]["disk"] = DeviceEstimate().to_data()  # every device has an estimate
        data["offload_dir"] = "offload"

    case.edit_profile(split)
    code = run_main(case.argv())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tied weights" in err[0], err


def test_machine_check_counts_the_reserve_once_and_ignores_nominal_sizes() -> None:
    """A '24 GiB' card reports a little less, and free memory is read after this process's CUDA context exists:
    the plan's reserve covers that context, so free memory must cover the rest of the plan, no more."""
    from oneke_plan.load.machine import machine_problems
    from oneke_plan.plan.inventory import Gpu
    from oneke_plan.plan.model_source import resolve_model
    from oneke_plan.plan.profile import read_profile

    profile = read_profile(Path(__file__).parents[2] / "profiles" / "oneke-24gib+12gib-bf16.yaml")
    source = resolve_model("oneke")
    need = {d: e.total_bytes - e.reserve_bytes for d, e in profile.estimate.items()}
    real_total = {0: int(23.69 * 2**30), 1: int(11.76 * 2**30)}  # what an RTX 3090 and a 3060 report
    enough = tuple(Gpu(i, "card", real_total[i], need[i], (8, 6)) for i in (0, 1))
    assert machine_problems(profile, source, enough, 0) == []
    short = (Gpu(0, "card", real_total[0], need[0] - 1, (8, 6)), enough[1])
    problems = machine_problems(profile, source, short, 0)
    assert len(problems) == 1 and "GPU 0" in problems[0]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.__setitem__("estimate", {"cpu": 5}), "estimate.cpu"),
        (lambda d: d["devices"][0].__setitem__("total_bytes", "2GiB"), "total_bytes"),
        (lambda d: d["quantization"].update(mode="4bit", quant_type="nf5"), "quant_type"),
        (lambda d: d.__setitem__("notes", 5), "notes"),
    ],
)
def test_malformed_profile_values_are_bad_input(profile_data: dict, tmp_path: Path, change, needle: str) -> None:
    from oneke_plan.core.errors import BadInput
    from oneke_plan.plan.profile import read_profile

    data = yaml.safe_load(yaml.safe_dump(profile_data))
    change(data)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(BadInput, match=needle):
        read_profile(path)


def test_trust_remote_code_needs_an_explicit_model(
    profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = Case(tmp_path, profile_data, tiny_model_dir)
    argv = [a for a in case.argv() if a not in ("--model", str(case.model))] + ["--trust-remote-code"]
    assert run_main(argv) == 2
    assert "--model" in capsys.readouterr().err


def test_a_relative_model_source_from_another_folder_names_the_profile_and_the_fix(
    profile_data: dict,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`oneke-plan out/tiny-model -o P.yaml` records the path as typed; run from another folder without --model, the
    path is missing there: the line says it came from the profile and what to pass, not 'download out/tiny-model'."""
    case = Case(tmp_path, profile_data, tiny_model_dir)
    case.edit_profile(lambda data: data["model"].update(source="model"))
    argv = [a for a in case.argv() if a not in ("--model", str(case.model))]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.source 'model'" in err[0] and "--model" in err[0], err
    assert "download" not in err[0], err
    monkeypatch.chdir(tmp_path)  # where the relative path holds: the same command runs
    assert run_main(argv) == 0, capsys.readouterr().err


# -- output files that are not the tool's own, and write errors -------------------------------------------------------
def _existing(kind: str, folder: Path, model: Path, make_special_file) -> Path:  # type: ignore[no-untyped-def]
    """An existing path of `kind` to give as --output."""
    path = folder / f"{kind.replace(' ', '-')}.out"
    if kind == "text file":
        path.write_bytes(b"my notes\nnot one JSON line, and no final newline")
    elif kind == "checkpoint":
        shutil.copy(model / "model.safetensors", path)
    elif kind == "empty file":
        path.write_bytes(b"")
    else:
        make_special_file(kind, path)
    return path


def _fingerprint(path: Path) -> tuple:
    info = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
    return info.st_ino, info.st_mode, info.st_nlink, content


@pytest.mark.parametrize(
    ("kind", "flag", "needle"),
    [
        ("text file", "--resume", "not an output of oneke-run"),
        ("text file", "--overwrite", "not an output of oneke-run"),  # --overwrite replaces only the tool's own
        ("checkpoint", "--resume", "not an output of oneke-run"),
        ("checkpoint", "--overwrite", "not an output of oneke-run"),
        ("empty file", "--resume", "not an output of oneke-run"),
        ("empty file", None, "is empty"),
        ("FIFO", "--overwrite", "is a FIFO"),
        ("FIFO", "--resume", "is a FIFO"),
        ("device", "--overwrite", "is a character device"),
        ("device", None, "is a character device"),
        ("hard link", "--overwrite", "has 2 hard links"),
        ("symbolic link", "--overwrite", "is a symbolic link"),
    ],
)
def test_outputs_that_are_not_ours_are_never_modified(
    kind: str,
    flag: str | None,
    needle: str,
    profile_data: dict,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_special_file,
) -> None:  # type: ignore[no-untyped-def]
    case = Case(tmp_path, profile_data, tiny_model_dir)
    case.output = _existing(kind, tmp_path, case.model, make_special_file)
    case.extra = [flag] if flag else []
    before = sorted(p.name for p in tmp_path.iterdir()), _fingerprint(case.output)
    code = run_main(case.argv())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0] and str(case.output) in err[0], err
    assert (sorted(p.name for p in tmp_path.iterdir()), _fingerprint(case.output)) == before  # no journal left


def test_resume_and_overwrite_together_is_bad_input(
    profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = Case(tmp_path, profile_data, tiny_model_dir)
    case.extra = ["--resume", "--overwrite"]
    assert run_main(case.argv()) == 2
    assert "give one of them" in capsys.readouterr().err


def test_disk_full_is_one_line_and_resume_completes_after_space_is_freed(
    small_tmpfs: Path, profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = Case(tmp_path, profile_data, tiny_model_dir)
    case.input.write_text((NER_LINE + "\n") * 6, encoding="utf-8")
    case.output = small_tmpfs / "out.jsonl"
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"x" * (60 * 1024))  # leaves about one page: a few answers fit, the rest do not
    code = run_main(case.argv())
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("oneke-run")]
    assert code == 2 and "No space left on device" in err[-1] and str(small_tmpfs) in err[-1], err
    assert "Traceback" not in err[-1] and not case.output.exists()
    filler.unlink()
    case.extra = ["--resume"]
    assert run_main(case.argv()) == 0
    lines = [json.loads(line) for line in case.output.read_text(encoding="utf-8").splitlines()]
    assert [line.get("key") for line in lines] == ["1", "2", "3", "4", "5", "6", None]  # one id: a merged line


def test_read_only_folder_is_one_line(
    read_only_tmpfs: Path, profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = Case(tmp_path, profile_data, tiny_model_dir)
    case.output = read_only_tmpfs / "out.jsonl"
    assert run_main(case.argv()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and str(read_only_tmpfs) in err[0], err


def test_overwrite_in_a_read_only_folder_is_one_line_and_keeps_the_output(
    small_tmpfs: Path, profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    case = Case(tmp_path, profile_data, tiny_model_dir)
    case.output = small_tmpfs / "out.jsonl"
    earlier = b'{"key": "0", "instruction": "an earlier output", "output": ""}\n'
    case.output.write_bytes(earlier)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, capture_output=True)
    case.extra = ["--overwrite"]
    assert run_main(case.argv()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and str(small_tmpfs) in err[0], err
    assert case.output.read_bytes() == earlier


def _offload_lm_head(case: Case, folder: Path) -> None:
    """lm_head (128 KiB in bf16) offloaded to `folder`; the rest on the CPU. The checkpoint becomes a pickled
    pytorch_model.bin: from a safetensors checkpoint transformers reads offloaded weights in place, writing none."""
    import torch

    weights = case.model / "model.safetensors"
    torch.save(load_file(weights), case.model / "pytorch_model.bin")
    weights.unlink()

    def edit(data: dict) -> None:
        data["device_map"] = {"model": "cpu", "lm_head": "disk"}
        data["devices"].append({"id": "disk", "name": "disk", "total_bytes": None})
        data["estimate"]["disk"] = DeviceEstimate().to_data()  # every device has an estimate
        data["offload_dir"] = str(folder)

    case.edit_profile(edit)
    case.extra += ["--offload-dir", str(folder)]


@pytest.mark.parametrize(
    ("problem", "code", "reason"),
    [
        ("read-only", 2, "Read-only file system"),
        ("full", 3, "free, the weights the profile puts on disk need"),
    ],
)
def test_offload_folder_that_cannot_take_the_weights_is_one_line(
    problem: str,
    code: int,
    reason: str,
    small_tmpfs: Path,
    profile_data: dict,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Read-only: found by the probe before loading. Full (64 KiB for a 128 KiB lm_head): found by counting the
    offloaded bytes before loading; accelerate's memmaps would end the process with SIGBUS, no message."""
    import subprocess

    case = Case(tmp_path, profile_data, tiny_model_dir)
    folder = small_tmpfs / "offload"
    _offload_lm_head(case, folder)
    if problem == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, capture_output=True)
    assert run_main(case.argv()) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and str(small_tmpfs) in err[0], err
    assert not case.output.exists() and not (tmp_path / "out.jsonl.journal").exists()


def test_offload_folder_with_room_runs(
    small_tmpfs: Path, profile_data: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The space check counts what is written: with lm_head's 128 KiB on a 256 KiB tmpfs, the run completes."""
    import subprocess

    subprocess.run(["mount", "-o", "remount,size=256k", str(small_tmpfs)], check=True, capture_output=True)
    case = Case(tmp_path, profile_data, tiny_model_dir)
    _offload_lm_head(case, small_tmpfs / "offload")
    assert run_main(case.argv()) == 0
    # accelerate's memmaps (.dat, transformers 4.x) or safetensors files (5.x): lm_head's 128 KiB, and a header
    written = [f.stat().st_size for f in (small_tmpfs / "offload").iterdir() if f.suffix in (".dat", ".safetensors")]
    assert 64 * 1024 * 2 <= sum(written) < 64 * 1024 * 2 + 4096


def test_an_os_error_while_loading_names_the_path(
    profile_data: dict,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An I/O error without a file name inside the load (simulated: root cannot make a real one) is one line with
    the checkpoint's path and exit 2, not an internal error."""
    import errno

    from oneke_plan.load import loader

    def failing_read(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(loader, "_load_weights", failing_read)
    case = Case(tmp_path, profile_data, tiny_model_dir)
    assert run_main(case.argv()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Input/output error" in err[0] and str(case.model / "model.safetensors") in err[0], err


def test_a_model_that_computes_nan_is_refused_before_any_prompt(
    profile_data: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    case = Case(tmp_path, profile_data, tiny_model_dir)
    file = case.model / "model.safetensors"
    nan = {name: torch.full_like(tensor, float("nan")) for name, tensor in load_file(file).items()}
    save_file(nan, file, metadata={"format": "pt"})
    code = run_main(case.argv())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"oneke-run: error: {case.model}: the loaded model computes NaN or inf"), err
    assert not case.output.exists() and not (tmp_path / "out.jsonl.journal").exists()
