"""oneke-run's output files without a model: the journal and its lock, the final output in input order with merged
lines, resume (answers kept, failures retried), and files that are not the tool's own, which are never touched."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from oneke_plan.core.errors import BadInput
from oneke_plan.extract import inputs, outputs
from oneke_plan.extract.answer_lines import answer_line, error_line
from oneke_plan.extract.inputs import PromptRecord
from oneke_plan.extract.outputs import RunOutput, journal_path
from oneke_plan.formats import answers

NER_TYPES = ["人物", "地点", "组织", "时间", "作品", "职位", "事件", "职业"]  # 8 types: 2 chunks of 4 per record


def make_input(tmp_path: Path, texts: tuple[str, ...] = ("张三在北京", "李四", "王五去上海")) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "entity": []}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    return path


def records_of(path: Path, schema: list[str] | None = None) -> list[PromptRecord]:
    return inputs.read_raw(path, "NER", schema or NER_TYPES, "zh", 4)


def answer(record: PromptRecord, tag: str = "") -> str:
    """A distinct, valid answer per prompt: the first schema type gets the prompt's key (and `tag`)."""
    first = json.loads(record.instruction)["schema"][0]
    return json.dumps({first: [record.key + tag]}, ensure_ascii=False)


def run_some(output: RunOutput, records: list[PromptRecord], fail: tuple[str, ...] = (), tag: str = "") -> None:
    """What the Runner does with the writer: longest first (here: reversed), failures as error lines."""
    assert output.writer is not None
    for record in reversed(records):
        if record.key in fail:
            output.writer.write_line(error_line(record, "out of memory even alone"))
        else:
            text = answer(record, tag)
            output.writer.write_line(answer_line(record, text, *answers.parse_output("NER", text)))


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def full_run(inp: Path, out: Path, records: list[PromptRecord], mode: str = "new", fail: tuple[str, ...] = ()) -> None:
    with RunOutput(out, inp, mode) as output:
        pending = output.start(records)
        run_some(output, pending, fail)
        output.finish(records)


# ---------------------------------------------------------------- a run from start to end


