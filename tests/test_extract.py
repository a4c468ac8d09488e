"""Input reading, output writing and resume, on DeepKE's sample files and on broken files made in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from oneke_plan import extract, oneke
from oneke_plan.errors import EXIT_BAD_INPUT, BadInput

DEEPKE = Path(__file__).resolve().parents[1] / "examples" / "deepke"
TASK_DIRS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def schema_of(task: str) -> oneke.Schema:
    return oneke.load_schema_file(str(DEEPKE / task / "schema.json"), task)


# ---------------------------------------------------------------- converted files


@pytest.mark.parametrize("task", TASK_DIRS)
def test_read_converted_deepke_test_file(task: str) -> None:
    path = DEEPKE / task / "test.json"
    lines = json_lines(path)
    records = extract.read_converted(path)
    assert len(records) == len(lines)
    assert len({r.key for r in records}) == len(records)
    for record, line in zip(records, lines, strict=True):
        assert record.task == task
        assert record.id == line["id"]
        assert record.instruction == line["instruction"]  # passed on unchanged
        assert record.text == json.loads(line["instruction"])["input"]
        assert record.extra == {k: v for k, v in line.items() if k not in ("id", "instruction")}
        assert record.extra["label"] == line["label"]


def test_read_converted_keys_are_line_numbers(tmp_path: Path) -> None:
    source = (DEEPKE / "NER" / "test.json").read_text(encoding="utf-8").split("\n")
    path = tmp_path / "in.json"
    path.write_text("\n".join([source[0], "", source[1]]) + "\n", encoding="utf-8")
    assert [r.key for r in extract.read_converted(path)] == ["1", "3"]


def test_task_field_wins_and_reserved_fields_are_dropped(tmp_path: Path) -> None:
    line = json_lines(DEEPKE / "NER" / "test.json")[0]
    line.update(task="ner", output="old answer", key="9", parsed={})
    path = tmp_path / "in.json"
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = extract.read_converted(path)
    assert record.task == "NER"
    assert record.extra == {"label": line["label"], "task": "ner"}


def write_lines(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "input.json"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines) + b"\n")
    return path


GOOD = json.dumps(json_lines(DEEPKE / "NER" / "test.json")[0], ensure_ascii=False)


def instruction_line(instruction: Any, **fields: Any) -> str:
    return json.dumps({"id": "a", "instruction": instruction, **fields}, ensure_ascii=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": "\xff"}', "line 2: not UTF-8"),
        ("{not json", "line 2: not JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"instruction": "{}"}', "line 2: missing field 'id'"),
        ('{"id": "a"}', "line 2: missing field 'instruction'"),
        (instruction_line({"instruction": "x"}), "line 2: 'instruction' must be a string"),
        (instruction_line("{oops"), "line 2: 'instruction' is not valid JSON"),
        (instruction_line('["x"]'), "line 2: 'instruction' must encode a JSON object"),
        (instruction_line('{"instruction": "x", "input": "y"}'), "lacks schema"),
        (instruction_line('{"instruction": 1, "schema": [], "input": "y"}'), "'instruction' must be a string"),
        (instruction_line('{"instruction": "x", "schema": [], "input": "y"}'), "the task is unknown"),
        (instruction_line('{"instruction": "x", "schema": [], "input": "y"}', task="POS"), "unknown task 'POS'"),
    ],
)
def test_read_converted_bad_lines(tmp_path: Path, line: str | bytes, message: str) -> None:
    path = write_lines(tmp_path, GOOD, line)
    with pytest.raises(BadInput) as caught:
        extract.read_converted(path)
    text = str(caught.value)
    assert message in text
    assert str(path) in text and "\n" not in text
    assert caught.value.exit_code == EXIT_BAD_INPUT


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(BadInput, match="empty"):
        extract.read_converted(empty)
    with pytest.raises(BadInput, match="no such file"):
        extract.read_converted(tmp_path / "missing.json")
    with pytest.raises(BadInput, match="cannot read"):
        extract.read_converted(tmp_path)


def test_utf8_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode("utf-8") + b"\r\n")
    assert len(extract.read_converted(path)) == 1


# ---------------------------------------------------------------- raw files


@pytest.mark.parametrize("task", ["NER", "RE", "EE", "EET", "KG", "SPO"])
def test_read_raw_asks_what_the_authors_asked(task: str) -> None:
    """Raw sample.json + schema.json give, per text, the chunk sizes, types and label of DeepKE's test.json."""
    authors: dict[str, list[dict[str, Any]]] = {}
    for line in json_lines(DEEPKE / task / "test.json"):
        authors.setdefault(json.loads(line["instruction"])["input"], []).append(line)
    records = extract.read_raw(DEEPKE / task / "sample.json", task, schema_of(task), "zh")
    mine: dict[str, list[extract.PromptRecord]] = {}
    for record in records:
        mine.setdefault(record.text, []).append(record)
    assert mine.keys() == authors.keys()
    for text, lines in authors.items():
        their_chunks = [json.loads(line["instruction"])["schema"] for line in lines]
        my_chunks = [json.loads(record.instruction)["schema"] for record in mine[text]]
        assert [len(c) for c in my_chunks] == [len(c) for c in their_chunks]
        assert sorted(map(canonical, sum(my_chunks, []))) == sorted(map(canonical, sum(their_chunks, [])))
        assert {record.extra["label"] for record in mine[text]} == {line["label"] for line in lines}


