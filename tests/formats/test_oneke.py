"""OneKE prompt format checked against the authors' own converted files (examples/deepke/*/test.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oneke_plan.formats import answers, oneke
from oneke_plan.formats.templates import ONEKE_TEMPLATE, TEMPLATES

DEEPKE = Path(__file__).resolve().parents[2] / "examples" / "deepke"
TASK_DIRS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")


def deepke_lines(task: str) -> list[dict[str, Any]]:
    """The lines of one task's DeepKE test.json, each with its instruction decoded under `_decoded`."""
    lines = []
    for raw in (DEEPKE / task / "test.json").read_text(encoding="utf-8").split("\n"):
        if raw.strip():
            line = json.loads(raw)
            line["_decoded"] = json.loads(line["instruction"])
            lines.append(line)
    return lines


def chunks_by_id(task: str) -> dict[str, list[Any]]:
    """The schema chunks the authors wrote for each record id, in file order."""
    grouped: dict[str, list[Any]] = {}
    for line in deepke_lines(task):
        grouped.setdefault(line["id"], []).append(line["_decoded"]["schema"])
    return grouped


def normalized(item: Any) -> str:
    """A schema item as a comparable string; the authors' converter shuffles argument lists, so sort them."""
    if isinstance(item, dict):
        item = {k: sorted(v) if isinstance(v, list) else v for k, v in item.items()}
    return json.dumps(item, ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------- instruction texts and prompt strings


def test_every_task_folder_is_a_task() -> None:
    assert set(TASK_DIRS) == set(oneke.TASKS)
    assert sorted(p.name for p in DEEPKE.iterdir() if p.is_dir()) == sorted(TASK_DIRS)


def published_text(task: str) -> str:
    """The zh text in the task's test.json: SPO's file predates the converter's switch to RE's text."""
    return oneke.LEGACY_INSTRUCTIONS.get(task, oneke.INSTRUCTIONS[task])["zh"]


@pytest.mark.parametrize("task", TASK_DIRS)
def test_zh_instruction_is_the_one_in_deepke_test_file(task: str) -> None:
    texts = {line["_decoded"]["instruction"] for line in deepke_lines(task)}
    assert texts == {published_text(task)}


def test_spo_is_asked_with_the_re_texts_as_the_authors_current_converter_does() -> None:
    """DeepKE's instruction.py maps SPO+zh and SPO+en to RE's texts; the old SPO text is only recognised."""
    re_file_text = deepke_lines("RE")[0]["_decoded"]["instruction"]
    spo_file_text = deepke_lines("SPO")[0]["_decoded"]["instruction"]
    assert oneke.INSTRUCTIONS["SPO"]["zh"] == re_file_text != spo_file_text
    assert oneke.INSTRUCTIONS["SPO"]["en"] == oneke.INSTRUCTIONS["RE"]["en"]  # no file shows en: the mapping itself
    assert oneke.LEGACY_INSTRUCTIONS["SPO"]["zh"] == spo_file_text


@pytest.mark.parametrize("task", TASK_DIRS)
def test_instruction_rebuilt_byte_for_byte(task: str) -> None:
    for line in deepke_lines(task):
        decoded = line["_decoded"]
        rebuilt = oneke.make_instruction(task, decoded["schema"], decoded["input"], "zh")
        assert rebuilt.replace(oneke.INSTRUCTIONS[task]["zh"], published_text(task)) == line["instruction"]


def test_test_files_carry_no_schema_descriptions() -> None:
    """Every schema in the sample files uses bare names; the description form only comes from users."""
    for task in TASK_DIRS:
        for line in deepke_lines(task):
            schema = line["_decoded"]["schema"]
            assert isinstance(schema, list)
            for item in schema:
                values = item.values() if isinstance(item, dict) else [item]
                assert not any(isinstance(v, dict) for v in values)


def test_chat_prompt_is_the_llama2_zh_wrapper() -> None:
    user = '{"instruction": "x", "schema": ["人物"], "input": "y"}'
    expected = (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
        '{"instruction": "x", "schema": ["人物"], "input": "y"} [/INST]'
    )
    assert TEMPLATES[ONEKE_TEMPLATE].render(user) == expected
    assert not TEMPLATES[ONEKE_TEMPLATE].render(user).startswith("<s>")


def test_make_instruction_key_order_and_unicode() -> None:
    built = oneke.make_instruction("NER", ["person"], "Allenby won", "en")
    assert list(json.loads(built)) == ["instruction", "schema", "input"]
    assert built.startswith('{"instruction": "You are an expert in named entity recognition.')
    assert "人物" in oneke.make_instruction("NER", ["人物"], "文本", "zh")  # ensure_ascii=False


def test_make_instruction_with_example_uses_the_authors_few_shot_form() -> None:
    example = [{"input": "a", "output": {"检查指标": ["eGFR"]}}]
    built = json.loads(oneke.make_instruction("NER", ["检查指标"], "text", "zh", example=example))
    assert list(built) == ["instruction", "schema", "example", "input"]
    # the NER text as the authors' test file has it, then the suffix of their README
    assert built["instruction"] == deepke_lines("NER")[0]["_decoded"]["instruction"] + "你可以参考example进行抽取。"
    assert built["example"] == example


def test_english_few_shot_is_refused_because_no_suffix_is_published() -> None:
    with pytest.raises(oneke.PromptError, match="few-shot"):
        oneke.make_instruction("NER", ["person"], "text", "en", example=[])


@pytest.mark.parametrize(("task", "lang", "match"), [("XX", "zh", "unknown task"), ("NER", "fr", "language")])
def test_unknown_task_or_language(task: str, lang: str, match: str) -> None:
    with pytest.raises(oneke.PromptError, match=match):
        oneke.instruction_text(task, lang)


@pytest.mark.parametrize("task", TASK_DIRS)
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_detect_task_recognises_every_text_with_and_without_suffix(task: str, lang: str) -> None:
    text = oneke.INSTRUCTIONS[task][lang]
    # RE and SPO share a text: the schema tells them apart; EE and EET share their opening words only
    schema = deepke_lines(task)[0]["_decoded"]["schema"]
    assert oneke.detect_task(text, schema) == (task, lang)
    assert oneke.detect_task(text + "你可以参考example进行抽取。", schema) == (task, lang)


def test_detect_task_shared_text_and_legacy_spo_text() -> None:
    shared = oneke.INSTRUCTIONS["RE"]["zh"]
    assert oneke.detect_task(shared) == ("RE", "zh")
    assert oneke.detect_task(shared, ["主演"]) == ("RE", "zh")
    assert oneke.detect_task(shared, {"主演": "描述"}) == ("RE", "zh")
    spo = [{"subject_type": "人物", "predicate": "妻子", "object_type": "人物"}]
    assert oneke.detect_task(shared, spo) == ("SPO", "zh")
    assert oneke.detect_task(oneke.LEGACY_INSTRUCTIONS["SPO"]["zh"]) == ("SPO", "zh")


def test_detect_task_rejects_other_text() -> None:
    assert oneke.detect_task("Extract entities.") is None


# ---------------------------------------------------------------- chunking


def reference_lengths(n: int, size: int) -> list[int]:
    """Chunk lengths by the rule as the README states it, written independently of oneke.split_schema."""
    if size == -1 or n <= size:
        return [n]
    lengths = [size] * (n // size)
    rest = n % size
    if rest >= max(1, size // 2):
        lengths.append(rest)
    else:
        lengths[-1] += rest
    return lengths


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (3, 6, [3]),
        (6, 6, [6]),
        (7, 6, [7]),
        (8, 6, [8]),
        (9, 6, [6, 3]),
        (5, 4, [5]),
        (6, 4, [4, 2]),
        (9, 4, [4, 5]),
        (10, 4, [4, 4, 2]),
        (4, 3, [3, 1]),
        (5, 2, [2, 2, 1]),
        (3, 1, [1, 1, 1]),
        (49, 4, [4] * 11 + [5]),
        (65, 4, [4] * 15 + [5]),
        (48, 4, [4] * 12),
        (7, -1, [7]),
    ],
)
def test_split_rule_on_lists(n: int, size: int, expected: list[int]) -> None:
    items = [f"t{i}" for i in range(n)]
    chunks = oneke.split_schema("RE", items, size)
    assert [len(c) for c in chunks] == expected
    assert [item for chunk in chunks for item in chunk] == items


def test_split_rule_matches_reference_for_many_sizes() -> None:
    for size in [-1, *range(1, 9)]:
        for n in range(1, 40):
            chunks = oneke.split_schema("NER", list(range(n)), size)
            assert [len(c) for c in chunks] == reference_lengths(n, size), (n, size)


def test_default_chunk_sizes_are_what_the_authors_files_show() -> None:
    """Where a task's test file splits a record's schema, its first chunk has the task's chunk size; where no record
    is split (NER's 3 types, KG's 1 entity type, EEA's own events), every chunk fits in one. The sizes the files
    cannot show (NER 6, KG 1, EEA 4) are the README's `split_num_mapper`, checked through split_schema's behaviour."""
    for task in TASK_DIRS:
        records = chunks_by_id(task).values()
        split = [chunks for chunks in records if len(chunks) > 1]
        if split:
            assert {len(chunks[0]) for chunks in split} == {oneke.CHUNK_SIZES[task]}, task
        else:
            assert max(len(chunk) for chunks in records for chunk in chunks) <= oneke.CHUNK_SIZES[task], task
    assert {task for task in TASK_DIRS if any(len(c) > 1 for c in chunks_by_id(task).values())} == {
        "RE", "EE", "EET", "SPO"
    }  # fmt: skip
    assert [len(c) for c in oneke.split_schema("NER", list(range(13)))] == [6, 7]  # 6 a chunk, a remainder of 1 merged
    assert [len(c) for c in oneke.split_schema("EEA", list(range(9)))] == [4, 5]
    assert [len(c) for c in oneke.split_schema("KG", [{"entity_type": "a", "attributes": []}] * 3)] == [1, 1, 1]


def test_description_schema_is_one_prompt() -> None:
    """The authors show a description schema as one instruction (6 NER types); their converter never splits one."""
    schema = {f"type{i}": f"description {i}" for i in range(9)}
    assert oneke.split_schema("RE", schema) == [schema]
    assert oneke.split_schema("NER", schema, 2) == [schema]
    assert oneke.split_schema("RE", list(schema)) == [[f"type{i}" for i in range(4)], [f"type{i}" for i in range(4, 9)]]


@pytest.mark.parametrize("task", TASK_DIRS)
def test_split_reproduces_the_authors_chunks(task: str) -> None:
    """Re-splitting the concatenation of a record's chunks gives back exactly the authors' chunks."""
    for chunks in chunks_by_id(task).values():
        flat = [item for chunk in chunks for item in chunk]
        assert oneke.split_schema(task, flat) == chunks


def test_split_observations_in_test_files() -> None:
    """RE's 49 relations and EE's 65 event types end in a chunk of 5: the remainder of 1 was merged."""
    assert {tuple(map(len, c)) for c in chunks_by_id("RE").values()} == {(4,) * 11 + (5,)}
    assert {tuple(map(len, c)) for c in chunks_by_id("EE").values()} == {(4,) * 15 + (5,)}
    assert {tuple(map(len, c)) for c in chunks_by_id("SPO").values()} == {(4,) * 12}


def test_split_errors() -> None:
    with pytest.raises(oneke.SchemaError, match="empty"):
        oneke.split_schema("NER", [])
    with pytest.raises(oneke.PromptError, match="chunk size"):
        oneke.split_schema("NER", ["a"], 0)


# ---------------------------------------------------------------- schema files


@pytest.mark.parametrize("task", ["NER", "RE", "EE", "EET", "KG", "SPO"])
def test_schema_file_gives_what_the_authors_chunked(task: str) -> None:
    """Each record of these test files asks about the whole schema.json, in shuffled order."""
    loaded = oneke.load_schema_file(str(DEEPKE / task / "schema.json"), task)
    assert isinstance(loaded, list)
    for chunks in chunks_by_id(task).values():
        asked = sorted(normalized(item) for chunk in chunks for item in chunk)
        assert asked == sorted(normalized(item) for item in loaded)


def test_eea_schema_file_covers_the_asked_events() -> None:
    """EEA test lines ask only about the record's own events (their triggers are given), a subset."""
    loaded = {normalized(item) for item in oneke.load_schema_file(str(DEEPKE / "EEA" / "schema.json"), "EEA")}
    assert len(loaded) == 65
    for line in deepke_lines("EEA"):
        assert {normalized(item) for item in line["_decoded"]["schema"]} <= loaded


def test_schema_file_shapes() -> None:
    ee = oneke.load_schema_file(str(DEEPKE / "EE" / "schema.json"), "EE")
    assert isinstance(ee, list)
    assert all(list(item) == ["event_type", "trigger", "arguments"] and item["trigger"] is True for item in ee)
    kg = oneke.load_schema_file(str(DEEPKE / "KG" / "schema.json"), "KG")
    assert isinstance(kg, list) and [item["entity_type"] for item in kg] == ["人物"]
    assert len(kg[0]["attributes"]) == 15
    spo = oneke.load_schema_file(str(DEEPKE / "SPO" / "schema.json"), "SPO")
    assert isinstance(spo, list) and spo[0] == {
        "subject_type": "人物",
        "predicate": "毕业院校",
        "object_type": "学校",
    }


def test_plain_schema_inline_and_as_file(tmp_path: Path) -> None:
    assert oneke.load_schema(' ["人物", "地点"]', "NER") == ["人物", "地点"]
    described = {"人物": "a person"}
    assert oneke.load_schema(json.dumps(described, ensure_ascii=False), "NER") == described
    path = tmp_path / "schema.json"
    path.write_text(json.dumps([{"entity_type": "人物", "attributes": ["别名"]}], ensure_ascii=False), "utf-8")
    assert oneke.load_schema(str(path), "KG") == [{"entity_type": "人物", "attributes": ["别名"]}]


def write(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "schema.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("task", "content", "match"),
    [
        ("NER", "[]", "empty"),
        ("NER", "[\n]\n]\n]", "neither one JSON document"),
        ("NER", "[\n]\n]", "line 1: not JSON"),
        ("NER", '["a"]\n[]', "neither one JSON document"),
        ("NER", '["a"]\n[x]\n{}', "line 2: not JSON"),
        ("NER", '["a"]\n[]\n[]', "line 3 .* must be a JSON object"),
        ("NER", "[1]\n[]\n{}", "line 1 .* non-empty strings"),
        ("NER", "[]\n[]\n{}", "line 1 .* is empty"),
        ("RE", '["a"]\n[]\n{}', "line 2 .* is empty"),
        ("EE", '["t"]\n["r"]\n{"u": ["r"]}', "no roles for event type 't'"),
        ("KG", "[]\n[]\n{}", "line 3 .* is empty"),
        ("SPO", '["a_b"]\n[]\n{}', "not 'subject_predicate_object'"),
        ("NER", "[1]", "type names"),
        ("NER", '"a"', "must be a JSON list"),
        ("EE", '[{"event_type": "t"}]', "event_type.*arguments"),
        ("KG", '{"人物": ["别名"]}', "must be a JSON list of objects"),
        ("SPO", '[{"subject_type": "a", "predicate": "b"}]', "object_type"),
    ],
)
def test_bad_schema_files(tmp_path: Path, task: str, content: str, match: str) -> None:
    with pytest.raises(oneke.SchemaError, match=match):
        oneke.load_schema_file(write(tmp_path, content), task)


def test_schema_file_not_found_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(oneke.SchemaError, match="does not exist"):
        oneke.load_schema_file(str(tmp_path / "missing.json"), "NER")
    with pytest.raises(oneke.SchemaError, match="not UTF-8"):
        oneke.load_schema_file(write(tmp_path, b'["\xff"]'), "NER")


def test_schema_error_is_a_value_error() -> None:
    assert issubclass(oneke.SchemaError, ValueError) and issubclass(oneke.PromptError, ValueError)


# ---------------------------------------------------------------- answers

README_OUTPUTS = {
    # The output shapes in /work/shared/oneke/README.md ("Output shapes").
    "NER": '{"person": ["Robert Allenby", "Miguel Angel Martin"], "organization": [], '
    '"location": ["Australia", "Spain"]}',
    "RE": '{"主演": [{"subject": "喜剧之王", "object": "周星驰"}], "主角": []}',
    "EE": '{"组织关系-裁员": [{"trigger": "裁员", '
    '"arguments": {"裁员方": "NAN", "时间": "5月份", "裁员人数": "900余人"}}], "组织关系-解散": []}',
    "EET": '{"组织关系-裁员": ["裁员"], "交往-点赞": []}',
    "EEA": '{"组织关系-裁员": [{"trigger": "裁员", "arguments": {"时间": "NAN", "裁员方": "中国IT企业"}}]}',
    "KG": '{"人物": {"明治天皇": {"别名": "睦仁", "父母": ["孝明天皇", "英照皇太后"]}}}',
}


@pytest.mark.parametrize("task", sorted(README_OUTPUTS))
def test_parse_readme_output_shapes(task: str) -> None:
    parsed, error = answers.parse_output(task, README_OUTPUTS[task])
    assert error is None
    assert parsed == json.loads(README_OUTPUTS[task])


def test_parse_tolerates_whitespace_and_eos() -> None:
    assert answers.parse_output("EET", '  {"a": ["b"]}</s>\n') == ({"a": ["b"]}, None)
    assert answers.parse_output("EET", '{"a": []} </s></s>') == ({"a": []}, None)


def test_parse_accepts_head_tail_for_re() -> None:
    parsed, error = answers.parse_output("RE", '{"主演": [{"head": "喜剧之王", "tail": "周星驰"}]}')
    assert error is None and parsed == {"主演": [{"head": "喜剧之王", "tail": "周星驰"}]}


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("NER", "", "empty"),
        ("NER", "</s>", "empty"),
        ("NER", '{"person": ["a"', "not JSON"),
        ("NER", '["a"]', "JSON object"),
        ("NER", '{"person": "a"}', "expected a list"),
        ("RE", '{"主演": [{"subject": "a"}]}', "subject/object"),
        ("RE", '{"主演": ["a"]}', "subject/object"),
        ("KG", '{"人物": ["a"]}', "object of entities"),
    ],
)
def test_parse_errors(task: str, text: str, match: str) -> None:
    parsed, error = answers.parse_output(task, text)
    assert parsed is None
    assert error is not None and match in error


