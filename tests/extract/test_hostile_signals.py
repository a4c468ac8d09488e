"""Signals, however many and whenever: SIGTERM and SIGINT in any phase of a run (start, resume reading, loading,
generating, writing a line, the final flush), one after another, end with 143 / 130 and the one documented line,
and leave files --resume continues: the journal whole lines only, the output written once and whole, and after the
last --resume the same answer lines as a run that was never interrupted (same keys, each once, in input order).

In this process the first signal is sent at a phase (our own functions, wrapped: nothing of torch or transformers
is replaced), and every later one at the Nth Python call after it (sys.setprofile), wherever the run then is: in
the unwinding, a finally block, the line being printed. In a child process (the command itself) the signals come
as a supervisor's do, a burst at a state seen from outside: the journal open, answers growing, the output there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oneke_plan.cli import plan as plan_cli
from oneke_plan.cli import run as run_cli
from oneke_plan.core import stops
from oneke_plan.extract.outputs import is_merged_line, is_prompt_line, journal_path

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(
    tiny_model_dir: Path, deepke_dir: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: None
) -> dict[str, Path]:
    """A CPU profile, 12 RE prompts, and the output of a run nobody interrupted (the reference)."""
    folder = tmp_path_factory.mktemp("signals")
    profile = folder / "tiny-cpu.yaml"
    argv = [str(tiny_model_dir), "--max-input-tokens", "1024", "--max-new-tokens", "4", "--batch-size", "2"]
    assert plan_cli.main([*argv, "-o", str(profile)]) == 0
    source = folder / "re.json"
    source.write_text("".join((deepke_dir / "RE" / "test.json").read_text(encoding="utf-8").splitlines(True)[:12]))
    paths = {"profile": profile, "model": tiny_model_dir, "input": source, "reference": folder / "reference.jsonl"}
    assert run_cli.main(_argv(paths, paths["reference"])) == 0
    return paths


def _argv(paths: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "--profile", str(paths["profile"]), "--model", str(paths["model"]), "--input", str(paths["input"]),
        "--output", str(output), "--no-progress", *extra,
    ]  # fmt: skip


def _answer_keys(path: Path) -> list[tuple[Any, Any]]:
    """(id, key) of every line of a finished output, each checked to be one of oneke-run's lines."""
    lines = [json.loads(raw) for raw in path.read_bytes().split(b"\n")[:-1]]
    assert path.read_bytes().endswith(b"\n")
    assert all(is_prompt_line(line) or is_merged_line(line) for line in lines)
    return [(line.get("id"), line.get("key")) for line in lines]


def _check_journal(journal: Path) -> list[str]:
    """The keys a journal holds: a header, then whole answer lines only (no torn line), each key once."""
    raw = journal.read_bytes()
    assert raw.endswith(b"\n"), "a torn last line"
    header, *lines = [json.loads(line) for line in raw.split(b"\n")[:-1]]
    assert header.get("oneke_run_journal") == 1
    assert all(is_prompt_line(line) for line in lines)
    keys = [line["key"] for line in lines]
    assert len(keys) == len(set(keys)), "a prompt journaled twice"
    return keys


def _check_resumable(paths: dict[str, Path], output: Path) -> None:
    """What an interrupted run left: a whole journal, or a whole output; then --resume ends with the reference."""
    journal = journal_path(output)
    if journal.exists():
        _check_journal(journal)
    if output.exists():
        _answer_keys(output)
    assert run_cli.main(_argv(paths, output, "--resume")) == 0
    assert not journal.exists()
    assert _answer_keys(output) == _answer_keys(paths["reference"])


# -- in this process -------------------------------------------------------------------------------------------------


class Barrage:
    """`count` signals: the first when fire() is called (at a phase), each later one `step` Python calls after the
    one before, wherever the run is by then; never once the command has given back its handler."""

    def __init__(self, signum: int, count: int, step: int) -> None:
        self.signum, self.left, self.step, self.calls = signum, count, step, 0

    def _send(self) -> None:
        if self.left and signal.getsignal(self.signum) is stops.on_signal:
            self.left -= 1
            os.kill(os.getpid(), self.signum)

    def fire(self) -> None:
        if self.calls:  # fired already
            return
        self.calls = 1
        try:
            self._send()
            deadline = time.monotonic() + 60
            while stops.seen() is None and time.monotonic() < deadline:
                pass  # the handler runs at the next bytecode: it raises here, or (in a held block) notes the signal
        finally:
            # only now: a handler that raised inside the profile function would switch the profile off
            sys.setprofile(self._profile)

    def _profile(self, frame: object, event: str, arg: object) -> None:
        if event in ("call", "c_call"):
            self.calls += 1
            if self.calls % self.step == 0:
                self._send()