def canonical(item: Any) -> str:
    if isinstance(item, dict):
        item = {k: sorted(v) if isinstance(v, list) else v for k, v in item.items()}
    return json.dumps(item, ensure_ascii=False, sort_keys=True)


def test_read_raw_ids_keys_and_instructions(tmp_path: Path) -> None:
    path = write_lines(tmp_path, '{"text": "张三在北京"}', '{"id": "x7", "text": "李四", "source": "mine"}')
    records = extract.read_raw(path, "NER", ["人物", "地点", "组织", "时间", "作品", "职位", "事件"], "zh", 4)
    assert [(r.key, r.id) for r in records] == [("1:0", 1), ("1:1", 1), ("2:0", "x7"), ("2:1", "x7")]
    assert records[0].instruction == oneke.make_instruction("NER", ["人物", "地点", "组织", "时间"], "张三在北京", "zh")
    assert records[3].extra == {"task": "NER", "source": "mine"}
    assert records[0].extra is not records[1].extra


def test_read_raw_kg_keeps_the_sample_id() -> None:
    records = extract.read_raw(DEEPKE / "KG" / "sample.json", "KG", schema_of("KG"), "zh")
    assert [r.id for r in records] == [json.loads(x)["id"] for x in (DEEPKE / "KG" / "sample.json").open()]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 1}', "line 1: missing field 'text'"),
        ('{"text": "  "}', "line 1: 'text' must be a non-empty string"),
        ('{"text": 5}', "line 1: 'text' must be a non-empty string"),
        ('{"id": [1], "text": "a"}', "line 1: 'id' must be a string or an integer"),
        ('{"id": true, "text": "a"}', "line 1: 'id' must be a string or an integer"),
    ],
)
def test_read_raw_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path, line)
    with pytest.raises(BadInput, match=message) as caught:
        extract.read_raw(path, "NER", ["人物"], "zh")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("task", "schema", "lang", "chunk_size", "message"),
    [
        ("NER", [], "zh", None, "empty"),
        ("EE", ["not a dict"], "zh", None, "event_type"),
        ("POS", ["a"], "zh", None, "unknown task"),
        ("NER", ["a"], "fr", None, "unknown language"),
        ("NER", ["a"], "zh", 0, "chunk size"),
    ],
)
def test_read_raw_bad_arguments(
    tmp_path: Path, task: str, schema: Any, lang: str, chunk_size: int | None, message: str
) -> None:
    path = write_lines(tmp_path, '{"text": "a"}')
    with pytest.raises(BadInput, match=message):
        extract.read_raw(path, task, schema, lang, chunk_size)


# ---------------------------------------------------------------- output and resume


def records_for(tmp_path: Path, n: int = 3) -> list[extract.PromptRecord]:
    path = write_lines(tmp_path, *(json.dumps({"text": f"文本{i}", "label": "[]"}) for i in range(n)))
    return extract.read_raw(path, "NER", ["人物"], "zh")


