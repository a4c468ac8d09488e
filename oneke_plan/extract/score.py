"""Precision, recall and F1 of OneKE answers against gold labels, per task (docs/scoring.md).

Reads answer files as DeepKE's evaluator (InstructKGC `ie2instruction/eval_func.py`) reads them: lines grouped
into records by `source` + `id`, the record's gold `label` from its first line, the predictions of all its lines'
`output` texts joined; a gold item is matched at most once, a repeated prediction counts twice (their "normal"
match mode). Merged lines (`"merged": true`, written by oneke-run) are skipped: their chunks are already counted.

What is matched, per task (the authors' rule where their evaluator has a working one):
- NER: (entity, type).  RE and SPO: (head, relation, tail), `subject`/`object` read as head/tail; SPO's types
  are not compared (the answer keys only the predicate).  KG: (entity, attribute, value), one per value, values
  '无' and 'NaN' skipped as the authors' extracter skips them; gold (head, relation, tail).
- EE: event (type, trigger) and argument (type, argument, role), "NAN" arguments skipped.
- EET: event (trigger, type).
- EEA: argument (type, argument, role) as the authors; event (type, trigger) against the gold triggers (the
  authors' evaluator compares with an empty trigger, so answers in OneKE's trained shape would score 0).

P, R and F1 are percentages rounded to 2 decimals; F1 = 2*tp / (pred + gold). None where undefined (nothing
predicted, or no gold item). Standard library only.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.extract.inputs import evaluator_group, known_task, read_json_objects
from oneke_plan.formats import oneke
from oneke_plan.formats.answers import NAN, argument_text, event_trigger, is_kg_empty, pair_ends
from oneke_plan.io import jsonfile

PARTS: dict[str, tuple[str, ...]] = {
    "NER": ("entity",),
    "RE": ("triple",),
    "SPO": ("triple",),
    "KG": ("triple",),
    "EE": ("event", "argument"),
    "EET": ("event",),
    "EEA": ("event", "argument"),
}
"""What is scored for each task, in table order."""

Item = tuple[str, ...]


@dataclass
class Counts:
    """Matched, predicted and gold items of one part (e.g. NER entities) over all records."""

    tp: int = 0
    pred: int = 0
    gold: int = 0

    def add(self, gold: list[Item], pred: list[Item]) -> None:
        """One record: each gold item matches at most one equal prediction."""
        self.tp += sum((Counter(gold) & Counter(pred)).values())
        self.pred += len(pred)
        self.gold += len(gold)

    @property
    def precision(self) -> float | None:
        return _percent(self.tp, self.pred)

    @property
    def recall(self) -> float | None:
        return _percent(self.tp, self.gold)

    @property
    def f1(self) -> float | None:
        return _percent(2 * self.tp, self.pred + self.gold)

    def summary(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "pred": self.pred,
            "gold": self.gold,
        }


def _percent(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


@dataclass
class Answer:
    """One prompt line's answer: its text as the model wrote it (`raw_output` where oneke-run kept it, else
    `output`), whether it is a JSON object, and the items it predicts per part."""

    text: str
    parsed: bool
    items: dict[str, list[Item]]


@dataclass
class Record:
    """One scored record: its gold items, predicted items per part, and its prompt lines' answers in file order."""

    gold: dict[str, list[Item]]
    pred: dict[str, list[Item]] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)


@dataclass
class TaskScore:
    """One task's scores in one file."""

    task: str
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    prompts: int = 0  # prompt lines (merged lines are not)
    errors: int = 0  # prompt lines whose output is not a JSON object (the authors' evaluator's "错误数")
    unanswered: int = 0  # prompts oneke-run could not answer (lines with `error`; counted in errors too)
    windows: int = 0  # windows of split lines (oneke-run --split-long): each line is one prompt above
    failed_windows: int = 0  # of those, windows whose answer is not JSON or that got none (left out of the merge)

    def counts(self) -> dict[str, Counts]:
        totals = {part: Counts() for part in PARTS[self.task]}
        for record in self.records.values():
            for part, counts in totals.items():
                counts.add(record.gold[part], record.pred.get(part, []))
        return totals

    def summary(self) -> dict[str, Any]:
        return {
            "records": len(self.records),
            "prompts": self.prompts,
            "errors": self.errors,
            "unanswered": self.unanswered,
            "windows": self.windows,
            "failed_windows": self.failed_windows,
            "parts": {part: counts.summary() for part, counts in self.counts().items()},
        }


# ---------------------------------------------------------------- reading a file


