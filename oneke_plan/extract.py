"""Reading extraction inputs into prompts, and writing answers so an interrupted run can resume.

Two input forms:
- the authors' converted files (DeepKE InstructKGC `convert_func.py --split test`, like
  examples/deepke/*/test.json): one prompt per line, `{"id", "instruction", "label"?, "task"?, "source"?}`,
  the instruction already a JSON string, which is passed to the model unchanged;
- raw text lines `{"id"?, "text"}` plus a schema: one prompt per schema chunk (oneke.split_schema).

Output lines keep the input's fields and add `output` (the model's text, a string), so DeepKE's evaluator
reads them as it reads its own results. Every line is flushed and fsync'd: a killed run loses at most the
line it was writing, and `done_keys` / `pending_records` let the next run skip what is already written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneke_plan import oneke
from oneke_plan.errors import BadInput

RESERVED_FIELDS = ("output", "parsed", "parse_error", "key")
"""Fields this module writes; an input carrying them (e.g. a previous output fed back in) has them dropped."""

GOLD_FIELDS = {
    "NER": "entity",
    "RE": "relation",
    "SPO": "relation",
    "KG": "relation",
    "EE": "event",
    "EET": "event",
    "EEA": "event",
}
"""Where DeepKE's raw sample.json keeps the gold annotations; its converter writes them, JSON-encoded,
as `label` (see examples/deepke/*/test.json), which is what its evaluator scores against."""


@dataclass
class PromptRecord:
    """One prompt: what the model reads, and what goes back into its output line.

    `key` identifies the prompt within its input file (line number, plus chunk number for raw input), so it
    is the same on every run over the same file: resume skips keys already in the output.
    """

    key: str
    id: Any
    task: str
    instruction: str
    extra: dict[str, Any] = field(default_factory=dict)
    text: str = ""


# ---------------------------------------------------------------- reading lines


def _read_lines(path: str | os.PathLike[str], allow_empty: bool = False) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file; BadInput if unreadable or empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file: check the input path") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror}): check the path and its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadInput(f"{path}, line {line}: not UTF-8 text ({e.reason}): save the file as UTF-8") from None
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks on.
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines and not allow_empty:
        raise BadInput(f"{path}: the file is empty: give one JSON object per line")
    return lines


def _json_object(path: str | os.PathLike[str], number: int, line: str) -> dict[str, Any]:
    """The JSON object on one input line; BadInput naming the line otherwise."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(
            f"{path}, line {number}: not JSON ({e.msg}, column {e.colno}): each line must be one JSON object"
        ) from None
    if not isinstance(value, dict):
        raise BadInput(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")
    return value


def _where(path: str | os.PathLike[str], number: int) -> str:
    return f"{path}, line {number}"


# ---------------------------------------------------------------- converted input


def read_converted(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Prompts from the authors' converted file: one per line, its instruction string used as is."""
    records = []
    for number, line in _read_lines(path):
        obj = _json_object(path, number, line)
        where = _where(path, number)
        for name in ("id", "instruction"):
            if name not in obj:
                raise BadInput(
                    f"{where}: missing field {name!r}: converted lines need 'id' and 'instruction' "
                    "(like DeepKE's test.json); for plain text lines use a schema and the raw reader"
                )
        instruction = _parse_instruction(obj["instruction"], where)
        extra = {k: v for k, v in obj.items() if k not in ("id", "instruction", *RESERVED_FIELDS)}
        records.append(
            PromptRecord(
                key=str(number),
                id=obj["id"],
                task=_task_of(obj, instruction["instruction"], where),
                instruction=obj["instruction"],
                extra=extra,
                text=instruction["input"],
            )
        )
    return records


def _parse_instruction(value: Any, where: str) -> dict[str, Any]:
    """The decoded instruction JSON string, checked for the keys OneKE reads."""
    if not isinstance(value, str):
        raise BadInput(
            f"{where}: 'instruction' must be a string holding JSON (as json.dumps writes it), "
            f"not {type(value).__name__}"
        )
    try:
        instruction = json.loads(value)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: 'instruction' is not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(instruction, dict):
        raise BadInput(f"{where}: 'instruction' must encode a JSON object with instruction, schema, input")
    missing = [k for k in ("instruction", "schema", "input") if k not in instruction]
    if missing:
        raise BadInput(f"{where}: 'instruction' lacks {', '.join(missing)}: it needs instruction, schema, input")
    for name in ("instruction", "input"):
        if not isinstance(instruction[name], str):
            raise BadInput(f"{where}: the instruction's {name!r} must be a string")
    return instruction


def _task_of(obj: dict[str, Any], instruction_text: str, where: str) -> str:
    """The line's `task` field if any (DeepKE's newer converter writes it), else the task its text is for."""
    if "task" in obj:
        task = str(obj["task"]).upper()
        if task not in oneke.TASKS:
            raise BadInput(f"{where}: unknown task {obj['task']!r}: use one of {', '.join(oneke.TASKS)}")
        return task
    detected = oneke.detect_task(instruction_text)
    if detected is None:
        raise BadInput(
            f"{where}: the instruction text is none of OneKE's published ones, so the task is unknown: "
            f"add a 'task' field ({', '.join(oneke.TASKS)})"
        )
    return detected[0]


# ---------------------------------------------------------------- raw input


def read_raw(
    path: str | os.PathLike[str],
    task: str,
    schema: oneke.Schema,
    lang: str,
    chunk_size: int | None = None,
) -> list[PromptRecord]:
    """Prompts for plain text lines `{"id"?, "text", ...}`: one per schema chunk, all sharing the line's id.

    The id defaults to the line number. Gold annotations in DeepKE's raw form (`entity`/`relation`/`event`)
    become a `label` string as the authors' converter writes it, so the output can be scored by their
    evaluator.
    """
    try:
        chunks = oneke.split_schema(task, oneke.check_schema(task, schema), chunk_size)
        oneke.instruction_text(task, lang)
    except ValueError as e:
        raise BadInput(str(e)) from None
    records = []
    for number, line in _read_lines(path):
        obj = _json_object(path, number, line)
        text = _raw_text(obj, _where(path, number))
        record_id = _raw_id(obj, number, _where(path, number))
        extra = _raw_extra(obj, task)
        for index, chunk in enumerate(chunks):
            records.append(
                PromptRecord(
                    key=f"{number}:{index}",
                    id=record_id,
                    task=task,
                    instruction=oneke.make_instruction(task, chunk, text, lang),
                    extra=dict(extra),
                    text=text,
                )
            )
    return records


def _raw_text(obj: dict[str, Any], where: str) -> str:
    if "text" not in obj:
        raise BadInput(f'{where}: missing field \'text\': raw lines are {{"id"?, "text"}}')
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"{where}: 'text' must be a non-empty string: fix or remove the line")
    return text


def _raw_id(obj: dict[str, Any], number: int, where: str) -> Any:
    record_id = obj.get("id", number)
    if isinstance(record_id, bool) or not isinstance(record_id, str | int):
        raise BadInput(f"{where}: 'id' must be a string or an integer")
    return record_id


def _raw_extra(obj: dict[str, Any], task: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"task": task}
    extra.update({k: v for k, v in obj.items() if k not in ("id", "text", *RESERVED_FIELDS)})
    gold = GOLD_FIELDS[task]
    if "label" not in extra and gold in obj:
        extra["label"] = json.dumps(obj[gold], ensure_ascii=False)
    return extra


# ---------------------------------------------------------------- output and resume


def refuse_same_file(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> None:
    """BadInput if the output would overwrite the input (appending answers to the file being read)."""
    same = os.path.realpath(input_path) == os.path.realpath(output_path)
    if not same and os.path.exists(input_path) and os.path.exists(output_path):
        same = os.path.samefile(input_path, output_path)
    if same:
        raise BadInput(f"{output_path}: the output is the input file: choose another output path")


class OutputWriter:
    """Appends one JSON line per answered prompt, made durable before the next prompt starts."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        try:
            self._file = open(path, "ab")  # binary: one write() of encoded bytes per line
        except OSError as e:
            raise BadInput(f"{path}: cannot open the output for writing ({e.strerror})") from None

    def write(self, record: PromptRecord, output_text: str, parsed: Any, error: str | None) -> None:
        """Write the record's line: input fields, `output` (raw text), `parsed` or `parse_error`, `key`."""
        line: dict[str, Any] = {"id": record.id, "instruction": record.instruction, **record.extra}
        line["output"] = output_text
        if error is None:
            line["parsed"] = parsed
        else:
            line["parse_error"] = error
        line["key"] = record.key
        self._file.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def done_records(output_path: str | os.PathLike[str]) -> dict[str, tuple[Any, str]]:
    """key -> (id, instruction) of the lines already in an output file; {} if there is none.

    A last line without its newline is what a killed run leaves: it is cut off the file (its prompt runs
    again). Any other line that is not one of our output lines means the file is something else: BadInput.
    """
    path = Path(output_path)
    if not path.exists():
        return {}
    _drop_partial_line(path)
    done: dict[str, tuple[Any, str]] = {}
    for number, line in _read_lines(path, allow_empty=True):
        obj = _json_object(path, number, line)
        if not isinstance(obj.get("key"), str) or "instruction" not in obj:
            raise BadInput(
                f"{path}, line {number}: not an output line of this tool (no 'key'): "
                "choose another output path or move that file away"
            )
        done[obj["key"]] = (obj.get("id"), obj["instruction"])
    return done


def _drop_partial_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def done_keys(output_path: str | os.PathLike[str]) -> set[str]:
    """Keys already answered in `output_path` (for --resume); see done_records."""
    return set(done_records(output_path))


def pending_records(records: list[PromptRecord], output_path: str | os.PathLike[str]) -> list[PromptRecord]:
    """The records still to run, refusing to resume over an output written from a different input.

    Keys are line numbers, so the same key from another input or schema would silently skip the wrong
    prompt; a done key whose id or instruction differs from the record's is therefore an error.
    """
    done = done_records(output_path)
    for record in records:
        if record.key in done and done[record.key] != (record.id, record.instruction):
            raise BadInput(
                f"{output_path}: its line for key {record.key} was written for another prompt (different id "
                "or instruction): resume only with the same input, schema and language, or use a new output"
            )
    return [record for record in records if record.key not in done]


def merge_by_id(lines: Iterable[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Per-record view of output lines: the parsed answers of all chunks of one id, merged.

    Lines without `parsed` (answers that failed to parse) add nothing; an id whose lines all failed maps to
    {}. The task comes from the line's `task` field or its instruction text.
    """
    grouped: dict[Any, list[Any]] = {}
    tasks: dict[Any, str] = {}
    for line in lines:
        record_id = line.get("id")
        grouped.setdefault(record_id, []).append(line.get("parsed"))
        if record_id not in tasks:
            tasks[record_id] = _line_task(line)
    return {record_id: oneke.merge_outputs(tasks[record_id], parsed) for record_id, parsed in grouped.items()}


def _line_task(line: dict[str, Any]) -> str:
    if isinstance(line.get("task"), str) and line["task"].upper() in oneke.TASKS:
        return str(line["task"]).upper()
    try:
        detected = oneke.detect_task(json.loads(line["instruction"])["instruction"])
    except (KeyError, TypeError, ValueError):
        detected = None
    if detected is None:
        raise BadInput(f"output line for id {line.get('id')!r}: cannot tell its task: add a 'task' field")
    return detected[0]
