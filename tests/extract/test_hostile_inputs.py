"""Huge inputs cost bounded memory: an input line over limits.MAX_INPUT_LINE_BYTES is that line's error (the other
lines run), read without ever being held whole (oneke_plan.io.lines); what cannot be JSON (/dev/zero) is refused
from its first bytes; a file over its bound is refused by its size before it is read, or as a pipe passes it.

The lines are built to the byte, at the real bound (2 MiB): just under, at, and over it. Memory is measured as the
peak resident size of one oneke-run process (os.wait4's rusage for that child alone), against the same run
without the huge line. No time is asserted.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from hostile import cli, measured

from oneke_plan.cli import plan as plan_cli
from oneke_plan.core.errors import BadInput
from oneke_plan.extract import inputs
from oneke_plan.extract.outputs import RunOutput, read_output
from oneke_plan.io import jsonfile, lines
from oneke_plan.io.limits import MAX_ANSWER_LINE_BYTES, MAX_INPUT_BYTES, MAX_INPUT_LINE_BYTES, MAX_JSON_BYTES

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

BIN = Path(sys.executable).parent
DEEPKE_NER = Path(__file__).resolve().parents[2] / "examples" / "deepke" / "NER" / "test.json"
GOOD = DEEPKE_NER.read_text(encoding="utf-8").splitlines()[:3]
MiB = 2**20


def converted_line(record_id: str, size: int) -> str:
    """A converted NER line (DeepKE's first test line, its input padded with 'x') of exactly `size` UTF-8 bytes."""
    line = json.loads(GOOD[0])
    instruction = json.loads(line["instruction"])

    def build(pad: int) -> str:
        text = json.dumps({**instruction, "input": "x" * pad}, ensure_ascii=False)
        return json.dumps({"id": record_id, "instruction": text, "label": line["label"]}, ensure_ascii=False)

    pad = size - len(build(0).encode("utf-8"))
    assert pad >= 0
    built = build(pad)
    assert len(built.encode("utf-8")) == size
    return built


def write_lines(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


# -- the bound, to the byte ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""], ids=["LF", "CRLF", "no newline at the end"])
def test_a_line_just_under_at_and_over_the_bound(tmp_path: Path, ending: str) -> None:
    # "\r" is part of the line (JSON whitespace), so a CRLF line is one byte longer than its LF twin
    at = MAX_INPUT_LINE_BYTES - ending.count("\r")
    for order in ([at - 1, at, at + 1], [at + 1, at, at - 1]):
        texts = [converted_line(str(size - at), size) for size in order]
        path = tmp_path / "in.json"
        path.write_bytes(((ending or "\n").join(texts) + ending).encode("utf-8"))
        records = inputs.read_converted(path)
        assert [(r.key, r.id) for r in records] == [(str(n), str(size - at)) for n, size in enumerate(order, 1)]
        assert [r.error is None for r in records] == [size <= at for size in order]
        over = records[order.index(at + 1)]
        assert over.instruction == "" and f"input line {over.key} is longer than 2.00 MiB" in (over.error or "")
        read = records[1]  # at the bound: read whole
        assert len(read.text) == len(json.loads(json.loads(texts[1])["instruction"])["input"])


def test_a_huge_raw_text_line_is_its_own_error_with_its_input_id(tmp_path: Path) -> None:
    huge = json.dumps({"id": "mine", "text": "x" * (3 * MiB)})
    path = write_lines(tmp_path / "raw.json", [json.dumps({"text": "OneKE"}), huge, json.dumps({"text": "DeepKE"})])
    records = inputs.read_raw(path, "NER", ["person", "place"], "en")
    assert [r.key for r in records] == ["1:0", "2:0", "3:0"]
    unread = records[1]
    assert unread.error is not None and unread.id is None and unread.extra["input_id"] == "mine"
    assert len({r.group for r in records}) == 3  # never merged with another record


@pytest.mark.parametrize(
    ("head", "needle"),
    [
        (b"\0" * 16, "control character U+0000 at column 1"),
        (b'{"id": 1, "instruction": "\x01', "control character U+0001 at column 27"),
        (b"[1, 2, 3, ", "expected a JSON object, and the line starts with '['"),
        (b'{"id": "\xff', "not UTF-8 text"),
    ],
)
def test_a_long_line_that_cannot_be_json_is_a_bad_line(tmp_path: Path, head: bytes, needle: str) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(GOOD[0].encode() + b"\n" + head + b"x" * (MAX_INPUT_LINE_BYTES + 10) + b"\n")
    with pytest.raises(BadInput, match=rf"^{re.escape(str(path))}, line 2: .*{re.escape(needle)}"):
        inputs.read_converted(path)


def test_a_long_line_cut_inside_a_character_is_still_utf8(tmp_path: Path) -> None:
    """The head ends at a byte count, which may fall inside a 3-byte character: that is no encoding error."""
    start = '{"id": "cut", "instruction": "'
    assert (MAX_INPUT_LINE_BYTES - len(start)) % 3 != 0  # the head ends inside a character
    line = start + "字" * (MAX_INPUT_LINE_BYTES // 3 + 5) + '"}'
    path = write_lines(tmp_path / "in.json", [GOOD[0], line])
    assert [r.id for r in inputs.read_converted(path)] == [json.loads(GOOD[0])["id"], "cut"]


# -- files and streams over their bound ----------------------------------------------------------------------------


def test_an_input_larger_than_its_bound_is_refused_by_its_size_before_reading(tmp_path: Path) -> None:
    """A sparse file of good lines and then 4 GiB of holes: only its size (fstat) can refuse it with this line; read,
    the holes' NUL bytes would give another message."""
    path = write_lines(tmp_path / "in.json", GOOD)
    os.truncate(path, MAX_INPUT_BYTES + 1)
    with pytest.raises(BadInput, match=rf"^{path}: larger than 4.00 GiB \(it is 4.00 GiB\)"):
        inputs.read_converted(path)


def test_a_json_file_larger_than_its_bound_is_refused_by_its_size(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_bytes(b'["person", ')
    os.truncate(schema, MAX_JSON_BYTES + 1)
    with pytest.raises(BadInput, match=rf"^{schema}: larger than 256.00 MiB \(it is 256.00 MiB\)"):
        jsonfile.read_bounded(schema, MAX_JSON_BYTES, "give the schema itself")


def _feed(path: Path, chunks: list[bytes], repeat: bytes = b"", repeat_bytes: int = 0) -> threading.Thread:
    """A producer writing `chunks`, then `repeat` until `repeat_bytes` are written, into the FIFO `path`, then
    closing it: bounded data, so a reader without a bound ends (and its test fails) instead of hanging. A reader
    that stops early makes the producer's write fail (EPIPE), which ends the producer."""

    def produce() -> None:
        try:
            with open(path, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                written = 0
                while written < repeat_bytes:
                    handle.write(repeat)
                    written += len(repeat)
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread


def test_a_fifo_of_nul_bytes_is_refused_at_its_first_line(tmp_path: Path) -> None:
    """/dev/zero through a FIFO: one endless line of NUL bytes, refused from its first 2 MiB."""
    fifo = tmp_path / "zeros"
    os.mkfifo(fifo)
    producer = _feed(fifo, [], b"\0" * MiB, MAX_INPUT_BYTES)  # 4 GiB offered
    with pytest.raises(BadInput, match="line 1: not JSON \\(the control character U\\+0000"):
        inputs.read_converted(fifo)
    producer.join(timeout=60)
    assert not producer.is_alive()  # it stopped at EPIPE, long before 4 GiB


def test_a_fifo_with_a_huge_line_among_good_ones(tmp_path: Path) -> None:
    fifo = tmp_path / "in.json"
    os.mkfifo(fifo)
    head = [(GOOD[0] + "\n").encode(), b'{"id": "huge", "instruction": "']
    tail = [b'"}\n', (GOOD[1] + "\n").encode()]
    producer = _feed(fifo, head + [b"x" * (5 * MiB)] + tail)
    records = inputs.read_converted(fifo)
    producer.join(timeout=60)
    ids = [json.loads(GOOD[0])["id"], "huge", json.loads(GOOD[1])["id"]]
    assert [r.id for r in records] == ids and [r.error is not None for r in records] == [False, True, False]


def test_a_stream_that_never_ends_is_refused_at_its_bound(tmp_path: Path) -> None:
    """A FIFO whose line never ends (here: 64 MiB offered, the bound 8 MiB): counted as it is read, never held."""
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    producer = _feed(fifo, [b'{"id": 1, "instruction": "'], b"x" * MiB, 64 * MiB)
    found = []
    with pytest.raises(BadInput, match=f"^{fifo}: larger than 8.00 MiB, more than any file of its kind; split it"):
        for number, line in lines.read_lines(fifo, MAX_INPUT_LINE_BYTES, 8 * MiB, "split it"):
            found.append((number, type(line).__name__, len(line.head) if isinstance(line, lines.LongLine) else 0))
    producer.join(timeout=60)
    assert found == [(1, "LongLine", MAX_INPUT_LINE_BYTES)]
    json_fifo = tmp_path / "schema"
    os.mkfifo(json_fifo)
    producer = _feed(json_fifo, [b"["], b"1, " * 1000, 64 * MiB)
    with pytest.raises(BadInput, match=f"^{json_fifo}: larger than 1.00 MiB"):
        jsonfile.read_bounded(json_fifo, MiB, "give the schema itself")
    producer.join(timeout=60)


def test_dev_zero_as_a_json_file_is_refused_at_its_first_chunk() -> None:
    with pytest.raises(BadInput, match="^/dev/zero: holds a NUL byte \\(at byte 0\\)"):
        jsonfile.read_bounded("/dev/zero", MAX_JSON_BYTES, "give the schema itself")


# -- oneke-run, memory measured ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_profile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile-inputs") / "tiny.yaml"
    argv = [str(tiny_model_dir), "--max-input-tokens", "1024", "--max-new-tokens", "4", "--batch-size", "2"]
    assert plan_cli.main([*argv, "-o", str(out)]) == 0
    return out


def run_measured(argv: list[str], folder: Path) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident bytes) of one oneke-run process (hostile.measured)."""
    done = measured([*cli("oneke-run"), *argv, "--no-progress"], cwd=folder)
    return done.code, done.stderr, done.peak_bytes


def test_a_100mb_line_among_good_lines_is_its_error_line_in_bounded_memory(
    tiny_profile: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    common = ["--profile", str(tiny_profile), "--model", str(tiny_model_dir)]
    good = write_lines(tmp_path / "good.json", GOOD)
    code, err, baseline = run_measured([*common, "--input", str(good), "--output", str(tmp_path / "g.out")], tmp_path)
    assert code == 0, err

    huge = tmp_path / "huge.json"
    with open(huge, "w", encoding="utf-8") as handle:
        handle.write(GOOD[0] + "\n" + '{"id": "huge", "instruction": "')
        for _ in range(100):
            handle.write("x" * 10**6)
        handle.write('"}\n' + GOOD[1] + "\n" + GOOD[2] + "\n")
    out = tmp_path / "h.out"
    code, err, peak = run_measured([*common, "--input", str(huge), "--output", str(out)], tmp_path)
    assert code == 0, err
    assert "1 prompts too long" in err
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in answers] == [json.loads(GOOD[0])["id"], "huge", *(json.loads(g)["id"] for g in GOOD[1:])]
    assert [a["key"] for a in answers] == ["1", "2", "3", "4"]
    assert [("error" in a, "raw_output" in a) for a in answers] == [(False, True), (True, False), (False, True)] + [
        (False, True)
    ]
    assert "input line 2 is longer than 2.00 MiB" in answers[1]["error"]
    # the line was never held: not even one copy of its 100 MB beyond what the good file's run took
    assert peak - baseline < 100 * 10**6, (peak, baseline)

    code, err, zero = run_measured([*common, "--input", "/dev/zero", "--output", str(tmp_path / "z.out")], tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "/dev/zero, line 1: not JSON (the control character U+0000" in err
    assert zero < baseline + 16 * MiB, (zero, baseline)


# -- --resume onto files that are no output ------------------------------------------------------------------------


def _peak_python_bytes(call) -> int:  # type: ignore[no-untyped-def]
    """The most memory Python allocated while `call()` ran (tracemalloc: a whole-file read shows as its size)."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("first", [b"not an answer line\n", b"x" * (MAX_ANSWER_LINE_BYTES + 1)], ids=["junk", "long"])
def test_resume_onto_a_huge_file_that_is_no_output_reads_its_first_line_only(tmp_path: Path, first: bytes) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(first)
    os.truncate(path, 512 * MiB)  # sparse: no disk used

    def resume() -> None:
        with pytest.raises(BadInput, match=f"^--output {path}, line 1: not an answer line of oneke-run"):
            read_output(path)

    assert _peak_python_bytes(resume) < 64 * MiB  # a line of at most 16 MiB read, never the 512 MiB


@pytest.mark.parametrize("name", ["out.jsonl.journal", "out.jsonl.journal-1-of-2"], ids=["own", "another worker's"])
def test_resume_onto_a_huge_journal_that_is_no_journal_reads_its_head_only(tmp_path: Path, name: str) -> None:
    journal = tmp_path / name
    journal.write_bytes(b'{"not": "a journal header"}\n')
    os.truncate(journal, 512 * MiB)
    records = inputs.read_converted(write_lines(tmp_path / "in.json", GOOD))

    def resume() -> None:
        with pytest.raises(BadInput, match=f"^{journal}: not a journal of this oneke-run version"):
            with RunOutput(tmp_path / "out.jsonl", tmp_path / "in.json", "resume") as output:
                output.start(records)

    assert _peak_python_bytes(resume) < 16 * MiB
