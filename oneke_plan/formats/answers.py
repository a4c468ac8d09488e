"""OneKE's answers: parsed (never raising on model text), merged across a record's schema chunks, and put in the
fields the authors' evaluator reads; gold labels de-duplicated as their converter does.

Sources as oneke.py's: the README's "Output shapes", DeepKE's `processer/*.py` (which gold labels the converter
de-duplicates) and `eval/extracter/*.py` (the answer fields its evaluator reads: RE items' `head`/`tail`).
"""

from __future__ import annotations

import json
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


def merge_outputs(task: str, parsed_list: list[Any]) -> dict[str, Any]:
    """Merge the parsed answers of one record's chunks into one answer (README: "Results ... are merged").

    Chunks ask about disjoint types, so this is mostly a dict union. Where a key repeats, lists are joined
    without duplicates and dicts are merged key by key, which for KG joins the attributes of an entity found
    in several chunks; two different plain values become a list of both. None (unparsed chunks) is skipped.
    """
    check_task(task)
    merged: dict[str, Any] = {}
    for parsed in parsed_list:
        if isinstance(parsed, dict):
            merged = _merge_dicts(merged, parsed)
    return merged


def _merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = _merge_values(merged[key], value) if key in merged else value
    return merged


def _merge_values(a: Any, b: Any) -> Any:
    if a == b:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        return _merge_dicts(a, b)
    joined: list[Any] = []
    seen: set[str] = set()
    for item in (a if isinstance(a, list) else [a]) + (b if isinstance(b, list) else [b]):
        marker = json.dumps(item, ensure_ascii=False, sort_keys=True)
        if marker not in seen:
            seen.add(marker)
            joined.append(item)
    return joined


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
