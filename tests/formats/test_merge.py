"""answers.merge_outputs over a record's schema chunks and overlapping long-document windows: every item the answers
predict counts once in the merged answer.

Checked by an independent route, the scorer (score.predicted_items): the merged answer's items, as a multiset, are
the distinct items of the answers merged, each exactly once. The two share only the accessors of formats/answers.py
(pair_ends, event_trigger, argument_text, is_kg_empty: which field is a head, a trigger); what counts as one item is
the scorer's own tuples.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from perfect_answers import perfect_answer

from oneke_plan.extract import score
from oneke_plan.formats import answers

DEEPKE = Path(__file__).resolve().parents[2] / "examples" / "deepke"
TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")


def merged_once(task: str, given: list[Any]) -> dict[str, Any]:
    """merge_outputs(task, given), after checking that it predicts each distinct item of `given` exactly once."""
    merged = answers.merge_outputs(task, given)
    parsed, found = score.predicted_items(task, merged)
    assert parsed
    for part in score.PARTS[task]:
        distinct = {item for a in given if isinstance(a, dict) for item in score.predicted_items(task, a)[1][part]}
        assert Counter(found[part]) == Counter(distinct), part
    return merged


# ---------------------------------------------------------------- each task, by hand


@pytest.mark.parametrize("task", ["NER", "EET"])
def test_strings_appear_once_under_their_key(task: str) -> None:
    first = {"人物": ["张三", "李四", "张三"], "地点": []}
    second = {"地点": ["北京"], "人物": ["李四", "王五"], "组织": ["甲", "甲"]}
    merged = merged_once(task, [first, None, second])
    assert merged == {"人物": ["张三", "李四", "王五"], "地点": ["北京"], "组织": ["甲"]}  # first-seen order


def test_non_string_values_are_kept_once_by_their_json() -> None:
    merged = merged_once("NER", [{"人物": [1, "1", {"a": 1}]}, {"人物": [{"a": 1}, 1, "1"]}])
    assert merged == {"人物": [1, "1", {"a": 1}]}


@pytest.mark.parametrize("task", ["RE", "SPO"])
def test_pairs_are_one_by_head_and_tail_whichever_names_they_carry(task: str) -> None:
    first = {"出生地": [{"subject": "甲", "object": "北京"}], "父亲": []}
    second = {
        "出生地": [
            {"head": "甲", "tail": "北京", "confidence": "high"},  # the same pair, its extra field kept
            {"head": "甲", "tail": "上海"},
            {"subject": "甲", "object": "北京", "head": "甲", "tail": "北京"},
        ],
        "父亲": [{"subject": "甲", "object": "乙"}],
    }
    merged = merged_once(task, [first, second])
    assert merged == {
        "出生地": [{"subject": "甲", "object": "北京", "confidence": "high"}, {"head": "甲", "tail": "上海"}],
        "父亲": [{"subject": "甲", "object": "乙"}],
    }
    assert merged_once(task, [answers.head_tail_answer(task, merged)]) == answers.head_tail_answer(task, merged)


def test_pairs_of_different_relations_stay_apart() -> None:
    pair = {"subject": "甲", "object": "乙"}
    assert merged_once("RE", [{"父亲": [pair]}, {"老师": [pair]}]) == {"父亲": [pair], "老师": [pair]}


@pytest.mark.parametrize("task", ["EE", "EEA"])
def test_an_event_in_two_windows_is_one_event_with_its_arguments_merged(task: str) -> None:
    first = {
        "组织关系-裁员": [{"trigger": "裁员", "arguments": {"时间": "5月份", "裁员方": "NAN", "裁员人数": "900余人"}}]
    }
    second = {
        "组织关系-裁员": [
            {"trigger": "裁员", "arguments": {"时间": "5月", "裁员方": "某公司", "裁员人数": "900余人"}},
            {"trigger": "裁掉", "arguments": {"时间": "NAN", "裁员方": "NAN", "裁员人数": "NAN"}},
        ]
    }
    merged = merged_once(task, [first, second])
    assert merged == {
        "组织关系-裁员": [
            # conflicting values kept as a list; NAN (not found) gives way to a value; an agreed one stays plain
            {"trigger": "裁员", "arguments": {"时间": ["5月份", "5月"], "裁员方": "某公司", "裁员人数": "900余人"}},
            {"trigger": "裁掉", "arguments": {"时间": "NAN", "裁员方": "NAN", "裁员人数": "NAN"}},
        ]
    }


def test_event_roles_join_lists_and_fill_what_the_first_lacks() -> None:
    first = {"加盟": [{"trigger": "加入", "arguments": {"加盟者": ["甲", "NAN"], "人数": 3}}]}
    second = {"加盟": [{"trigger": "加入", "arguments": {"加盟者": "乙", "时间": "今年", "人数": "3"}, "note": "x"}]}
    third = {"加盟": [{"trigger": "加入", "arguments": {"加盟者": ["乙", "甲"]}}]}
    merged = merged_once("EE", [first, second, third])
    # 3 and "3" are one argument to the scorer (a value's text)
    arguments = {"加盟者": ["甲", "乙"], "人数": 3, "时间": "今年"}
    assert merged == {"加盟": [{"trigger": "加入", "arguments": arguments, "note": "x"}]}


def test_kg_entities_merge_attribute_by_attribute_and_none_gives_way_to_a_value() -> None:
    first = {"人物": {"甲": {"别名": "无", "父母": ["乙"], "籍贯": "NaN"}}, "组织": []}
    second = {"人物": {"甲": {"别名": "小甲", "父母": ["乙", "丙"], "籍贯": "nan"}, "丁": {"职业": "教师"}}}
    merged = merged_once("KG", [first, second])
    assert merged == {
        "人物": {"甲": {"别名": "小甲", "父母": ["乙", "丙"], "籍贯": ["NaN", "nan"]}, "丁": {"职业": "教师"}},
        "组织": [],
    }


def test_kg_conflicting_plain_values_become_a_list() -> None:
    merged = merged_once("KG", [{"人物": {"甲": {"别名": "乙"}}}, {"人物": {"甲": {"别名": "丙"}}}, {"人物": []}])
    assert merged == {"人物": {"甲": {"别名": ["乙", "丙"]}}}


# ---------------------------------------------------------------- odd model output


@pytest.mark.parametrize(
    ("task", "given", "expected"),
    [
        ("NER", [{"人物": "张三"}, {"人物": ["张三", "李四"]}], {"人物": ["张三", "李四"]}),
        ("RE", [{"父亲": ["甲", {"subject": "甲", "object": "乙"}]}, {"父亲": ["甲"]}], None),
        ("RE", [{"父亲": [{"subject": ["甲"], "object": "乙"}, {"head": ["甲"], "tail": "乙"}]}], None),
        ("EE", [{"裁员": [{"trigger": 3}, 7, {"trigger": 3, "arguments": "NAN"}]}, {"裁员": [7, None]}], None),
        ("EE", [{"裁员": [{"trigger": "裁", "arguments": ["x"]}, {"trigger": "裁", "arguments": {"a": "b"}}]}], None),
        (
            "KG",
            [{"人物": {"甲": "乙"}}, {"人物": {"甲": {"别名": "丙"}}}, {"人物": "丁"}],
            {"人物": {"甲": {"别名": "丙"}}},
        ),
        (
            "KG",
            [{"人物": {"甲": "乙"}}, {"人物": {"甲": ["丙"]}}, {"组织": "丁"}],
            {"人物": {"甲": ["乙", "丙"]}, "组织": "丁"},
        ),
        ("EET", [{"裁员": {"trigger": "裁"}}, {"裁员": [{"trigger": "裁"}]}, {"other": 1}, "text", None], None),
    ],
)
def test_odd_output_is_kept_without_raising(task: str, given: list[Any], expected: Any) -> None:
    merged = merged_once(task, given)
    if expected is not None:
        assert merged == expected
    assert list(merged) == list(dict.fromkeys(k for g in given if isinstance(g, dict) for k in g))


def test_an_event_with_object_arguments_wins_over_odd_ones_of_the_same_trigger() -> None:
    given = [{"裁员": [{"trigger": "裁", "arguments": ["x"]}, {"trigger": "裁", "arguments": {"a": "b"}}]}]
    assert answers.merge_outputs("EE", given) == {"裁员": [{"trigger": "裁", "arguments": {"a": "b"}}]}


def test_the_answers_given_are_not_changed() -> None:
    given = [{"r": [{"subject": "甲", "object": "乙"}]}, {"r": [{"head": "甲", "tail": "乙", "x": 1}]}]
    before = json.dumps(given)
    answers.merge_outputs("RE", given)
    assert json.dumps(given) == before


# ---------------------------------------------------------------- every DeepKE record, in overlapping windows


def windows(items: list[Any]) -> tuple[list[Any], list[Any]]:
    """Two windows that overlap by a third: the items before 2/3 of the list, and those from 1/3 on."""
    n = len(items)
    return items[: -(-2 * n // 3)], items[n // 3 :]


def record_answers(task: str) -> dict[str, list[Any]]:
    """Every record's answers, a perfect one to each schema chunk's prompt as two overlapping windows would give it;
    the second window of RE and SPO in head/tail, the first in OneKE's subject/object."""
    found: dict[str, list[Any]] = {}
    for raw in (DEEPKE / task / "test.json").read_text(encoding="utf-8").splitlines():
        line = json.loads(raw)
        schema, label = json.loads(line["instruction"])["schema"], json.loads(line["label"])
        first, second = windows(label)
        found.setdefault(line["id"], []).extend(
            [perfect_answer(task, schema, first), answers.head_tail_answer(task, perfect_answer(task, schema, second))]
        )
    return found


@pytest.mark.parametrize("task", TASKS)
def test_every_deepke_record_over_overlapping_windows_predicts_each_item_once(task: str) -> None:
    straddling = 0
    for given in record_answers(task).values():
        merged_once(task, given)
        counted = Counter(item for a in given for items in score.predicted_items(task, a)[1].values() for item in items)
        straddling += sum(n > 1 for n in counted.values())
    assert straddling  # the windows did overlap: the plain joins would have counted these twice