def test_output_lines_are_what_deepke_evaluator_reads(tmp_path: Path) -> None:
    record = extract.read_converted(DEEPKE / "KG" / "test.json")[0]
    out = tmp_path / "out.json"
    with extract.OutputWriter(out) as writer:
        writer.write(record, '{"人物": {}}</s>', {"人物": {}}, None)
        writer.write(record, "{oops", None, "not JSON")
    first, second = json_lines(out)
    assert first == {
        "id": record.id,
        "instruction": record.instruction,
        "task": "KG",
        "source": "KG",
        "label": record.extra["label"],
        "output": '{"人物": {}}</s>',
        "parsed": {"人物": {}},
        "key": "1",
    }
    assert second["parse_error"] == "not JSON" and "parsed" not in second
    assert isinstance(second["output"], str)


def test_each_line_is_on_disk_before_close(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    writer = extract.OutputWriter(out)
    writer.write(records_for(tmp_path)[0], "{}", {}, None)
    assert out.read_bytes().endswith(b"\n") and len(json_lines(out)) == 1
    writer.close()


def test_resume_after_a_kill_mid_line(tmp_path: Path) -> None:
    records = records_for(tmp_path, 4)
    out = tmp_path / "out.json"
    with extract.OutputWriter(out) as writer:
        for record in records[:2]:
            writer.write(record, "{}", {}, None)
    complete = out.read_bytes()
    with out.open("ab") as f:
        f.write(b'{"id": 3, "instruction": "{\\"instr')  # what SIGKILL leaves mid-write
    assert extract.done_keys(out) == {"1:0", "2:0"}
    assert out.read_bytes() == complete  # the partial line is cut away
    assert [r.key for r in extract.pending_records(records, out)] == ["3:0", "4:0"]
    with extract.OutputWriter(out) as writer:
        writer.write(records[2], "{}", {}, None)
    assert [line["key"] for line in json_lines(out)] == ["1:0", "2:0", "3:0"]


def test_partial_only_line_leaves_an_empty_file(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_bytes(b'{"id": 1, "instr')
    assert extract.done_keys(out) == set()
    assert out.read_bytes() == b""


def test_no_output_yet_means_nothing_done(tmp_path: Path) -> None:
    assert extract.done_keys(tmp_path / "none.json") == set()


def test_resume_refuses_another_inputs_output(tmp_path: Path) -> None:
    records = records_for(tmp_path)
    out = tmp_path / "out.json"
    with extract.OutputWriter(out) as writer:
        writer.write(records[0], "{}", {}, None)
    changed = extract.read_raw(tmp_path / "input.json", "NER", ["地点"], "zh")
    with pytest.raises(BadInput, match="written for another prompt"):
        extract.pending_records(changed, out)


@pytest.mark.parametrize(("content", "message"), [(b'{"id": 1}\n', "no 'key'"), (b"oops\n", "not JSON")])
def test_resume_refuses_a_foreign_file(tmp_path: Path, content: bytes, message: str) -> None:
    out = tmp_path / "out.json"
    out.write_bytes(content)
    with pytest.raises(BadInput, match=message):
        extract.done_keys(out)


def test_refuse_output_equal_to_input(tmp_path: Path) -> None:
    path = write_lines(tmp_path, GOOD)
    with pytest.raises(BadInput, match="the output is the input"):
        extract.refuse_same_file(path, tmp_path / "." / "input.json")
    link = tmp_path / "link.json"
    os.symlink(path, link)
    with pytest.raises(BadInput, match="the output is the input"):
        extract.refuse_same_file(path, link)
    extract.refuse_same_file(path, tmp_path / "out.json")  # a different file is fine


def test_output_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="cannot open the output"):
        extract.OutputWriter(tmp_path / "no-such-dir" / "out.json")


def test_merge_by_id_joins_chunks() -> None:
    lines: list[dict[str, Any]] = [
        {"id": "a", "task": "NER", "instruction": "", "parsed": {"人物": ["胡"]}},
        {"id": "a", "task": "NER", "instruction": "", "parse_error": "not JSON"},
        {"id": "a", "task": "NER", "instruction": "", "parsed": {"地点": ["北京"]}},
        {"id": "b", "instruction": oneke.make_instruction("RE", ["主演"], "t", "zh"), "parse_error": "x"},
    ]
    assert extract.merge_by_id(lines) == {"a": {"人物": ["胡"], "地点": ["北京"]}, "b": {}}


def test_merge_by_id_needs_a_task() -> None:
    with pytest.raises(BadInput, match="cannot tell its task"):
        extract.merge_by_id([{"id": "a", "instruction": "{}", "parsed": {}}])
