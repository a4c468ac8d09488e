"""Input reading, output writing and resume, on DeepKE's sample files and on broken files made in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from oneke_plan.core.errors import EXIT_BAD_INPUT, BadInput
from oneke_plan.extract import answer_lines, inputs, outputs
from oneke_plan.formats import answers, oneke

DEEPKE = Path(__file__).resolve().parents[2] / "examples" / "deepke"
TASK_DIRS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def schema_of(task: str) -> oneke.Schema:
    return oneke.load_schema_file(str(DEEPKE / task / "schema.json"), task)


def authors_text(task: str) -> str:
    """The zh instruction text the authors' converter writes for `task`, read from their test.json (SPO's file
    predates their switch to RE's text for SPO, so SPO's comes from RE's file)."""
    line = json_lines(DEEPKE / ("RE" if task == "SPO" else task) / "test.json")[0]
    return str(json.loads(line["instruction"])["instruction"])


# ---------------------------------------------------------------- converted files


@pytest.mark.parametrize("task", TASK_DIRS)
def test_read_converted_deepke_test_file(task: str) -> None:
    path = DEEPKE / task / "test.json"
    lines = json_lines(path)
    records = inputs.read_converted(path)
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
    assert [r.key for r in inputs.read_converted(path)] == ["1", "3"]


def test_task_field_wins_and_reserved_fields_are_dropped(tmp_path: Path) -> None:
    line = json_lines(DEEPKE / "NER" / "test.json")[0]
    line.update(task="ner", output="old answer", key="9", parsed={})
    path = tmp_path / "in.json"
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = inputs.read_converted(path)
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
        ('["a list"]', "line 2: is a JSON array"),
        ('"a string"', "line 2: expected a JSON object, got str"),
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
        inputs.read_converted(path)
    text = str(caught.value)
    assert message in text
    assert str(path) in text and "\n" not in text
    assert caught.value.exit_code == EXIT_BAD_INPUT


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(BadInput, match="empty"):
        inputs.read_converted(empty)
    with pytest.raises(BadInput, match="no such file"):
        inputs.read_converted(tmp_path / "missing.json")
    with pytest.raises(BadInput, match="cannot read"):
        inputs.read_converted(tmp_path)


def test_utf8_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode("utf-8") + b"\r\n")
    assert len(inputs.read_converted(path)) == 1


# ---------------------------------------------------------------- raw files


def by_id(items: list[Any], id_of: Any) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for item in items:
        grouped.setdefault(id_of(item), []).append(item)
    return grouped


@pytest.mark.parametrize("task", TASK_DIRS)
def test_read_raw_reproduces_the_authors_conversion(task: str) -> None:
    """sample.json + schema.json give DeepKE's test.json: the same ids (SHA-256 of the text), records, instruction
    text, input, label, and per record the same chunk sizes and schema items. Item order inside the schema differs:
    the authors take it from a Python set (`list(self.type_list)`), whose order changes with each process's hash
    seed, so it cannot be reproduced (their RE file has ["号", "目", "创始人", "祖籍"] first, in no file order)."""
    authors = by_id(json_lines(DEEPKE / task / "test.json"), lambda line: line["id"])
    records = inputs.read_raw(DEEPKE / task / "sample.json", task, schema_of(task), "zh")
    mine = by_id(records, lambda record: record.id)
    assert list(mine) == list(authors)  # same ids, same record order
    for record_id, lines in authors.items():
        theirs = [json.loads(line["instruction"]) for line in lines]
        ours = [json.loads(record.instruction) for record in mine[record_id]]
        assert [len(t["schema"]) for t in theirs] == [len(o["schema"]) for o in ours]
        assert sorted(canonical(i) for t in theirs for i in t["schema"]) == sorted(
            canonical(i) for o in ours for i in o["schema"]
        )
        assert {o["input"] for o in ours} == {t["input"] for t in theirs}
        assert {o["instruction"] for o in ours} == {authors_text(task)}
        assert {record.extra["label"] for record in mine[record_id]} == {line["label"] for line in lines}
        assert all(record.extra["task"] == task and record.extra["source"] == task for record in mine[record_id])
        if "source" in lines[0]:  # the newer converter (KG) writes task and source; the same values
            assert (lines[0]["task"], lines[0]["source"]) == (task, task)
    # the id is the SHA-256 of the text, as the authors' stable_hash: checked with hashlib on the raw bytes
    text = json.loads(authors[next(iter(authors))][0]["instruction"])["input"]
    assert next(iter(authors)) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical(item: Any) -> str:
    if isinstance(item, dict):
        item = {k: sorted(v) if isinstance(v, list) else v for k, v in item.items()}
    return json.dumps(item, ensure_ascii=False, sort_keys=True)


