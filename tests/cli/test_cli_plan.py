"""The oneke-plan command: profiles it writes, and every bad input -> exit 2 with one line on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oneke_plan.cli.plan import main
from oneke_plan.core.errors import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT
from oneke_plan.core.sizes import GiB
from oneke_plan.plan.catalog import card_names

ESTIMATE_KEYS = {"weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes", "total_bytes"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("oneke-plan: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def check_public_keys(data: dict) -> None:
    assert isinstance(data["device_map"], dict) and data["device_map"]
    ids = [d["id"] for d in data["devices"]]
    for device in data["devices"]:
        assert isinstance(device["total_bytes"], int) and device["total_bytes"] > 0
    assert set(data["device_map"].values()) <= set(ids)
    assert set(data["estimate"]) == set(ids)
    for values in data["estimate"].values():
        assert set(values) >= ESTIMATE_KEYS
        assert values["total_bytes"] == sum(values[k] for k in ESTIMATE_KEYS - {"total_bytes"})
    assert data["quantization"]["mode"] in ("none", "8bit", "4bit")
    assert set(data["workload"]) == {"max_input_tokens", "max_new_tokens", "batch_size"}


# -- the console script, for real --------------------------------------------------------------------------------
def test_console_script_writes_profile(tmp_path: Path) -> None:
    script = shutil.which("oneke-plan", path=str(Path(sys.executable).parent)) or shutil.which("oneke-plan")
    assert script, "the oneke-plan console script is not installed"
    out = tmp_path / "machine.yaml"
    proc = subprocess.run(
        [script, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the profile went to the file
    assert f"profile written to {out}" in proc.stderr
    data = yaml.safe_load(out.read_text(encoding="utf-8"))
    check_public_keys(data)
    assert [(d["id"], d["total_bytes"]) for d in data["devices"]] == [(0, 24 * GiB), (1, 12 * GiB)]
    assert data["quantization"]["mode"] == "none"
    assert data["workload"] == {"max_input_tokens": 512, "max_new_tokens": 512, "batch_size": 4}
    assert data["dtype"] == "bfloat16"
    for device in (0, 1):
        assert data["estimate"][device]["total_bytes"] <= data["devices"][device]["total_bytes"]
    assert data["device_map"]["model.embed_tokens"] == 0 and data["device_map"]["lm_head"] == 1


def test_profile_to_stdout_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "oneke", "--gpu", "12GiB", "--quantize", "4bit", "--no-double-quant", "--batch-size", "2", "-v"
    )
    assert code == 0, err
    data = yaml.safe_load(out)
    check_public_keys(data)
    assert data["quantization"] == {"mode": "4bit", "quant_type": "nf4", "double_quant": False}
    assert data["workload"]["batch_size"] == 2
    assert "per decoder layer" in err  # -v explains the steps


# -- errors: exit 2, one line --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gpu, needle",
    [
        ("24GiBB", "not a size"),
        ("-8GiB", "not a size"),
        ("abc", "unknown card"),
        ("RTX 9999", "unknown card"),
        ("FOO:24GiB", "unknown card 'FOO'"),
        ("RTX 3090:lots", "not a size"),
        ("0GiB", "0 bytes"),
    ],
)
def test_bad_gpu(capsys: pytest.CaptureFixture[str], gpu: str, needle: str) -> None:
    code, _, err = run(capsys, "oneke", f"--gpu={gpu}")
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("flag", ["--cpu-memory", "--reserve"])
@pytest.mark.parametrize("value", ["24GiBB", "-8GiB", "abc"])
def test_bad_sizes(capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    code, _, err = run(capsys, "oneke", "--gpu", "24GiB", f"{flag}={value}")
    assert_one_line_error(code, err, flag, "not a size")


def test_missing_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, str(tmp_path / "no" / "such"), "--gpu", "24GiB")
    assert_one_line_error(code, err, "no such directory")


def test_model_path_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    code, _, err = run(capsys, str(tmp_path / "config.json"), "--gpu", "24GiB")
    assert_one_line_error(code, err, "is a file")


def test_directory_without_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, str(tmp_path), "--gpu", "24GiB")
    assert_one_line_error(code, err, "config.json")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"model_type": "no-such-architecture"}), "model_type"),
        (json.dumps({"architectures": ["LlamaForCausalLM"]}), "model_type"),
    ],
)
def test_bad_config_json(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    code, _, err = run(capsys, str(tmp_path), "--gpu", "24GiB")
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("flag", ["--batch-size", "--max-input-tokens", "--max-new-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_counts(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, flag: str, value: str) -> None:
    code, _, err = run(capsys, tiny_model_dir, "--gpu", "24GiB", "--cpu-memory", "0", flag, value)
    assert_one_line_error(code, err, flag, "positive integer")


def test_context_beyond_max_position_embeddings(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    limit = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    args = ["--gpu", "24GiB", "--cpu-memory", "0", "--max-input-tokens", limit - 10, "--max-new-tokens", 11]
    code, _, err = run(capsys, tiny_model_dir, *args)
    assert_one_line_error(code, err, "max_position_embeddings", str(limit))
    # exactly at the limit is fine
    args[-1] = 10
    code, _, err = run(capsys, tiny_model_dir, *args)
    assert code == 0, err


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "expected a mapping"),
        ("gpus: [unclosed\n  - x: {", "not valid YAML"),
        ("- memory: 24GiB\n", "expected a mapping"),
        ("gpus: 24GiB\n", "expected a mapping"),
        ("gpus:\n  - 5\n", "gpus[0]"),
        ("gpus:\n  - {size: 24GiB}\n", "gpus[0]"),
        ("gpus:\n  - {memory: lots}\n", "gpus[0].memory"),
        ("gpus:\n  - {name: Imaginary Card}\n", "unknown card"),
        ("gpus:\n  - {memory: 24GiB, compute_capability: eight}\n", "compute_capability"),
        ("gpus:\n  - {memory: 24GiB}\ncpu_memory: much\n", "cpu_memory"),
    ],
)
def test_bad_inventory_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(text, encoding="utf-8")
    code, _, err = run(capsys, "oneke", "--inventory", path)
    assert_one_line_error(code, err, needle)


def test_inventory_file_not_found(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "oneke", "--inventory", tmp_path / "missing.yaml")
    assert_one_line_error(code, err, "not found")


def test_good_inventory_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("gpus:\n  - {name: RTX 3090}\n  - {memory: 12GiB}\n  - 8GiB\ncpu_memory: 0\n", encoding="utf-8")
    code, out, err = run(capsys, "oneke", "--inventory", path)
    assert code == 0, err
    data = yaml.safe_load(out)
    check_public_keys(data)
    rtx3090 = 24_265 * 1_048_576  # the catalog's: nvidia-smi's total for an RTX 3090 (catalog.py), 25,443,696,640
    assert [(d["id"], d["total_bytes"]) for d in data["devices"]] == [(0, rtx3090), (1, 12 * GiB), (2, 8 * GiB)]
    assert data["devices"][0]["name"] == "RTX 3090" and data["devices"][0]["compute_capability"] == "8.6"


def test_output_into_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "missing" / "plan.yaml"
    code, _, err = run(capsys, "oneke", "--gpu", "32GiB", "-o", target)
    assert_one_line_error(code, err, "does not exist")
    assert not target.parent.exists()


def test_output_is_a_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "oneke", "--gpu", "32GiB", "-o", tmp_path)
    assert_one_line_error(code, err, "is a folder")


def test_gpu_with_inventory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("gpus: [{memory: 24GiB}]\n", encoding="utf-8")
    code, _, err = run(capsys, "oneke", "--gpu", "24GiB", "--inventory", path)
    assert_one_line_error(code, err, "--gpu", "--inventory")


def test_debug_adds_the_traceback_and_keeps_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """README: "--debug adds the traceback"; the exit code still says bad input (2), not a bug (1)."""
    code, out, err = run(capsys, "oneke", "--gpu", "24GiBB", "--debug")
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("Traceback (most recent call last):"), err
    assert err.strip().splitlines()[-1].startswith("oneke-plan: error: --gpu '24GiBB': not a size"), err


# -- does not fit: exit 3 ------------------------------------------------------------------------------------------
def test_does_not_fit_exits_3(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "plan.yaml"
    code, out, err = run(capsys, "oneke", "--gpu", "10GiB", "--gpu", "6GiB", "--cpu-memory", "0", "-o", target)
    assert code == EXIT_DOES_NOT_FIT, err
    assert out == ""
    assert not target.exists()  # nothing written
    assert err.startswith("oneke-plan: error: does not fit")
    assert "GPU 0:" in err and "GPU 1:" in err
    assert "--quantize 4bit: fits" in err
    assert "Traceback" not in err


# -- --solve ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what, key", [("max-input-tokens", "max_input_tokens"), ("batch-size", "batch_size")])
def test_solve(capsys: pytest.CaptureFixture[str], what: str, key: str) -> None:
    base = ["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0"]
    code, out, err = run(capsys, *base, "--solve", what)
    assert code == 0, err
    data = yaml.safe_load(out)
    check_public_keys(data)
    best = data["workload"][key]
    assert f"the largest {key} that fits is {best}" in err
    # the solved value fits when asked for directly, one more does not
    code, _, err = run(capsys, *base, f"--{what}", best)
    assert code == 0, err
    code, _, err = run(capsys, *base, f"--{what}", best + 1)
    assert code == EXIT_DOES_NOT_FIT, err


def test_solve_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "oneke", "--gpu", "4GiB", "--cpu-memory", "0", "--solve", "batch-size")
    assert code == EXIT_DOES_NOT_FIT
    assert "even 1 does not fit" in err


def test_solve_nothing_fits_replicas_says_what_would(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["oneke", "--gpu", "8GiB", "--gpu", "8GiB"]
    code, _, err = run(capsys, *base, "--replicas", "2", "--solve", "batch-size")
    assert code == EXIT_DOES_NOT_FIT
    assert "even 1 does not fit 2 replicas" in err
    assert "  --replicas 1 --quantize 4bit: fits" in err.splitlines()
    # the suggestion holds when asked for
    code, _, err = run(capsys, *base, "--replicas", "1", "--quantize", "4bit", "--solve", "batch-size")
    assert code == 0, err


# -- --list-cards ---------------------------------------------------------------------------------------------------
def test_list_cards(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "oneke", "--list-cards")
    assert code == 0
    assert out.splitlines() == card_names()
    assert "RTX 3090" in out.splitlines() and "Tesla T4" in out.splitlines()
    assert err == ""


# -- -o never destroys a file oneke-plan did not write ---------------------------------------------------------------
def test_o_refuses_the_models_own_files_even_with_overwrite(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = (model / "config.json").read_bytes()
    for extra in ((), ("--overwrite",)):
        code, _, err = run(capsys, model, "--gpu", "24GiB", "-o", model / "config.json", *extra)
        assert_one_line_error(code, err, "is a file of the model's folder", "config.json")
        assert (model / "config.json").read_bytes() == config
        # a new file there would change the model too (a new model.safetensors.index.json changes what loads)
        code, _, err = run(capsys, model, "--gpu", "24GiB", "-o", model / "plan.yaml", *extra)
        assert_one_line_error(code, err, "would be written into the model's folder")
        assert not (model / "plan.yaml").exists()


def test_o_replaces_its_own_profile_and_with_overwrite_an_empty_file_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "machine.yaml"
    assert run(capsys, "oneke", "--gpu", "32GiB", "-o", out)[0] == 0
    assert run(capsys, "oneke", "--gpu", "48GiB", "-o", out)[0] == 0  # re-planning replaces its own profile
    assert yaml.safe_load(out.read_text())["devices"][0]["total_bytes"] == 48 * GiB
    for content in (b"notes: mine\n", b"format_version: 1\ncreated_by: someone else\n"):
        out.write_bytes(content)
        for extra in ((), ("--overwrite",)):  # --overwrite replaces an earlier output, never another file
            code, _, err = run(capsys, "oneke", "--gpu", "32GiB", "-o", out, *extra)
            assert_one_line_error(code, err, "is not a profile written by oneke-plan", "left as is")
            assert out.read_bytes() == content
    out.write_bytes(b"")  # a placeholder: replaced with --overwrite only
    code, _, err = run(capsys, "oneke", "--gpu", "32GiB", "-o", out)
    assert_one_line_error(code, err, "is empty", "--overwrite")
    assert out.read_bytes() == b""
    assert run(capsys, "oneke", "--gpu", "32GiB", "-o", out, "--overwrite")[0] == 0
    assert yaml.safe_load(out.read_text())["created_by"].startswith("oneke-plan ")
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask  # not the temporary file's 0600


@pytest.mark.parametrize("kind", ["FIFO", "device", "hard link", "symbolic link"])
def test_o_never_replaces_a_special_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, make_special_file
) -> None:  # type: ignore[no-untyped-def]
    out = make_special_file(kind, tmp_path / "out.yaml")
    before = os.lstat(out)
    code, _, err = run(capsys, "oneke", "--gpu", "32GiB", "-o", out, "--overwrite")
    assert_one_line_error(code, err, str(out))
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode, after.st_nlink) == (before.st_ino, before.st_mode, before.st_nlink)
    assert {p.name for p in tmp_path.iterdir()} <= {"out.yaml", "out.yaml.other-name", "out.yaml.target"}  # no temp


def test_o_in_a_read_only_folder_is_one_line(capsys: pytest.CaptureFixture[str], read_only_tmpfs: Path) -> None:
    code, _, err = run(capsys, "oneke", "--gpu", "32GiB", "-o", read_only_tmpfs / "machine.yaml")
    assert_one_line_error(code, err, str(read_only_tmpfs), "Read-only file system")


def test_o_on_a_full_disk_is_one_line_and_keeps_the_old_profile(
    capsys: pytest.CaptureFixture[str], small_tmpfs: Path
) -> None:
    out = small_tmpfs / "machine.yaml"
    assert run(capsys, "oneke", "--gpu", "32GiB", "-o", out)[0] == 0
    old = out.read_bytes()
    (small_tmpfs / "filler").write_bytes(b"x" * (64 * 1024 - 4096))  # every page but the old profile's
    code, _, err = run(capsys, "oneke", "--gpu", "48GiB", "-o", out)
    assert_one_line_error(code, err, str(out), "No space left on device")
    assert out.read_bytes() == old and sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "machine.yaml"]


@pytest.mark.parametrize(
    "flags",
    [["--replicas", "x"], ["--replicas", "0"], ["--nodes", "0"], ["--max-input-tokens", "0"], ["--batch-size", "0"]],
)
def test_bad_numbers_are_refused_before_transformers_loads(flags: list[str]) -> None:
    """A wrong number is one line and exit 2 at once: the model's config (and with it transformers, about a second
    of imports) is not read first."""
    code = "import sys; from oneke_plan.cli.plan import main; rc = main(sys.argv[1:]); "
    code += "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate'}))"
    argv = [sys.executable, "-c", code, "oneke", "--gpu", "24GiB", *flags]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.stdout.strip() == "2 []", (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and "oneke-plan: error: --" in done.stderr