def score_file(path: str | os.PathLike[str], task: str | None = None) -> dict[str, TaskScore]:
    """Scores of every task in an answer file; BadInput naming the line for anything that cannot be scored."""
    if task is not None:
        task = known_task(task, "--task")
    scores: dict[str, TaskScore] = {}
    for number, line in read_json_objects(path):
        where = f"{path}, line {number}"
        if line.get("merged") is True:
            continue
        check_answer_line(line, path, number)
        line_task = task or _line_task(line, where)
        score = scores.setdefault(line_task, TaskScore(line_task))
        group = evaluator_group(line, _need(line, "id", where))
        record = score.records.get(group)
        if record is None:
            record = score.records[group] = Record(gold_items(line_task, _label(line, where), where))
        ok, items = predicted_items(line_task, line["output"])
        score.prompts += 1
        score.errors += not ok
        score.unanswered += "error" in line
        windows = line.get("windows")
        if isinstance(windows, list):  # a split line: its answer merges its windows', some of which may have failed
            score.windows += len(windows)
            failed = [w for w in windows if isinstance(w, dict) and ("parse_error" in w or "error" in w)]
            score.failed_windows += len(failed)
        record.answers.append(Answer(answer_text(line), ok, items))
        for part, found in items.items():
            record.pred.setdefault(part, []).extend(found)
    if not scores:
        raise BadInput(f"{path}: no answer lines to score")
    return scores


def check_answer_line(line: dict[str, Any], path: str | os.PathLike[str], number: int) -> None:
    """An answer line has an `output` and the gold `label` it is scored against; BadInput saying what the line is
    instead: an input line (oneke-run's input, not its output), or an answer without labels (oneke-run's output of
    an input that had none)."""
    where = f"{path}, line {number}"
    if "output" not in line:
        if "instruction" in line:
            raise BadInput(
                f"{where}: an input line (no 'output'), not an answer: run oneke-run on it, then score its output"
            )
        if "text" in line:
            raise BadInput(
                f"{where}: a raw DeepKE input line (text, no 'output'), not an answer: run oneke-run on it with --task "
                "and --schema, then score its output"
            )
        _need(line, "output", where)
    if "label" not in line:
        ours = "key" in line and any(name in line for name in ("parsed", "parse_error", "error"))
        what = "oneke-run's output of an input without labels" if ours else "answers without labels"
        raise BadInput(
            f"no gold labels in {path}: it holds {what} (line {number} has no 'label'), and scoring needs the "
            "input's labels: run oneke-run on a labelled file (converted lines with 'label', or raw lines with their "
            "entity/relation/event lists)"
        )


def answer_text(line: dict[str, Any]) -> str:
    """What the model answered on a prompt line, as text: oneke-run's `raw_output` (its `output` is the answer
    re-encoded when it parsed), else `output` (DeepKE's inference output), "" for a prompt that got no answer."""
    text = line.get("raw_output", line.get("output"))
    return text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, sort_keys=True)


def _need(line: dict[str, Any], name: str, where: str) -> Any:
    if name not in line:
        raise BadInput(f"{where}: no {name!r} field: not an answer line (oneke-run's, or DeepKE's inference output)")
    return line[name]


def _line_task(line: dict[str, Any], where: str) -> str:
    if isinstance(line.get("task"), str):
        return known_task(line["task"], where)
    try:
        instruction = jsonfile.loads(line["instruction"])
        detected = oneke.detect_task(instruction["instruction"], instruction.get("schema"))
    except (KeyError, TypeError, ValueError):
        detected = None
    if detected is None:
        raise BadInput(f"{where}: cannot tell the task (no 'task' field, no known instruction): pass --task")
    return detected[0]


def _label(line: dict[str, Any], where: str) -> list[Any]:
    label = _need(line, "label", where)
    try:
        gold = jsonfile.loads(label) if isinstance(label, str) else None
    except ValueError:
        gold = None
    if not isinstance(gold, list) or not all(isinstance(item, dict) for item in gold):
        raise BadInput(f"{where}: 'label' must be a JSON string holding a list of objects, as DeepKE's converter has")
    return gold


# ---------------------------------------------------------------- gold and predicted items


def gold_items(task: str, label: list[dict[str, Any]], where: str = "label") -> dict[str, list[Item]]:
    """The gold items of one record, per part (the authors' `convert_kg`, with EEA's real triggers)."""
    try:
        if task == "NER":
            return {"entity": [(g["entity"], g["entity_type"]) for g in label]}
        if task in ("RE", "SPO", "KG"):
            return {"triple": [(g["head"], g["relation"], g["tail"]) for g in label]}
        if task == "EET":
            return {"event": [(g["event_trigger"], g["event_type"]) for g in label]}
        return {
            "event": [(g["event_type"], g["event_trigger"]) for g in label],
            "argument": [(g["event_type"], a["argument"], a["role"]) for g in label for a in g["arguments"]],
        }
    except (KeyError, TypeError) as exc:
        raise BadInput(f"{where}: a {task} gold label lacks {exc}: it is not in DeepKE's {task} label shape") from None


def predicted_items(task: str, output: Any) -> tuple[bool, dict[str, list[Item]]]:
    """(whether the output is a JSON object, its items per part), as the authors' extracters read answers."""
    answer = output
    if isinstance(output, str):
        try:
            answer = jsonfile.loads(output)
        except ValueError:
            return False, {}
    if not isinstance(answer, dict):
        return False, {}
    if task == "NER":
        return True, {"entity": [(v, k) for k, v in _strings_by_key(answer)]}
    if task == "EET":
        return True, {"event": [(v, k) for k, v in _strings_by_key(answer)]}
    if task in ("RE", "SPO"):
        return True, {"triple": _pairs(answer)}
    if task == "KG":
        return True, {"triple": _kg_triples(answer)}
    return True, _events(answer)