def test_read_raw_ids_source_and_keys(tmp_path: Path) -> None:
    folder = tmp_path / "mydata"
    folder.mkdir()
    path = folder / "in.json"
    path.write_text('{"text": "张三在北京"}\n{"id": 7, "text": "李四", "source": "mine", "note": "x"}\n', "utf-8")
    records = inputs.read_raw(path, "NER", ["人物", "地点", "组织", "时间", "作品", "职位", "事件"], "zh", 4)
    first, second = hashlib.sha256("张三在北京".encode()).hexdigest(), hashlib.sha256("李四".encode()).hexdigest()
    assert [(r.key, r.id) for r in records] == [("1:0", first), ("1:1", first), ("2:0", second), ("2:1", second)]
    # by hand: the authors' key order, their NER text, the first chunk of 4, unescaped Chinese
    assert records[0].instruction == (
        '{"instruction": "' + authors_text("NER") + '", "schema": ["人物", "地点", "组织", "时间"], '
        '"input": "张三在北京"}'
    )
    assert records[0].extra == {"task": "NER", "source": "mydata"}  # the folder name, as the authors' source
    assert records[3].extra == {"task": "NER", "source": "mine", "input_id": 7, "note": "x"}
    assert records[0].extra is not records[1].extra


def test_read_raw_kg_ids_are_text_hashes_and_the_sample_id_is_kept() -> None:
    samples = json_lines(DEEPKE / "KG" / "sample.json")
    records = inputs.read_raw(DEEPKE / "KG" / "sample.json", "KG", schema_of("KG"), "zh")
    assert [r.extra["input_id"] for r in records] == [s["id"] for s in samples]
    assert [r.id for r in records] == [line["id"] for line in json_lines(DEEPKE / "KG" / "test.json")]


def test_read_raw_removes_repeated_gold_labels_as_the_authors_do(tmp_path: Path) -> None:
    """NER repeats of (entity, type) and RE/SPO repeats of (head, relation, tail) go; other tasks keep all."""
    ner = {"entity": "张三", "entity_type": "人物"}
    path = write_lines(tmp_path, json.dumps({"text": "张三", "entity": [ner, dict(ner), {**ner, "entity_type": "x"}]}))
    (record,) = inputs.read_raw(path, "NER", ["人物"], "zh")
    assert json.loads(record.extra["label"]) == [ner, {**ner, "entity_type": "x"}]
    triple = {"head": "a", "relation": "r", "tail": "b"}
    path = write_lines(tmp_path, json.dumps({"text": "ab", "relation": [triple, {**triple, "extra": 1}]}))
    (record,) = inputs.read_raw(path, "RE", ["r"], "zh")
    assert json.loads(record.extra["label"]) == [triple]
    (record,) = inputs.read_raw(path, "KG", [{"entity_type": "t", "attributes": ["r"]}], "zh")
    assert json.loads(record.extra["label"]) == [triple, {**triple, "extra": 1}]


