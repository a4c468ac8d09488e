"""Reliability and security: a killed run resumes losing or repeating nothing; untrusted files never run code."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oneke_plan.cli import plan as plan_cli
from oneke_plan.core.errors import BadInput
from oneke_plan.extract.outputs import journal_path
from oneke_plan.measure.checkpoint import read_checkpoint
from oneke_plan.plan.fit import DeviceEstimate
from oneke_plan.plan.profile import read_profile

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cpu_profile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reliability") / "tiny-cpu.yaml"
    code = plan_cli.main(
        [
            str(tiny_model_dir),
            "--max-input-tokens",
            "1024",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "2",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    return out


def _run_cmd(profile: Path, model: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "oneke-run"),
        "--profile",
        str(profile),
        "--model",
        str(model),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _journal_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    return [json.loads(line) for line in raw[: raw.rfind(b"\n") + 1].decode("utf-8").splitlines()]


def test_sigkill_mid_run_with_failed_prompts_then_resume_answers_every_record_once_in_input_order(
    cpu_profile: Path, tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "re-part.json"  # 24 real DeepKE prompts: long enough to be killed mid-run
    source.write_text("".join((deepke_dir / "RE" / "test.json").read_text(encoding="utf-8").splitlines(True)[:24]))
    expected = [str(n) for n in range(1, 25)]
    short = tmp_path / "short.yaml"  # 9 of the 24 prompts (177 to 184 tiny-tokenizer tokens) are too long for it
    argv = [str(tiny_model_dir), "--max-input-tokens", "176", "--max-new-tokens", "24", "--batch-size", "2"]
    assert plan_cli.main([*argv, "-o", str(short)]) == 0
    out = tmp_path / "re.jsonl"
    journal = journal_path(out)
    proc = subprocess.Popen(_run_cmd(short, tiny_model_dir, source, out), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 1 + 9 + 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: make the workload longer"
    proc.send_signal(signal.SIGSTOP)  # frozen mid-run, holding its lock, while a second run tries the same output

    # meanwhile, a second run on the same output stops at once, with one line, and changes nothing
    second = subprocess.run(_run_cmd(short, tiny_model_dir, source, out, "--resume"), capture_output=True, text=True)
    assert second.returncode == 2 and "another oneke-run" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()  # type: ignore[union-attr]
    before = {line["key"]: line for line in _journal_lines(journal)[1:]}
    failed = {key for key, line in before.items() if "error" in line}
    assert len(failed) == 9 and 4 <= len(before) - len(failed) < 15 and not out.exists()

    resumed = subprocess.run(  # re-planned for the long prompts
        _run_cmd(cpu_profile, tiny_model_dir, source, out, "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    after = [line for line in _lines(out) if not line.get("merged")]
    assert [line["key"] for line in after] == expected  # every prompt once, in input order
    assert not any("error" in line for line in after)
    by_key = {line["key"]: line for line in after}
    assert all(by_key[key] == line for key, line in before.items() if key not in failed)  # answers kept as they were
    assert not journal.exists()


def test_resume_over_a_finished_output_does_nothing(
    cpu_profile: Path, tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path
) -> None:
    source = deepke_dir / "NER" / "test.json"
    out = tmp_path / "ner.jsonl"
    first = subprocess.run(_run_cmd(cpu_profile, tiny_model_dir, source, out), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    written = out.read_bytes()
    again = subprocess.run(
        _run_cmd(cpu_profile, tiny_model_dir, source, out, "--resume"), capture_output=True, text=True
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert out.read_bytes() == written


YAML_EXPLOIT = "!!python/object/apply:os.system ['touch {marker}']\n"


def test_profile_with_python_tag_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    profile = tmp_path / "evil.yaml"
    profile.write_text(YAML_EXPLOIT.format(marker=marker))
    with pytest.raises(BadInput, match="not valid YAML"):
        read_profile(profile)
    assert not marker.exists()


def test_inventory_with_python_tag_is_refused_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    inventory = tmp_path / "evil.yaml"
    inventory.write_text("gpus: " + YAML_EXPLOIT.format(marker=marker))
    assert plan_cli.main(["oneke", "--inventory", str(inventory)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with (tmp_path / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Exploit(marker)}, handle)
    with pytest.raises(BadInput, match="weights-only"):
        read_checkpoint(tmp_path)
    assert not marker.exists()


def test_model_code_never_runs_without_trust_remote_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "custom"
    model.mkdir()
    (model / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (model / "configuration_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = {
        "model_type": "evil",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    }
    (model / "config.json").write_text(json.dumps(config))
    assert plan_cli.main([str(model), "--gpu", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "Traceback" not in err
    assert not marker.exists()


def test_profile_yaml_is_data_only(cpu_profile: Path) -> None:
    """Every value in a written profile is a plain YAML scalar, list or mapping (safe_load round-trips it)."""
    text = cpu_profile.read_text(encoding="utf-8")
    assert "!!" not in text
    assert yaml.safe_load(text)["device_map"]


def test_profile_cannot_send_offloaded_weights_outside_the_current_folder(
    cpu_profile: Path, tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from oneke_plan.cli import run as run_cli

    data = yaml.safe_load(cpu_profile.read_text(encoding="utf-8"))
    target = tmp_path / "elsewhere"
    data["device_map"]["model.layers.3"] = "disk"
    data["devices"].append({"id": "disk", "name": "disk", "total_bytes": None})
    data["estimate"]["disk"] = DeviceEstimate().to_data()  # every device has an estimate
    data["offload_dir"] = str(target)
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump(data))
    out = tmp_path / "out.jsonl"
    code = run_cli.main(
        [
            "--profile",
            str(evil),
            "--model",
            str(tiny_model_dir),
            "--input",
            str(deepke_dir / "NER" / "test.json"),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--offload-dir" in err[0]
    assert not target.exists() and not out.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_keep_every_answer_and_say_how_to_continue(
    signum: int, cpu_profile: Path, tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "re-part.json"  # 12 prompts in batches of 2: the signal comes after the second batch
    source.write_text("".join((deepke_dir / "RE" / "test.json").read_text(encoding="utf-8").splitlines(True)[:12]))
    out = tmp_path / "re.jsonl"
    journal = journal_path(out)
    proc = subprocess.Popen(_run_cmd(cpu_profile, tiny_model_dir, source, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 1 + 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the signal: make the workload longer"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"oneke-run: interrupted by {name}: every answer so far is kept in {journal}: run the same command with "
        "--resume to continue"
    )
    kept = {line["key"]: line for line in _journal_lines(journal)[1:]}
    assert len(kept) >= 3 and not out.exists()
    # what --resume will read: the kept answers as they were, and exactly the other prompts still to run
    from oneke_plan.extract.inputs import read_converted
    from oneke_plan.extract.outputs import RunOutput

    records = read_converted(source)
    with RunOutput(out, source, "resume") as resumed:
        pending = resumed.start(records)
        assert {key: resumed.done[key] for key in kept} == kept
    assert [r.key for r in pending] == [r.key for r in records if r.key not in kept]


def test_sigterm_in_any_command_is_one_line_and_exit_143(capsys: pytest.CaptureFixture[str]) -> None:
    """run_main, which every CLI runs its body in: SIGTERM unwinds like Ctrl-C (finally blocks run), and the
    default handler is back afterwards."""
    from oneke_plan.cli.common import run_main

    cleaned = []

    def body() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            return 0
        finally:
            cleaned.append(True)

    assert run_main("oneke-plan", body, debug=False) == 143
    assert capsys.readouterr().err == "oneke-plan: interrupted by SIGTERM\n"
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (OSError(28, "No space left on device", "/data/out/part"), "/data/out/part: No space left on device"),
        (PermissionError(13, "Permission denied", "/models/x/tokenizer.json"), "/models/x/tokenizer.json: Permission"),
        (OSError(5, "Input/output error"), "the system did not say which"),
    ],
)
def test_an_os_error_no_layer_caught_is_one_line_and_exit_2(
    error: OSError, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from oneke_plan.cli.common import run_main

    def body() -> int:
        raise error

    assert run_main("oneke-run", body, debug=False) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("oneke-run: error: ") and needle in err[0], err