def _strings_by_key(answer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v) for k, values in answer.items() if isinstance(values, list) for v in values if isinstance(v, str)]


def _pairs(answer: dict[str, Any]) -> list[Item]:
    triples: list[Item] = []
    for relation, items in answer.items():
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            head, tail = pair_ends(item)
            if isinstance(head, str) and isinstance(tail, str):
                triples.append((head, relation, tail))
    return triples


def _kg_triples(answer: dict[str, Any]) -> list[Item]:
    triples: list[Item] = []
    for entities in answer.values():
        for entity, attributes in entities.items() if isinstance(entities, dict) else []:
            for attribute, value in attributes.items() if isinstance(attributes, dict) else []:
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, str) and not is_kg_empty(v):
                        triples.append((entity, attribute, v))
    return triples


def _events(answer: dict[str, Any]) -> dict[str, list[Item]]:
    events: list[Item] = []
    arguments: list[Item] = []
    for event_type, found in answer.items():
        for event in found if isinstance(found, list) else []:
            if not isinstance(event, dict) or not isinstance(trigger := event_trigger(event), str):
                continue
            events.append((event_type, trigger))
            roles = event.get("arguments", {})
            for role, value in roles.items() if isinstance(roles, dict) else []:
                for v in value if isinstance(value, list) else [value]:
                    if v != NAN:
                        arguments.append((event_type, argument_text(v), role))
    return {"event": events, "argument": arguments}


# ---------------------------------------------------------------- two runs side by side


def compare(a: dict[str, TaskScore], b: dict[str, TaskScore], a_name: str, b_name: str) -> dict[str, Any]:
    """Per task and part: both scores, the F1 change (B - A) and how many records' predictions differ; per task,
    how the two runs' answers differ line by line (compare_answers): predictions can agree where answers do not
    (two answers that are not JSON predict nothing, whatever they say).

    The files must be answers to the same input: the same tasks and records (BadInput otherwise).
    """
    if a.keys() != b.keys():
        raise BadInput(f"{a_name} has tasks {sorted(a)}, {b_name} has {sorted(b)}: compare runs of the same input")
    tasks: dict[str, Any] = {}
    for task, score_a in a.items():
        score_b = b[task]
        if score_a.records.keys() != score_b.records.keys():
            only = next(iter(score_a.records.keys() ^ score_b.records.keys()))
            raise BadInput(
                f"{task}: record {only[1]!r} (source {only[0]!r}) is in only one of {a_name} and {b_name}: "
                "compare runs of the same input"
            )
        counts_a, counts_b = score_a.counts(), score_b.counts()
        parts = {}
        for part in PARTS[task]:
            differ = sum(
                Counter(score_a.records[key].pred.get(part, [])) != Counter(score_b.records[key].pred.get(part, []))
                for key in score_a.records
            )
            f1_a, f1_b = counts_a[part].f1, counts_b[part].f1
            parts[part] = {
                "a": counts_a[part].summary(),
                "b": counts_b[part].summary(),
                "f1_change": None if f1_a is None or f1_b is None else round(f1_b - f1_a, 2),
                "records_differ": differ,
            }
        tasks[task] = {
            "records": len(score_a.records),
            "prompts": {"a": score_a.prompts, "b": score_b.prompts},
            "errors": {"a": score_a.errors, "b": score_b.errors},
            "unanswered": {"a": score_a.unanswered, "b": score_b.unanswered},
            "answers": compare_answers(score_a, score_b),
            "parts": parts,
        }
    return {"a": a_name, "b": b_name, "tasks": tasks}


def compare_answers(a: TaskScore, b: TaskScore) -> dict[str, int]:
    """The prompt lines of two runs of one input, paired in file order within each record: `prompts` pairs (a line
    only one run has counts as differing), `text_differs` whose answer texts are not the same, and of those
    `same_items` (both JSON objects predicting the same items: the text differs in form only), `neither_parsed`
    (neither is a JSON object, so neither predicts anything), `one_parsed` and `items_differ`."""
    counts = dict.fromkeys(("prompts", "text_differs", "same_items", "neither_parsed", "one_parsed", "items_differ"), 0)
    for key, record in a.records.items():
        theirs = b.records[key].answers
        for index in range(max(len(record.answers), len(theirs))):
            counts["prompts"] += 1
            if index >= len(record.answers) or index >= len(theirs):
                counts["text_differs"] += 1
                counts["items_differ"] += 1
                continue
            x, y = record.answers[index], theirs[index]
            if x.text == y.text:
                continue
            counts["text_differs"] += 1
            if not x.parsed and not y.parsed:
                counts["neither_parsed"] += 1
            elif x.parsed != y.parsed:
                counts["one_parsed"] += 1
            elif {p: Counter(v) for p, v in x.items.items()} == {p: Counter(v) for p, v in y.items.items()}:
                counts["same_items"] += 1
            else:
                counts["items_differ"] += 1
    return counts