def test_merge_union_of_chunks() -> None:
    merged = answers.merge_outputs("NER", [{"人物": ["胡"]}, None, {"地理位置": [], "人物": ["胡", "李"]}])
    assert merged == {"人物": ["胡", "李"], "地理位置": []}


def test_merge_kg_entities_across_chunks() -> None:
    first = {"人物": {"明治天皇": {"别名": "睦仁", "父母": ["孝明天皇"]}}}
    second = {"人物": {"明治天皇": {"父母": ["孝明天皇", "英照皇太后"]}, "刘太行": {"父母": ["刘伯承"]}}}
    assert answers.merge_outputs("KG", [first, second]) == {
        "人物": {
            "明治天皇": {"别名": "睦仁", "父母": ["孝明天皇", "英照皇太后"]},
            "刘太行": {"父母": ["刘伯承"]},
        }
    }


def test_merge_conflicting_values_keeps_both() -> None:
    merged = answers.merge_outputs("KG", [{"人物": {"甲": {"别名": "乙"}}}, {"人物": {"甲": {"别名": "丙"}}}])
    assert merged == {"人物": {"甲": {"别名": ["乙", "丙"]}}}


# ---------------------------------------------------------------- the evaluator's fields, gold repeats


def test_head_tail_answer_renames_subject_and_object_only_for_re_and_spo() -> None:
    answer = {"主演": [{"subject": "喜剧之王", "object": "周星驰"}], "导演": []}
    assert answers.head_tail_answer("RE", answer) == {"主演": [{"head": "喜剧之王", "tail": "周星驰"}], "导演": []}
    assert answers.head_tail_answer("SPO", answer)["主演"] == [{"head": "喜剧之王", "tail": "周星驰"}]
    assert answers.head_tail_answer("NER", {"人物": ["subject"]}) == {"人物": ["subject"]}
    both = {"r": [{"head": "h", "subject": "s", "object": "o"}]}
    assert answers.head_tail_answer("RE", both) == {"r": [{"head": "h", "subject": "s", "tail": "o"}]}


def test_unique_labels_follow_the_authors_identities() -> None:
    a = {"entity": "张三", "entity_type": "人物"}
    assert answers.unique_labels("NER", [a, {**a, "extra": 1}, {**a, "entity_type": "x"}]) == [
        a,
        {**a, "entity_type": "x"},
    ]
    t = {"head": "h", "relation": "r", "tail": "t", "head_type": "A"}
    assert answers.unique_labels("SPO", [t, {**t, "head_type": "B"}]) == [t]
    assert answers.unique_labels("EE", [t, t]) == [t, t]


def test_spo_type_names_split_as_the_authors_spotext2schema() -> None:
    text = '["人物_毕业_院校_学校"]\n[]\n{}'
    assert oneke.schema_from_text(text, "SPO", "s") == [
        {"subject_type": "人物", "predicate": "毕业_院校", "object_type": "学校"}
    ]
    with pytest.raises(oneke.SchemaError, match="three non-empty"):
        oneke.schema_from_text('["人物_学校"]\n[]\n{}', "SPO", "s")