@pytest.fixture()
def barrage() -> Iterator[Callable[[int, int, int], Barrage]]:
    made: list[Barrage] = []

    def make(signum: int, count: int, step: int) -> Barrage:
        made.append(Barrage(signum, count, step))
        return made[-1]

    try:
        yield make
    finally:
        sys.setprofile(None)


def _at(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, fire: Callable[[], None], after: int = 0) -> None:
    """Call `fire` at the (after+1)th call of owner.name (one of ours), then the function itself."""
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > after:
            fire()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _phase(monkeypatch: pytest.MonkeyPatch, phase: str, fire: Callable[[], None]) -> None:
    from oneke_plan.api import running
    from oneke_plan.extract import answer_lines, outputs, runner
    from oneke_plan.load import loader

    where = {
        "start": (running, "preflight", 0),
        "resume reading": (outputs, "_parse_journal", 0),
        "loading": (loader, "load_model", 0),
        "generating": (runner.Runner, "_answer", 2),  # after two more answers
        "writing": (answer_lines, "write_all", 2),  # inside a line's write: it ends whole first
        "final flush": (outputs, "write_atomic", 0),  # inside: the output is written, then the stop
    }
    owner, name, after = where[phase]
    _at(monkeypatch, owner, name, fire, after)


@pytest.fixture(scope="module")
def torch_threads() -> Iterator[None]:
    """One torch thread for the module's runs (tiny models gain nothing from more, on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PHASES = ["start", "resume reading", "loading", "generating", "writing", "final flush"]


@pytest.fixture(scope="module")
def partial(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The journal a run stopped by one SIGTERM after its third answer left (what each --resume below starts from)."""
    from oneke_plan.extract import runner

    output = tmp_path_factory.mktemp("partial") / "out.jsonl"
    with pytest.MonkeyPatch.context() as monkeypatch:
        one = Barrage(signal.SIGTERM, 1, 1)
        _at(monkeypatch, runner.Runner, "_answer", one.fire, after=3)
        try:
            assert run_cli.main(_argv(setup, output)) == 143
        finally:
            sys.setprofile(None)
    assert one.left == 0 and not output.exists()
    assert len(_check_journal(journal_path(output))) == 3
    return journal_path(output)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize(
    ("signum", "count", "step"),
    [(signal.SIGTERM, 2, 1), (signal.SIGTERM, 3, 5), (signal.SIGINT, 3, 2)],
    ids=["2xSIGTERM", "3xSIGTERM", "3xSIGINT"],
)
def test_signals_in_any_phase_of_a_resumed_run_end_in_one_line_and_leave_resumable_files(
    phase: str,
    signum: int,
    count: int,
    step: int,
    setup: dict[str, Path],
    partial: Path,
    barrage: Callable[[int, int, int], Barrage],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "out.jsonl"
    journal = journal_path(output)
    journal.write_bytes(partial.read_bytes())
    shots = barrage(signum, count, step)
    _phase(monkeypatch, phase, shots.fire)
    code = run_cli.main(_argv(setup, output, "--resume"))
    sys.setprofile(None)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert shots.left == 0, "not every signal was sent while the command ran"
    name = signal.Signals(signum).name
    assert code == 128 + signum, err
    assert "Traceback" not in err and "internal error" not in err
    ours = [line for line in err.splitlines() if line.startswith("oneke-run: interrupted")]
    assert len(ours) == 1 and err.splitlines()[-1] == ours[0], err
    kept = f"every answer so far is kept in {journal}: run the same command with --resume to continue"
    expected = {
        "start": f"oneke-run: interrupted by {name}: nothing was written yet: run the same command again",
        "final flush": f"oneke-run: interrupted by {name}: {output} was already complete",
    }.get(phase, f"oneke-run: interrupted by {name}: {kept}")
    assert ours[0] == expected
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    if phase == "final flush":
        assert output.exists() and not journal.exists()
    else:
        assert not output.exists() and len(_check_journal(journal)) >= 3
    if phase == "generating":  # stopped before its third answer was written
        assert len(_check_journal(journal)) == 3 + 2
    if phase == "writing":  # stopped inside its third answer's write: the line is written whole first
        assert len(_check_journal(journal)) == 3 + 3
    _check_resumable(setup, output)


def test_a_signal_inside_a_held_block_waits_for_its_end_and_later_ones_are_ignored() -> None:
    from oneke_plan.cli.common import stop_signals

    done = []
    with stop_signals(owns_process=False):
        stops.arm()
        try:
            with pytest.raises(stops.Stopped) as stopped:
                with stops.held():
                    os.kill(os.getpid(), signal.SIGTERM)
                    assert stops.seen() == signal.SIGTERM  # the handler ran, and did not raise in here
                    os.kill(os.getpid(), signal.SIGINT)
                    done.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # stopping: ignored
            done.append(True)
        finally:
            assert stops.disarm() == signal.SIGTERM
    assert done == [True, True] and stopped.value.signum == signal.SIGTERM


# -- the command itself ----------------------------------------------------------------------------------------------


def _command(paths: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [str(BIN / "oneke-run"), *_argv(paths, output, *extra)]


def _until(proc: subprocess.Popen[str], seen: Callable[[], bool], what: str) -> None:
    """Wait until `seen()`, while the run goes on; the test cannot hang (a deadline), and says what it missed."""
    deadline = time.monotonic() + 300
    while not seen():
        assert proc.poll() is None, f"the run ended before {what}: make the workload longer"
        assert time.monotonic() < deadline, f"no {what} within 300 s"
        time.sleep(0.005)


def _holds(proc: subprocess.Popen[str], path: Path) -> bool:
    """Whether the process has `path` open (Linux: /proc/PID/fd), i.e. holds the journal's lock."""
    try:
        links = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
    except OSError:
        return False
    return str(path) in links


def _burst(proc: subprocess.Popen[str], count: int) -> tuple[int, str]:
    """`count` SIGTERMs a few milliseconds apart (as a supervisor that repeats itself), then the exit code and
    stderr."""
    for _ in range(count):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        time.sleep(0.003)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/PID/fd to see the journal held")
def test_sigterm_bursts_on_the_command_in_each_phase_of_resumed_runs(
    setup: dict[str, Path], partial: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    journal = journal_path(output)
    journal.write_bytes(partial.read_bytes())
    kept = (
        f"oneke-run: interrupted by SIGTERM: every answer so far is kept in {journal}: run the same command with "
        "--resume to continue"
    )
    # 3 SIGTERMs once it holds the journal: reading it, checking the machine or loading
    proc = subprocess.Popen(_command(setup, output, "--resume"), stderr=subprocess.PIPE, text=True)
    _until(proc, lambda: _holds(proc, journal), "journal held")
    code, err = _burst(proc, 3)
    assert code == 143 and err.strip().splitlines()[-1] == kept and "Traceback" not in err, err
    done = len(_check_journal(journal))
    # 2 SIGTERMs while it answers
    proc = subprocess.Popen(_command(setup, output, "--resume"), stderr=subprocess.PIPE, text=True)
    _until(proc, lambda: len(_check_journal(journal)) > done, "new answer")
    code, err = _burst(proc, 2)
    assert code == 143 and err.strip().splitlines()[-1] == kept and "Traceback" not in err, err
    assert not output.exists()
    # 3 SIGTERMs once the output is there: writing it, printing the totals, or leaving (the interpreter's teardown),
    # never the raw signal: 143 with its line if the stop came before the run was through, else the run's own end
    proc = subprocess.Popen(_command(setup, output, "--resume"), stderr=subprocess.PIPE, text=True)
    _until(proc, output.exists, "output")
    code, err = _burst(proc, 3)
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    assert (code, last) == (143, f"oneke-run: interrupted by SIGTERM: {output} was already complete") or (
        code == 0 and "prompts answered" in err
    ), (code, err)
    _check_resumable(setup, output)