EEA_SCHEMA = [
    {"event_type": "裁员", "arguments": ["时间", "裁员方"]},
    {"event_type": "加盟", "arguments": ["加盟者"]},
    {"event_type": "起火", "arguments": ["地点"]},
]


def test_read_raw_eea_asks_each_record_its_own_events_and_skips_records_without(tmp_path: Path) -> None:
    events = [
        {"event_type": "加盟", "event_trigger": "加盟", "arguments": []},
        {"event_type": "裁员", "event_trigger": "裁员", "arguments": []},
        {"event_type": "加盟", "event_trigger": "加入", "arguments": []},
    ]
    path = write_lines(tmp_path, json.dumps({"text": "甲", "event": events}), json.dumps({"text": "乙", "event": []}))
    notes: list[str] = []
    records = inputs.read_raw(path, "EEA", EEA_SCHEMA, "zh", notes=notes)
    assert [json.loads(r.instruction)["schema"] for r in records] == [
        [{"event_type": "加盟", "arguments": ["加盟者"]}, {"event_type": "裁员", "arguments": ["时间", "裁员方"]}]
    ]
    assert len(notes) == 1 and "1 lines" in notes[0] and "lines 2" in notes[0]


def test_read_raw_eea_sample_gives_six_prompts_not_one_per_schema_chunk() -> None:
    records = inputs.read_raw(DEEPKE / "EEA" / "sample.json", "EEA", schema_of("EEA"), "zh")
    assert len(records) == len(json_lines(DEEPKE / "EEA" / "test.json")) == 6
    # asking every type would have cost 16 prompts per line: 65 event types in chunks of 4, 15 x 4 + 5
    assert len(schema_of("EEA")) == 65


