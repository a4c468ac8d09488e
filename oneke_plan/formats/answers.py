"""OneKE's answers: parsed (never raising on model text), merged across a record's schema chunks and long-document
windows (each item once, by the scorer's rule), and put in the fields the authors' evaluator reads; gold labels
de-duplicated as their converter does.

Sources as oneke.py's: the README's "Output shapes", DeepKE's `processer/*.py` (which gold labels the converter
de-duplicates) and `eval/extracter/*.py` (the answer fields its evaluator reads: RE items' `head`/`tail`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from oneke_plan.formats.oneke import check_task, value_kind
from oneke_plan.io import jsonfile

EOS_TEXT = "</s>"


def parse_output(task: str, text: str) -> tuple[Any | None, str | None]:
    """Parse one answer: (parsed, None), or (None, why not). Never raises on model text.

    The answer must be a JSON object (README "Output shapes"). Checks are loose, enough to say an answer is
    usable: each value is a list (a dict for KG), and RE/SPO items carry subject/object or head/tail (OneKE's
    training data, IEPile, uses the first, DeepKE's converter the second).
    """
    check_task(task)
    answer = text.strip()
    while answer.endswith(EOS_TEXT):
        answer = answer[: -len(EOS_TEXT)].rstrip()
    if not answer:
        return None, "empty answer"
    try:
        parsed = jsonfile.loads(answer)
    except jsonfile.JsonLimitError as e:
        return None, f"not an answer ({e.msg})"
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at char {e.pos} of {len(answer)}; cut off by max_new_tokens?)"
    if not isinstance(parsed, dict):
        return None, f"expected a JSON object keyed by schema type, got {value_kind(parsed)}"
    problem = _answer_problem(task, parsed)
    return (None, problem) if problem else (parsed, None)


def _answer_problem(task: str, parsed: dict[str, Any]) -> str | None:
    for key, value in parsed.items():
        if task == "KG":
            if not isinstance(value, dict) and value != []:
                return f"{key!r}: expected an object of entities, got {value_kind(value)}"
            continue
        if not isinstance(value, list):
            return f"{key!r}: expected a list, got {value_kind(value)}"
        if task in ("RE", "SPO"):
            for item in value:
                if not _is_pair(item):
                    return f"{key!r}: expected items with subject/object (or head/tail), got {item!r}"
    return None


def _is_pair(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    return ("subject" in item and "object" in item) or ("head" in item and "tail" in item)


# -- merging a record's answers (schema chunks, long-document windows) ------------------------------------------
NAN = "NAN"
"""An EE/EEA argument OneKE did not find (its instruction: "return NAN"); the scorer skips it."""
KG_EMPTY = ("无", "nan")
"""KG values meaning "none", compared lower-cased; the scorer skips them as the authors' extracter does."""
_PAIR_FIELDS = ("head", "tail", "subject", "object")


def pair_ends(item: dict[str, Any]) -> tuple[Any, Any]:
    """An RE/SPO item's (head, tail) as the scorer reads them: `head` else `subject`, `tail` else `object`."""
    return item.get("head", item.get("subject", "")), item.get("tail", item.get("object", ""))


def event_trigger(event: dict[str, Any]) -> Any:
    """An EE/EEA event's trigger as the scorer reads it: "" where the event has none."""
    return event.get("trigger", "")


def argument_text(value: Any) -> str:
    """An EE/EEA argument value as the scorer compares it: a string as it is, anything else as its JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def is_kg_empty(value: Any) -> bool:
    """Whether a KG value says "none" ('无', 'NaN' in any case): not a triple."""
    return isinstance(value, str) and value.lower() in KG_EMPTY


def _item_identity(task: str, item: Any) -> str:
    """The text by which the scorer tells one item of a schema type's list from another: an RE/SPO pair by its
    (head, tail), subject/object read as head/tail; an EE/EEA event by its trigger; anything else (NER/EET
    strings, odd model output) by its exact JSON. Pairs and events are keyed by JSON objects, which no other
    item's JSON is, so they never meet an odd item."""
    if isinstance(item, dict) and task in ("RE", "SPO"):
        head, tail = pair_ends(item)
        item = {"head": head, "tail": tail}
    elif isinstance(item, dict) and task in ("EE", "EEA"):
        item = {"trigger": event_trigger(item)}
    return _exact(item)


def _exact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def merge_outputs(task: str, parsed_list: list[Any]) -> dict[str, Any]:
    """Merge the parsed answers of one record's schema chunks or long-document windows into one answer, each item
    once by the rule the scorer matches items with (docs/scoring.md, "Merging a record's answers"), so that an item
    found in two overlapping windows counts once:

    - NER/EET: a string value under a key appears once (non-strings by their JSON);
    - RE/SPO: items under one relation with the same (head-or-subject, tail-or-object) are one item, the first
      kept, its other fields merged from later ones only where absent;
    - EE/EEA: events under one type with the same trigger are one event, merged as RE's items, their arguments
      role by role: a role's values are the distinct values from all answers (one plain value stays plain,
      several become a list, first-seen order: conflicting argument values are kept as a list), "NAN" dropped
      where a real value exists (it means not found);
    - KG: entities merged attribute by attribute as EE's roles, '无'/'nan' dropped where a real value exists.

    None (an unparsed answer) is skipped; keys keep their first-seen order. Odd model output never raises: items
    that are not objects are kept, repeats removed by exact JSON; a value of its task's shape (a type's list; KG's
    object of entities, an entity's object of attributes; an event's object of arguments) wins over odd values in
    the same place, which the scorer does not read; where none has the shape, odd values are joined (_merge_odd).
    """
    check_task(task)
    answers = [parsed for parsed in parsed_list if isinstance(parsed, dict)]
    return {key: _merge_key(task, values) for key, values in _values_by_key(answers).items()}


def _values_by_key(dicts: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each key of `dicts` (first-seen order) with its value in every dict that has it, in order."""
    found: dict[str, list[Any]] = {}
    for mapping in dicts:
        for key, value in mapping.items():
            found.setdefault(key, []).append(value)
    return found


def _merge_key(task: str, values: list[Any]) -> Any:
    """One schema type's values, one per answer that has the type, merged."""
    if task == "KG":
        entities = [v for v in values if isinstance(v, dict)]
        if entities:
            return _merge_entities(entities)
    elif lists := [v for v in values if isinstance(v, list)]:
        return _unique_items(task, [item for v in lists for item in v])
    return _merge_odd(values)


def _unique_items(task: str, items: list[Any]) -> list[Any]:
    groups: dict[str, list[Any]] = {}
    for item in items:
        groups.setdefault(_item_identity(task, item), []).append(item)
    return [_one_item(task, group) for group in groups.values()]


def _one_item(task: str, group: list[Any]) -> Any:
    """One item from those of the same identity: the first, its other fields filled from later ones where absent;
    an event's arguments merged role by role (an event's non-object arguments give way to another's object)."""
    first = group[0]
    if not isinstance(first, dict):
        return first  # same identity: the same JSON
    item = dict(first)
    for later in group[1:]:
        for field, value in later.items() if isinstance(later, dict) else []:
            if field not in _PAIR_FIELDS or task not in ("RE", "SPO"):
                item.setdefault(field, value)
    if task in ("EE", "EEA"):
        roles = [e["arguments"] for e in group if isinstance(e, dict) and isinstance(e.get("arguments"), dict)]
        if roles:
            item["arguments"] = _merge_attributes(roles, argument_text, lambda v: v == NAN)
    return item


def _merge_entities(types: list[dict[str, Any]]) -> dict[str, Any]:
    """One KG entity type's entities from all answers: an entity's attributes merged attribute by attribute."""
    merged: dict[str, Any] = {}
    for name, found in _values_by_key(types).items():
        attributes = [a for a in found if isinstance(a, dict)]
        merged[name] = _merge_attributes(attributes, _exact, is_kg_empty) if attributes else _merge_odd(found)
    return merged


def _merge_attributes(
    dicts: list[dict[str, Any]], identity: Callable[[Any], str], empty: Callable[[Any], bool]
) -> dict[str, Any]:
    """EE roles or KG attributes from all answers, name by name: the distinct values (by `identity`, the scorer's
    reading) in first-seen order, the `empty` ones ("not found") dropped where a real value exists. A plain value
    where every answer gave one and they agree, else a list."""
    merged: dict[str, Any] = {}
    for name, given in _values_by_key(dicts).items():
        distinct: dict[str, Any] = {}
        for value in (v for g in given for v in (g if isinstance(g, list) else [g])):
            distinct.setdefault(identity(value), value)
        kept = [v for v in distinct.values() if not empty(v)] or list(distinct.values())
        plain = len(kept) == 1 and not any(isinstance(g, list) for g in given)
        merged[name] = kept[0] if plain else kept
    return merged


def _merge_odd(values: list[Any]) -> Any:
    """Values of odd shape from several answers: equal ones once, objects key by key, anything else joined in a
    list without exact-JSON repeats."""
    return functools.reduce(_merge_values, values)


def _merge_values(a: Any, b: Any) -> Any:
    if a == b:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = _merge_values(merged[key], value) if key in merged else value
        return merged
    joined: dict[str, Any] = {}
    for item in (a if isinstance(a, list) else [a]) + (b if isinstance(b, list) else [b]):
        joined.setdefault(_exact(item), item)
    return list(joined.values())


# -- the authors' evaluator's view ---------------------------------------------------------------------------------
def head_tail_answer(task: str, parsed: dict[str, Any]) -> dict[str, Any]:
    """The answer with RE/SPO items in the fields DeepKE's evaluator reads (`head`, `tail`).

    OneKE answers in IEPile's shape, `{"relation": [{"subject", "object"}]}`; DeepKE's `REExtracter` reads only
    `head` and `tail`, so perfect triples would score 0. Items are renamed key by key, order kept; an item that
    already has `head` (or `tail`) keeps it. Other tasks come back unchanged.
    """
    if task not in ("RE", "SPO"):
        return parsed
    return {key: [_renamed_pair(item) for item in items] for key, items in parsed.items()}


_PAIR_NAMES = {"subject": "head", "object": "tail"}


def _renamed_pair(item: dict[str, Any]) -> dict[str, Any]:
    renamed: dict[str, Any] = {}
    for key, value in item.items():
        target = _PAIR_NAMES.get(key, key)
        if target != key and target in item:
            target = key  # both forms given: keep both, the evaluator's own field wins
        renamed[target] = value
    return renamed


_LABEL_IDENTITY: dict[str, tuple[str, ...]] = {
    "NER": ("entity", "entity_type"),
    "RE": ("head", "relation", "tail"),
    "SPO": ("head", "relation", "tail"),
}
"""The fields by which the authors' processors drop repeated gold labels (`filter_lable` of ner_processer,
re_processer and spo_processer); the other tasks keep every label."""


def unique_labels(task: str, labels: list[Any]) -> list[Any]:
    """Gold labels with repeats removed as the authors' converter removes them: the first of each identity kept."""
    fields = _LABEL_IDENTITY.get(check_task(task))
    if fields is None:
        return list(labels)
    seen: set[str] = set()
    kept = []
    for label in labels:
        identity = json.dumps(
            [label.get(f) for f in fields] if isinstance(label, dict) else label, ensure_ascii=False, sort_keys=True
        )
        if identity not in seen:
            seen.add(identity)
            kept.append(label)
    return kept
