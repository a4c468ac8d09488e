"""Planning and running read local files only: no socket is opened, whatever the libraries they import would do.

The route that watches is Python's own: an audit hook (sys.addaudithook) in a fresh process sees every
socket.getaddrinfo, socket.connect and new socket, whoever asks for it (huggingface_hub, kernels, requests). The
environment is the user's without HF_HUB_OFFLINE, which the commands must not need to be told.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_bnb_on_cpu

from oneke_plan.core.errors import EXIT_DOES_NOT_FIT

# What reaches another host: a name lookup, a connection, a datagram sent. (urllib3 binds a socket to ::1 when
# imported, to learn whether IPv6 works: that stays on this machine.)
WATCHED = """
import runpy, sys
NETWORK = {"socket.getaddrinfo", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.gethostbyname",
           "socket.gethostbyname_ex", "socket.gethostbyaddr"}
def hook(event, args):
    if event in NETWORK:
        sys.stderr.write(f"NETWORK {event} {args!r}\\n")
sys.addaudithook(hook)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__")
"""


def watched(target: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`target` (a module, or a .py file) run in a fresh process under the watcher, without HF_HUB_OFFLINE."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run(
        [sys.executable, "-c", WATCHED, target, *argv], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def test_the_hook_sees_a_lookup(tmp_path: Path) -> None:
    """The watcher can fail: a name lookup (it need not succeed) is reported."""
    script = tmp_path / "lookup.py"
    script.write_text(
        "import socket\ntry:\n    socket.getaddrinfo('example.invalid', 443)\nexcept OSError:\n    pass\n"
    )
    proc = watched(str(script), cwd=tmp_path)
    assert "NETWORK socket.getaddrinfo ('example.invalid', 443" in proc.stderr, proc.stderr


def test_does_not_fit_opens_no_socket_and_prints_its_line_first(tmp_path: Path) -> None:
    """The does-not-fit path prices 8-bit and 4-bit, which imports bitsandbytes: on a CPU with AVX512-BF16,
    bitsandbytes >= 0.49 asks the Hub for a kernel when imported; nothing may log before the tool's one line."""
    proc = watched("oneke_plan.cli.plan", "oneke", "--gpu", "10GiB", "--gpu", "6GiB", "--cpu-memory", "0", cwd=tmp_path)
    assert proc.returncode == EXIT_DOES_NOT_FIT, proc.stderr
    assert "NETWORK" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("oneke-plan: error: does not fit"), proc.stderr
    assert "kernels" not in proc.stderr, proc.stderr


def test_planning_from_python_after_huggingface_hub_was_imported_opens_no_socket(tmp_path: Path) -> None:
    """A program (or pytest) that imported huggingface_hub before calling oneke-plan's main or the API: the
    environment variable comes too late for huggingface_hub, whose constant kernels reads; still no socket."""
    program = tmp_path / "program.py"
    program.write_text(
        "import huggingface_hub.constants, sys\n"
        "from oneke_plan.cli.plan import main\n"
        "sys.exit(main(['oneke', '--gpu', '10GiB', '--gpu', '6GiB', '--cpu-memory', '0']))\n"
    )
    proc = watched(str(program), cwd=tmp_path)
    assert proc.returncode == EXIT_DOES_NOT_FIT, proc.stderr
    assert "NETWORK" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("oneke-plan: error: does not fit"), proc.stderr


@needs_bnb_on_cpu
def test_a_4bit_run_opens_no_socket(tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path) -> None:
    """Plan and run 4-bit on the CPU (bitsandbytes' 4-bit kernels are what it fetches), each in a fresh process."""
    inventory = tmp_path / "machine.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    profile = tmp_path / "q4.yaml"
    common = ["--max-input-tokens", "600", "--max-new-tokens", "2", "--batch-size", "2"]
    plan = watched(
        "oneke_plan.cli.plan", str(tiny_model_dir), "--quantize", "4bit", "--inventory", str(inventory), *common,
        "-o", str(profile), cwd=tmp_path,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert "NETWORK" not in plan.stderr, plan.stderr
    records = (deepke_dir / "NER" / "test.json").read_text(encoding="utf-8").splitlines()[:2]
    inputs = tmp_path / "two.json"
    inputs.write_text("\n".join(records) + "\n", encoding="utf-8")
    run = watched(
        "oneke_plan.cli.run", "--profile", str(profile), "--input", str(inputs), "--output", str(tmp_path / "o.jsonl"),
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "NETWORK" not in run.stderr, run.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("value", ["0"])
def test_a_user_who_sets_hf_hub_offline_keeps_it(value: str, tmp_path: Path) -> None:
    """The commands default HF_HUB_OFFLINE to 1 and leave a value the user set alone."""
    code = (
        "import os, sys\n"
        "from oneke_plan.cli import common\n"
        "common.offline_and_quiet()\n"
        "print(os.environ['HF_HUB_OFFLINE'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    unset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    kept = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": value}, timeout=60
    )
    assert unset.stdout.strip() == "1", unset.stderr
    assert kept.stdout.strip() == value, kept.stderr
