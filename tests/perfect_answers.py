"""The answer OneKE should give to one prompt, built from the record's gold label in OneKE's trained shapes
(/work/shared/oneke/README.md "Output shapes"): for checking that perfect answers score 100 everywhere.

Written from the output shapes alone, not from oneke_plan.extract.score, so the scorer is checked against an independent
route. RE and SPO answer with subject/object, as OneKE does (IEPile), not the evaluator's head/tail.
"""

from __future__ import annotations

import json
from typing import Any

NAN = "NAN"


def perfect_answer(task: str, schema: Any, label: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer to a prompt whose schema chunk is `schema`, for a record whose gold labels are `label`."""
    if task == "NER":
        return {t: [g["entity"] for g in label if g["entity_type"] == t] for t in schema}
    if task == "RE":
        return {r: [{"subject": g["head"], "object": g["tail"]} for g in label if g["relation"] == r] for r in schema}
    if task == "SPO":
        answer: dict[str, list[Any]] = {}
        for item in schema:
            found = [
                {"subject": g["head"], "object": g["tail"]}
                for g in label
                if (g["head_type"], g["relation"], g["tail_type"])
                == (item["subject_type"], item["predicate"], item["object_type"])
            ]
            answer.setdefault(item["predicate"], []).extend(found)
        return answer
    if task == "EET":
        return {t: [g["event_trigger"] for g in label if g["event_type"] == t] for t in schema}
    if task in ("EE", "EEA"):
        return {
            item["event_type"]: [_event(g, item["arguments"]) for g in label if g["event_type"] == item["event_type"]]
            for item in schema
        }
    if task == "KG":
        entities: dict[str, dict[str, Any]] = {}
        for g in label:
            attributes = entities.setdefault(g["head"], {})
            attributes[g["relation"]] = [*_as_list(attributes.get(g["relation"])), g["tail"]]
        flat = {e: {a: v[0] if len(v) == 1 else v for a, v in attrs.items()} for e, attrs in entities.items()}
        return {item["entity_type"]: flat for item in schema}
    raise ValueError(task)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _event(gold: dict[str, Any], roles: list[str]) -> dict[str, Any]:
    """{"trigger", "arguments": {role: value | [values] | NAN}} for one gold event, roles in schema order."""
    values: dict[str, list[str]] = {}
    for argument in gold["arguments"]:
        values.setdefault(argument["role"], []).append(argument["argument"])
    arguments = {role: (v[0] if len(v) == 1 else v) if (v := values.get(role)) else NAN for role in roles}
    for role, v in values.items():  # a gold role the schema chunk lacks still belongs to the perfect answer
        arguments.setdefault(role, v[0] if len(v) == 1 else v)
    return {"trigger": gold["event_trigger"], "arguments": arguments}


def perfect_text(task: str, instruction: str, label: str) -> str:
    """perfect_answer for a line of a converted file (its instruction and label JSON strings), as JSON text."""
    schema = json.loads(instruction)["schema"]
    return json.dumps(perfect_answer(task, schema, json.loads(label)), ensure_ascii=False)
