"""torchrun's variables are not trusted: each of RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT and TORCHELASTIC_RESTART_COUNT that is not ASCII digits in its range (or, for MASTER_ADDR, a host) is
one line naming it (exit 2) before any worker waits for another or any file is made, and the workers' rendezvous
is bounded: a worker started without its peers says which of them did not come, within --join-timeout.

The rules are checked against Python's own reading of the same text (int() takes '²'? no; '１' and '٣'? yes, and
oneke-run does not), and the rendezvous against real processes on this machine (torch's TCPStore, gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import BadInput
from oneke_plan.extract.workers import Worker

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

BIN = Path(sys.executable).parent
TORCHRUN_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE",
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, deepke_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Profiles of two and three CPU replicas of the tiny model, and four DeepKE prompts."""
    folder = tmp_path_factory.mktemp("torchrun")
    inventory = folder / "inventory.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    common = [str(tiny_model_dir), "--inventory", str(inventory), "--max-input-tokens", "1024"]
    common += ["--max-new-tokens", "4", "--batch-size", "2"]
    paths = {"folder": folder, "model": tiny_model_dir, "input": folder / "in.jsonl"}
    for name, count in (("two", 2), ("three", 3)):
        paths[name] = folder / f"{name}.yaml"
        assert plan_main([*common, "--replicas", str(count), "-o", str(paths[name])]) == 0
    lines = (deepke_dir / "NER" / "test.json").read_text(encoding="utf-8").splitlines()[:4]
    paths["input"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _argv(setup: dict[str, Path], output: Path, profile: str = "two", *extra: str) -> list[str]:
    return [
        "--profile", str(setup[profile]), "--model", str(setup["model"]), "--input", str(setup["input"]),
        "--output", str(output), "--no-progress", *extra,
    ]  # fmt: skip


def _good(**changes: str | None) -> dict[str, str]:
    """Worker 0's variables as torchrun sets them for two workers on one node, with `changes` (None: unset)."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "0"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# Each variable with values that are not its kind of number, written in ASCII digits, within its range.
NOT_NUMBERS = ["abc", "²", "１", "٣", "-1", "", " 1", "1 ", "0x1", "1e3", "+1", "1.0", "9" * 40, "1\n2", "\u202e1"]
OUT_OF_RANGE = {
    "WORLD_SIZE": ["0"],
    "RANK": ["2", "3", "1000000"],
    "LOCAL_RANK": ["2", "99"],
    "LOCAL_WORLD_SIZE": ["0", "3"],
    "MASTER_PORT": ["0", "65536", "99999"],
    "TORCHELASTIC_RESTART_COUNT": ["10000000"],
}
CASES = [(name, value) for name in OUT_OF_RANGE for value in NOT_NUMBERS + OUT_OF_RANGE[name]]
CASES += [("MASTER_ADDR", value) for value in ["", "a b", "host\nname", "²", "x" * 300, "127.0.0.1;rm"]]
CASES += [("MASTER_ADDR", None), ("MASTER_PORT", None), ("RANK", None)]


@pytest.mark.parametrize(("name", "value"), CASES, ids=[f"{n}={v!r}"[:60] for n, v in CASES])
def test_each_torchrun_variable_not_a_number_in_range_is_one_line_before_anything_waits(
    name: str,
    value: str | None,
    setup: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, text in _good(**{name: value}).items():
        monkeypatch.setenv(variable, text)
    output = tmp_path / "out.jsonl"
    assert run_main(_argv(setup, output)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    shown = "not set" if value is None else repr(value)[:30]
    assert f"torchrun's {name} is {shown}" in err[0], err
    assert "torchrun --nproc-per-node 2 -m oneke_plan.cli.run" in err[0], err
    assert not list(tmp_path.iterdir())  # no journal, no lock, no output


def test_the_ascii_rule_is_stricter_than_python_and_the_same_numbers_pass() -> None:
    """The values Python's int() reads as numbers but oneke-run does not, and those both read the same way."""
    assert int("１") == 1 and int("٣") == 3 and int(" 1") == 1  # Python takes them...
    for text in ("１", "٣", " 1"):
        with pytest.raises(BadInput, match="RANK"):
            Worker.from_env(_good(RANK=text))
    worker = Worker.from_env(_good(RANK="1", LOCAL_RANK="1"))  # ...and what torchrun writes reads as it says
    assert (worker.rank, worker.world_size, worker.local_rank, worker.local_world_size) == (1, 2, 1, 2)
    assert (worker.master_addr, worker.master_port) == ("127.0.0.1", 29500)
    assert Worker.from_env({}) == Worker()  # no WORLD_SIZE: one process, whatever else is set
    assert Worker.from_env({"LOCAL_RANK": "x"}) == Worker()


def test_a_single_worker_without_master_addr_is_fine_and_two_are_not() -> None:
    one = Worker.from_env(_good(WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR=None, MASTER_PORT=None))
    assert not one.distributed
    with pytest.raises(BadInput, match="torchrun's MASTER_ADDR is not set; .* WORLD_SIZE=2"):
        Worker.from_env(_good(MASTER_ADDR=None), replicas=2)


def test_workers_the_profile_does_not_have_are_one_line_naming_its_replicas() -> None:
    """LOCAL_RANK beyond the profile's replicas, on a node of more workers than it has replicas."""
    env = _good(WORLD_SIZE="3", RANK="2", LOCAL_RANK="2", LOCAL_WORLD_SIZE="3")
    with pytest.raises(BadInput, match=r"the profile has 2 replicas .* torchrun started 3 .*--nproc-per-node 2"):
        Worker.from_env(env, replicas=2)
    with pytest.raises(BadInput, match=r"torchrun's LOCAL_RANK is '2'; .* from 0 to 1"):
        Worker.from_env(_good(LOCAL_RANK="2"), replicas=2)


# -- the rendezvous, for real ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(
    setup: dict[str, Path], output: Path, rank: int, world: int, port: int, profile: str = "two", wait: int = 3
) -> Any:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "oneke-run"), *_argv(setup, output, profile, "--join-timeout", str(wait))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ended(proc: Any) -> tuple[int, list[str]]:
    try:
        _, err = proc.communicate(timeout=240)  # the test never hangs, whatever the rendezvous does
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the worker was still waiting after 240 s") from None
    return proc.returncode, err.strip().splitlines()