def test_output_is_in_input_order_with_a_merged_line_per_record(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    with RunOutput(out, inp, "new") as output:
        assert output.start(records) == records
        journal = journal_path(out)
        header = json.loads(journal.read_text(encoding="utf-8").splitlines()[0])
        assert header == {"oneke_run_journal": 1, "mode": "new", "pid": os.getpid()}
        assert not out.exists()  # nothing but the journal until every prompt has a line
        run_some(output, records)
        assert len(journal.read_text(encoding="utf-8").splitlines()) == 1 + len(records)
        assert output.finish(records) is True
    assert not journal.exists()
    lines = lines_of(out)
    expected_keys = ["1:0", "1:1", None, "2:0", "2:1", None, "3:0", "3:1", None]
    assert [line.get("key") for line in lines] == expected_keys
    for n in (2, 5, 8):
        merged, chunks = lines[n], lines[n - 2 : n]
        assert merged["merged"] is True and merged["chunks"] == [c["key"] for c in chunks]
        assert merged["id"] == chunks[0]["id"] and merged["label"] == chunks[0]["label"]
        assert merged["output"] == "{}"  # DeepKE's evaluator adds every line of an id: nothing counted twice
        assert merged["parsed"] == {**chunks[0]["parsed"], **chunks[1]["parsed"]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_single_chunk_records_get_no_merged_line(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp, ["人物"])
    full_run(inp, out, records)
    assert [line["key"] for line in lines_of(out)] == ["1:0", "2:0", "3:0"]


def test_journal_names_leave_room_for_one_per_worker(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert journal_path(out) == tmp_path / "out.jsonl.journal"
    assert journal_path(out, 2, 4) == tmp_path / "out.jsonl.journal-2-of-4"
    with pytest.raises(ValueError):
        journal_path(out, 4, 4)


def test_a_failed_start_leaves_no_journal(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    with RunOutput(out, inp, "new") as output:
        output.start(records_of(inp))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ---------------------------------------------------------------- the lock


def test_a_second_run_on_the_same_output_stops_at_once(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    with RunOutput(out, inp, "new") as first:
        first.start(records)
        run_some(first, records[:2])
        for mode in ("new", "resume", "overwrite"):
            with RunOutput(out, inp, mode) as second, pytest.raises(BadInput) as caught:
                second.start(records)
            message = str(caught.value)
            assert f"another oneke-run (pid {os.getpid()}) is writing it" in message and "\n" not in message
        assert len(journal_path(out).read_text(encoding="utf-8").splitlines()) == 3  # untouched by the others
    with RunOutput(out, inp, "resume") as third:  # the lock went with the first run
        assert [r.key for r in third.start(records)] == [r.key for r in records if r not in records[:2]]


# ---------------------------------------------------------------- resume


def test_a_killed_run_resumes_with_every_record_answered_once_in_input_order(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    with RunOutput(out, inp, "new") as output:  # killed after 3 answers: the journal stays, the lock goes
        output.start(records)
        run_some(output, records[3:])
    journal = journal_path(out)
    kept = journal.read_bytes()
    with journal.open("ab") as handle:
        handle.write(b'{"id": "abc", "instruction": "{\\"instr')  # the line the kill cut
    assert not out.exists()

    with RunOutput(out, inp, "resume") as output:
        pending = output.start(records)
        assert [r.key for r in pending] == [r.key for r in records[:3]]
        assert journal.read_bytes() == kept  # only the cut line went, once the journal was validated
        run_some(output, pending)
        output.finish(records)
    lines = [line for line in lines_of(out) if "key" in line]
    assert [line["key"] for line in lines] == [r.key for r in records]
    assert all(line["parsed"] == json.loads(answer(r)) for line, r in zip(lines, records, strict=True))


def test_resume_retries_failed_prompts_and_keeps_every_answer(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    full_run(inp, out, records, fail=("1:1", "3:0"))
    first = lines_of(out)
    assert [line["key"] for line in first if "error" in line] == ["1:1", "3:0"]
    assert first[2]["failed_chunks"] == ["1:1"]
    with RunOutput(out, inp, "resume") as output:
        pending = output.start(records)
        assert [r.key for r in pending] == ["1:1", "3:0"]
        run_some(output, pending)
        output.finish(records)
    second = lines_of(out)
    assert not any("error" in line or "failed_chunks" in line for line in second)
    unchanged = [n for n, line in enumerate(first) if "key" in line and "error" not in line]
    assert all(second[n] == first[n] for n in unchanged)


def test_resume_with_nothing_to_do_changes_nothing(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    full_run(inp, out, records)
    before = out.read_bytes(), out.stat().st_ino
    with RunOutput(out, inp, "resume") as output:
        assert output.start(records) == []
        assert output.finish(records) is False
    assert (out.read_bytes(), out.stat().st_ino) == before
    assert not journal_path(out).exists()


def test_resume_finishes_an_output_from_answers_left_in_the_journal(tmp_path: Path) -> None:
    """Killed after the last answer, before the output was written: --resume writes it without a model."""
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    with RunOutput(out, inp, "new") as output:
        output.start(records)
        run_some(output, records)
    with RunOutput(out, inp, "resume") as output:
        assert output.start(records) == []
        assert output.finish(records) is True
    assert [line.get("key") for line in lines_of(out)][:2] == ["1:0", "1:1"]


def test_resume_refuses_the_output_of_another_input(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    full_run(inp, out, records_of(inp))
    before = out.read_bytes()
    with RunOutput(out, inp, "resume") as output, pytest.raises(BadInput, match="written for another prompt"):
        output.start(records_of(inp, list(reversed(NER_TYPES))))
    shorter = make_input(tmp_path / "", ("张三在北京",))
    with RunOutput(out, shorter, "resume") as output, pytest.raises(BadInput, match="this input does not have"):
        output.start(records_of(shorter))
    assert out.read_bytes() == before and not journal_path(out).exists()


def test_an_interrupted_overwrite_never_mixes_in_the_old_answers(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    full_run(inp, out, records)
    old = out.read_bytes()
    with RunOutput(out, inp, "overwrite") as output:
        output.start(records)
        run_some(output, records[:1], tag="new")
    assert out.read_bytes() == old  # the old output stays until the new one is complete
    with RunOutput(out, inp, "resume") as output:
        assert len(output.start(records)) == len(records) - 1  # the old output's answers are not kept
        run_some(output, records[1:], tag="new")
        output.finish(records)
    lines = [line for line in lines_of(out) if "key" in line]
    assert all(line["parsed"] == json.loads(answer(r, "new")) for line, r in zip(lines, records, strict=True))


# ---------------------------------------------------------------- files that are not ours


def test_a_new_run_refuses_an_existing_output_or_journal(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    out.write_bytes(b"")  # an empty file is nobody's output: only --overwrite replaces it
    with RunOutput(out, inp, "new") as output, pytest.raises(BadInput, match="is empty.*pass --overwrite"):
        output.start(records)
    out.write_bytes(b'{"id": 1, "output": "x"}\n')  # another program's: --overwrite would not help either
    with RunOutput(out, inp, "new") as output, pytest.raises(BadInput, match="not an output of oneke-run") as caught:
        output.start(records)
    assert "pass --overwrite" not in str(caught.value)
    out.unlink()
    with RunOutput(out, inp, "new") as output:
        output.start(records)
        run_some(output, records[:2])
    with RunOutput(out, inp, "new") as output, pytest.raises(BadInput, match="interrupted run left 2 answers"):
        output.start(records)


FOREIGN = {
    "text with a partial last line": b"my notes\nmore notes, no newline",
    "binary": b"\x93NUMPY\x01\x00" + bytes(range(256)),
    "empty": b"",
    "JSON lines of another program": b'{"id": 1, "output": "x"}\n',
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_resume_never_modifies_a_file_that_is_not_its_output(tmp_path: Path, name: str) -> None:
    inp, out = make_input(tmp_path), tmp_path / "notes.txt"
    out.write_bytes(FOREIGN[name])
    with RunOutput(out, inp, "resume") as output, pytest.raises(BadInput) as caught:
        output.start(records_of(inp))
    assert "not an output of oneke-run" in str(caught.value) or "not an answer line" in str(caught.value)
    assert out.read_bytes() == FOREIGN[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "notes.txt"]


def test_a_journal_that_is_not_ours_is_left_as_it_is(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    journal_path(out).write_bytes(b"keep me\n")
    for mode in ("new", "resume", "overwrite"):
        with RunOutput(out, inp, mode) as output, pytest.raises(BadInput, match="not a journal"):
            output.start(records_of(inp))
        assert journal_path(out).read_bytes() == b"keep me\n"


@pytest.mark.parametrize("mode", outputs.MODES)
def test_special_files_are_never_deleted_or_replaced(tmp_path: Path, mode: str, make_special_file) -> None:  # type: ignore[no-untyped-def]
    inp = make_input(tmp_path)
    for name in ("FIFO", "device", "hard link", "symbolic link"):
        path = make_special_file(name, tmp_path / name.replace(" ", "-"))
        before = os.lstat(path)
        with RunOutput(path, inp, mode) as output, pytest.raises(BadInput) as caught:
            output.start(records_of(inp))
        assert "never replaced" in str(caught.value) or "hard links" in str(caught.value), name
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_nlink) == (before.st_ino, before.st_mode, before.st_nlink)
        assert not journal_path(path).exists()


def test_the_output_changed_during_the_run_is_left_as_it_is(tmp_path: Path) -> None:
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    with RunOutput(out, inp, "new") as output:
        output.start(records)
        run_some(output, records)
        out.write_bytes(b"written by someone else meanwhile\n")
        with pytest.raises(BadInput, match="changed while this command ran"):
            output.finish(records)
    assert out.read_bytes() == b"written by someone else meanwhile\n"
    assert journal_path(out).exists()  # the answers are kept for --resume


# ---------------------------------------------------------------- write errors


def test_disk_full_while_journaling_is_one_line_and_keeps_the_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated (the real thing, on a small tmpfs, is in test_cli_run_errors): the third write fails."""
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"
    records = records_of(inp)
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with RunOutput(out, inp, "new") as output:
        output.start(records)
        monkeypatch.setattr(inputs.os, "write", write)
        with pytest.raises(BadInput) as caught:
            run_some(output, records)
        monkeypatch.undo()
    message = str(caught.value)
    assert str(journal_path(out)) in message and "No space left on device" in message and "\n" not in message
    assert len(journal_path(out).read_text(encoding="utf-8").splitlines()) == 3  # header + the two answers


def test_a_folder_that_refuses_new_files_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied, simulated: this suite runs as root, which a chmod does not stop (test_cli_run_errors
    uses a real read-only mount where it can)."""
    inp, out = make_input(tmp_path), tmp_path / "out.jsonl"

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    with RunOutput(out, inp, "new") as output, pytest.raises(BadInput) as caught:
        output.start(records_of(inp))
    assert f"{tmp_path}: cannot create the run's journal in this folder (Permission denied)" in str(caught.value)