def test_read_raw_description_schema_is_one_prompt_and_examples_go_in_every_prompt(tmp_path: Path) -> None:
    path = write_lines(tmp_path, '{"text": "文本"}')
    described = {f"类型{i}": f"描述{i}" for i in range(8)}
    (record,) = inputs.read_raw(path, "NER", described, "zh")
    assert json.loads(record.instruction)["schema"] == described
    example = [{"input": "张三", "output": {"人物": ["张三"]}}]
    records = inputs.read_raw(path, "RE", [f"r{i}" for i in range(8)], "zh", example=example)
    # by hand: RE's chunks of 4, each prompt with the few-shot suffix and the example before the input
    instruction = authors_text("RE") + "你可以参考example进行抽取。"
    assert [record.instruction for record in records] == [
        '{"instruction": "' + instruction + '", "schema": ' + json.dumps(chunk) + ', "example": [{"input": "张三", '
        '"output": {"人物": ["张三"]}}], "input": "文本"}'
        for chunk in (["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"])
    ]
    with pytest.raises(BadInput, match="few-shot"):
        inputs.read_raw(path, "RE", ["r"], "en", example=example)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("[]", "non-empty JSON list"), ('[{"output": {}}]', "non-empty JSON list"), ("[oops", "not JSON")],
)
def test_read_example_bad(spec: str, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        inputs.read_example(spec)


def test_read_example_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ex.json"
    path.write_text('[{"input": "a", "output": {"人物": []}}]', encoding="utf-8")
    assert inputs.read_example(str(path)) == [{"input": "a", "output": {"人物": []}}]
    with pytest.raises(BadInput, match="cannot be read"):
        inputs.read_example(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    ("task", "line", "message"),
    [
        ("NER", '{"id": 1}', "line 1: missing field 'text'"),
        ("NER", '{"text": "  "}', "line 1: 'text' must be a non-empty string"),
        ("NER", '{"text": 5}', "line 1: 'text' must be a non-empty string"),
        ("NER", '{"text": "a", "entity": {"a": 1}}', "line 1: 'entity' must be a list of objects"),
        ("EEA", '{"text": "a"}', "line 1: EEA asks about a record's known events"),
        ("EEA", '{"text": "a", "event": [{"event_type": "x"}]}', "line 1: event type 'x' is not in the schema"),
        ("EEA", '{"text": "a", "event": [{"trigger": "x"}]}', "line 1: each event needs an 'event_type'"),
    ],
)
def test_read_raw_bad_lines(tmp_path: Path, task: str, line: str, message: str) -> None:
    path = write_lines(tmp_path, line)
    schema = EEA_SCHEMA if task == "EEA" else ["人物"]
    with pytest.raises(BadInput, match=message) as caught:
        inputs.read_raw(path, task, schema, "zh")
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
        inputs.read_raw(path, task, schema, lang, chunk_size)


# ---------------------------------------------------------------- answer lines


def re_record() -> inputs.PromptRecord:
    return inputs.read_converted(DEEPKE / "RE" / "test.json")[0]


def test_answer_line_gives_the_evaluator_head_and_tail_and_keeps_the_raw_text() -> None:
    """OneKE answers RE with subject/object; DeepKE's REExtracter reads `head`/`tail` from `output`."""
    record = re_record()
    raw = '{"主演": [{"subject": "喜剧之王", "object": "周星驰"}], "目": []}</s>'
    parsed, error = answers.parse_output("RE", raw)
    line = answer_lines.answer_line(record, raw, parsed, error)
    expected = {"主演": [{"head": "喜剧之王", "tail": "周星驰"}], "目": []}
    assert json.loads(line["output"]) == line["parsed"] == expected
    assert line["raw_output"] == raw and line["key"] == "1" and "error" not in line
    assert {k: line[k] for k in ("id", "instruction", "label")} == {
        "id": record.id,
        "instruction": record.instruction,
        "label": record.extra["label"],
    }


def test_answer_line_of_text_that_is_no_answer_keeps_it_for_the_evaluator_to_count() -> None:
    line = answer_lines.answer_line(re_record(), "{oops", None, "not JSON")
    assert line["output"] == line["raw_output"] == "{oops"
    assert line["parse_error"] == "not JSON" and "parsed" not in line and answer_lines.is_answered(line)


def test_error_line_is_not_an_answer() -> None:
    line = answer_lines.error_line(re_record(), "out of memory even alone")
    assert line["output"] == "" and line["error"] == "out of memory even alone" and "raw_output" not in line
    assert not answer_lines.is_answered(line)
    # lines of the previous format: a failure had an empty output and only parse_error
    assert not answer_lines.is_answered({"key": "1", "output": "", "parse_error": "prompt has 900 tokens"})
    assert answer_lines.is_answered({"key": "1", "output": "{}", "parsed": {}})
    assert answer_lines.is_answered({"key": "1", "output": "", "raw_output": "", "parse_error": "empty answer"})


def test_writer_fsyncs_each_line_and_keeps_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    record = re_record()
    with answer_lines.OutputWriter(out) as writer:
        writer.write_line(answer_lines.answer_line(record, "{}", {}, None))
        assert out.read_bytes().endswith(b"\n") and len(json_lines(out)) == 1  # on disk before the next prompt
        writer.write_line(answer_lines.error_line(record, "too long"))
    assert [line.get("error") for line in json_lines(out)] == [None, "too long"]
    assert writer.written["1"]["error"] == "too long"


def test_output_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="cannot open the output"):
        answer_lines.OutputWriter(tmp_path / "no-such-dir" / "out.json")


def test_refuse_output_equal_to_input(tmp_path: Path) -> None:
    path = write_lines(tmp_path, GOOD)
    link = tmp_path / "link.json"
    os.symlink(path, link)
    before = path.read_bytes()
    for output in (tmp_path / "." / "input.json", link):
        for mode in outputs.MODES:
            with pytest.raises(BadInput, match="is the input file"), outputs.RunOutput(output, path, mode) as run:
                run.prepare()
    assert path.read_bytes() == before
    outputs.RunOutput(tmp_path / "out.json", path, "new").prepare()  # a different file is fine