@pytest.mark.parametrize("started", [0, 1], ids=["only worker 0", "only worker 1"])
def test_one_worker_of_two_names_the_missing_one_within_the_join_timeout(
    started: int, setup: dict[str, Path], tmp_path: Path
) -> None:
    port = _free_port()
    code, err = _ended(_worker(setup, tmp_path / "out.jsonl", started, 2, port))
    assert code == 2 and len(err) == 1, err
    if started == 0:  # it holds the rendezvous: worker 1 never came
        assert err[0] == (
            f"oneke-run: error: worker 1 of 2 did not join the rendezvous at 127.0.0.1:{port} within 3 s: start it "
            "(torchrun --nproc-per-node starts a node's workers together; each node needs its own torchrun), or "
            "give the workers longer with --join-timeout"
        )
    else:  # worker 0 holds it, and was never there
        assert err[0].startswith(
            f"oneke-run: error: worker 0 of 2 did not open the rendezvous at MASTER_ADDR:MASTER_PORT 127.0.0.1:{port} "
            "within 3 s: start it"
        ), err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_worker_waiting_for_the_others_stops_at_sigterm(setup: dict[str, Path], tmp_path: Path) -> None:
    """The wait is in short steps: a SIGTERM ends it at once (143 and its line), not after the join timeout."""
    port = _free_port()
    proc = _worker(setup, tmp_path / "out.jsonl", 0, 2, port, wait=600)
    deadline = time.monotonic() + 240
    while True:  # it listens: it waits at the rendezvous
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, err = _ended(proc)
    assert code == 143 and err == [
        "oneke-run: interrupted by SIGTERM: nothing was written yet: run the same command again"
    ], err


def test_two_workers_with_one_rank_are_told_and_the_missing_rank_is_named(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    port = _free_port()
    # 20 s, not 3: on a loaded machine a twin may take seconds to import torch, and must find the host still there
    host = _worker(setup, tmp_path / "out.jsonl", 0, 3, port, "three", wait=20)
    twins = [_worker(setup, tmp_path / "out.jsonl", 1, 3, port, "three", wait=20) for _ in range(2)]
    results = [_ended(proc) for proc in (host, *twins)]
    shown = "\n".join(f"exit {code}: " + "\n  ".join(err) for code, err in results)  # whole, not pytest's cut repr
    assert [code for code, _ in results] == [2, 2, 2], shown
    lines = [err[0] for _, err in results if len(err) == 1]
    assert len(lines) == 3, shown
    assert sum("another worker has this worker's RANK=1 (of WORLD_SIZE=3)" in line for line in lines) == 1, shown
    assert f"worker 2 of 3 did not join the rendezvous at 127.0.0.1:{port} within 20 s" in lines[0], shown


def test_a_join_timeout_that_is_not_a_duration_is_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for value in ("0", "-5", "9999999999"):
        assert run_main(_argv(setup, tmp_path / "out.jsonl", "two", f"--join-timeout={value}")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--join-timeout" in err[0], err
    assert not list(tmp_path.iterdir())
