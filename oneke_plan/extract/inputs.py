"""Reading extraction inputs into prompts.

Two input forms:
- the authors' converted files (DeepKE InstructKGC `convert_func.py --split test`, like
  examples/deepke/*/test.json): one prompt per line, `{"id", "instruction", "label"?, "task"?, "source"?}`,
  the instruction already a JSON string, which is passed to the model unchanged;
- raw text lines `{"text", ...}` plus a schema, converted as the authors' converter converts them: one prompt per
  schema chunk, the id the SHA-256 of the text, `source` the input's folder name, gold labels as `label`.

Fields an answer line adds (ANSWER_FIELDS) are dropped from the input's.

Standard library only (no torch).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
from oneke_plan.formats import answers, oneke
from oneke_plan.io import jsonfile, lines
from oneke_plan.io.limits import MAX_ANSWER_LINE_BYTES, MAX_INPUT_BYTES, MAX_INPUT_LINE_BYTES, MAX_JSON_BYTES

ANSWER_FIELDS = (
    "output", "raw_output", "parsed", "parse_error", "error", "key", "merged", "chunks", "failed_chunks", "windows",
    "failed_windows",
)  # fmt: skip
"""Fields answer lines carry; an input carrying them (e.g. a previous output fed back in) has them dropped."""

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
    is the same on every run over the same file: resume matches lines to prompts by it. `error`: why the line
    gives no prompt (too long to read: LongInputLine); the runner writes it as the prompt's error line, and the
    instruction is empty. `window`: set on one window of a long text (extract/windows.py), whose key is the whole
    prompt's key plus `#wN`.
    """

    key: str
    id: Any
    task: str
    instruction: str
    extra: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    error: str | None = None
    window: TextWindow | None = None

    @property
    def group(self) -> tuple[str, str]:
        """The record this prompt belongs to (evaluator_group); a line that was not read is a record of its own
        (its source and id are unknown: it is merged with no other)."""
        if self.error is not None:
            return "", f"unread input line {self.key}"
        return evaluator_group(self.extra, self.id)


@dataclass(frozen=True)
class TextWindow:
    """Where one window of a long text lies: window `number` (1-based) of `count` cut from `whole`'s text, its
    characters [start, end) of that text, of which [new_from, end) are in no earlier window (the ones before are the
    overlap with the previous window). Character offsets are Python string indices (code points)."""

    whole: PromptRecord
    number: int
    count: int
    start: int
    end: int
    new_from: int


def unread_record(line: LongInputLine, key: str, record_id: Any, task: str = "", extra: Any = None) -> PromptRecord:
    """The prompt of a line too long to read: its error line says so."""
    return PromptRecord(key=key, id=record_id, task=task, instruction="", extra=extra or {}, error=line.error)


def evaluator_group(fields: dict[str, Any], record_id: Any) -> tuple[str, str]:
    """The record a line belongs to as DeepKE's evaluator groups lines: its `source` field ('None' if absent) and
    its id, as strings."""
    return str(fields.get("source", "None")), str(record_id)


def text_id(text: str) -> str:
    """The authors' id for a raw text: the SHA-256 of its UTF-8 bytes, in hex (convert_func's `stable_hash`)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- reading lines

_NOT_IN_JSON = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # control characters no JSON text holds unescaped
_LEADING_ID = re.compile(r'\A\s*\{\s*"id"\s*:\s*')


@dataclass(frozen=True)
class LongInputLine:
    """An input line longer than `limit` bytes, not read: its number, and its `id` when the line starts with one."""

    number: int
    limit: int
    id: Any = None

    @property
    def error(self) -> str:
        return (
            f"input line {self.number} is longer than {format_bytes(self.limit)}, more than any prompt a plan "
            "holds; it was not read: shorten or split the line"
        )


def _read_lines(
    path: str | os.PathLike[str],
    allow_empty: bool = False,
    line_limit: int = MAX_INPUT_LINE_BYTES,
    total_limit: int = MAX_INPUT_BYTES,
) -> Iterator[tuple[int, str | LongInputLine]]:
    """(line number, text) of the non-blank lines of a UTF-8 file, read one at a time (oneke_plan.io.lines); a line
    over `line_limit` bytes comes as a LongInputLine, once its head shows it could be a JSON object. BadInput if the
    file is unreadable, empty, larger than `total_limit`, or a line is not UTF-8 text."""
    count = 0
    read = lines.read_lines(path, line_limit, total_limit, "split it into parts and run each")
    try:
        # closing: a line refused below closes the file at once (a FIFO's writer then stops), not when collected
        with contextlib.closing(read):
            for number, raw in read:
                line = _decoded(path, number, raw, line_limit)
                if line is not None:
                    count += 1
                    yield number, line
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file: check the input path") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror}): check the path and its permissions") from None
    if not count and not allow_empty:
        raise BadInput(f"{path}: the file is empty: give one JSON object per line")


def _decoded(
    path: str | os.PathLike[str], number: int, raw: bytes | lines.LongLine, line_limit: int
) -> str | LongInputLine | None:
    """One line as text (None: blank), or the LongInputLine its head allows; BadInput if it is not UTF-8."""
    long = isinstance(raw, lines.LongLine)
    data = raw.head if isinstance(raw, lines.LongLine) else raw
    if number == 1 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        # a long line's head may end inside a character: only what comes before it must decode
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not long)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}, line {number}: not UTF-8 text ({e.reason}): save the file as UTF-8") from None
    if long:
        return _long_line(path, number, text, line_limit)
    return text if text.strip() else None


def _long_line(path: str | os.PathLike[str], number: int, head: str, limit: int) -> LongInputLine:
    """A line too long to read, after what its head shows: a line that cannot be a JSON object (a control
    character, as /dev/zero's endless NUL bytes; no opening brace) is a bad line like any other, refused at once;
    one that may be is that line's error, with the `id` it starts with, if any (DeepKE's files start with it)."""
    bad = _NOT_IN_JSON.search(head)
    if bad is not None:
        raise BadInput(
            f"{path}, line {number}: not JSON (the control character U+{ord(bad.group()):04X} at column "
            f"{bad.start() + 1}): each line must be one JSON object"
        )
    stripped = head.lstrip(" \t\r")
    if stripped and not stripped.startswith("{"):
        raise BadInput(f"{path}, line {number}: expected a JSON object, and the line starts with {stripped[:1]!r}")
    record_id = None
    start = _LEADING_ID.match(head)
    if start is not None:
        try:
            value, _ = json.JSONDecoder().raw_decode(head, start.end())
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(str(value)) <= 1000:
            record_id = value
    return LongInputLine(number, limit, record_id)


def _json_object(path: str | os.PathLike[str], number: int, line: str) -> dict[str, Any]:
    """The JSON object on one input line; BadInput naming the line otherwise."""
    try:
        value = jsonfile.loads(line)
    except jsonfile.JsonLimitError as e:
        raise BadInput(f"{path}, line {number}: {e.msg} (column {e.colno}): fix or remove the line") from None
    except json.JSONDecodeError as e:
        _refuse_one_document(path, number, line)
        raise BadInput(
            f"{path}, line {number}: not JSON ({e.msg}, column {e.colno}): each line must be one JSON object"
        ) from None
    if not isinstance(value, dict):
        _refuse_one_document(path, number, line)
        raise BadInput(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")
    return value


def _refuse_one_document(path: str | os.PathLike[str], number: int, line: str) -> None:
    """BadInput for a file that is one JSON document (an array, or an object over several lines) where JSON Lines,
    one object per line, is read: a line that opens an array or is a lone `{` says so, not 'not JSON (column 2)'.
    Every reader of JSON Lines here refuses it alike (oneke-run's input, raw or converted, and oneke-score's
    answers), none accepts it: DeepKE's files are JSON Lines, as oneke-run's output is."""
    text = line.strip()
    if text.startswith("["):
        raise BadInput(
            f"{path}, line {number}: is a JSON array; the file must be JSON Lines, one JSON object per line (a file "
            f"holding one array converts with: jq -c '.[]' {path})"
        )
    if text == "{":
        raise BadInput(
            f"{path}, line {number}: is a lone '{{', as in one JSON object written over several lines; the file must "
            f"be JSON Lines, one JSON object per line (jq -c . {path} writes it so)"
        )


def read_json_objects(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file of answers (oneke-score's gold and
    predictions); BadInput naming the line otherwise, a line over limits.MAX_ANSWER_LINE_BYTES included."""
    found = []
    for number, line in _read_lines(path, allow_empty=True, line_limit=MAX_ANSWER_LINE_BYTES):
        if isinstance(line, LongInputLine):
            raise BadInput(
                f"{path}, line {number}: longer than {format_bytes(line.limit)}, more than any answer line holds: "
                "fix or remove the line"
            )
        found.append((number, _json_object(path, number, line)))
    return found


def _where(path: str | os.PathLike[str], number: int) -> str:
    return f"{path}, line {number}"


# ---------------------------------------------------------------- converted input


def read_converted(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Prompts from the authors' converted file: one per line, its instruction string used as is."""
    records = []
    for number, line in _read_lines(path):
        if isinstance(line, LongInputLine):
            records.append(unread_record(line, str(number), line.id))  # the line's own id, when it starts with one
            continue
        obj = _json_object(path, number, line)
        where = _where(path, number)
        if "instruction" not in obj and "text" in obj:
            raise BadInput(
                f"{path} looks like a raw DeepKE file (line {number} has 'text' and no 'instruction'): pass --task "
                "and --schema to make its prompts (converted files carry them)"
            )
        for name in ("id", "instruction"):
            if name not in obj:
                raise BadInput(
                    f"{where}: missing field {name!r}: converted lines need 'id' and 'instruction' "
                    "(like DeepKE's test.json); for plain text lines use a schema and the raw reader"
                )
        instruction = _parse_instruction(obj["instruction"], where)
        extra = {k: v for k, v in obj.items() if k not in ("id", "instruction", *ANSWER_FIELDS)}
        records.append(
            PromptRecord(
                key=str(number),
                id=obj["id"],
                task=_task_of(obj, instruction, where),
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
        instruction = jsonfile.loads(value)
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


def known_task(value: Any, where: str) -> str:
    """`value` (a line's `task` field, or --task) in upper case, if OneKE has that task; BadInput naming `where`
    otherwise."""
    try:
        return oneke.check_task(str(value).upper())
    except oneke.PromptError as e:
        raise BadInput(f"{where}: {e}") from None


def _task_of(obj: dict[str, Any], instruction: dict[str, Any], where: str) -> str:
    """The line's `task` field if any (DeepKE's newer converter writes it), else the task its text is for."""
    if "task" in obj:
        return known_task(obj["task"], where)
    detected = oneke.detect_task(instruction["instruction"], instruction["schema"])
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
    example: list[Any] | None = None,
    notes: list[str] | None = None,
) -> list[PromptRecord]:
    """Prompts for plain text lines `{"text", ...}`, as the authors' `convert_func.py --split test` builds them.

    One prompt per schema chunk, all sharing the text's id (its SHA-256, whatever id the line has: the line's own
    `id` is kept as `input_id`) and `source` (the line's, else the input's folder name, as the authors take it).
    EEA asks only about each record's own gold events (their triggers are known): a line needs `event`, and a
    line whose `event` list is empty is skipped, as the authors skip it (a note is appended to `notes`). Gold
    annotations in DeepKE's raw form (`entity`/`relation`/`event`) become the `label` string, repeats removed as
    the authors remove them. `example` (few-shot items) goes into every prompt.
    """
    try:
        checked = oneke.check_schema(task, schema)
        chunks = oneke.split_schema(task, checked, chunk_size)
        oneke.make_instruction(task, chunks[0], "", lang, example)  # an unknown language or few-shot form fails here
    except ValueError as e:
        raise BadInput(str(e)) from None
    # A folder name that is not UTF-8 arrives with surrogate escapes, which no output line could hold.
    folder = Path(os.path.abspath(path)).parent.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    records: list[PromptRecord] = []
    skipped: list[int] = []
    for number, line in _read_lines(path):
        if isinstance(line, LongInputLine):
            # the id would be the SHA-256 of the text, which was not read; the line's own id is its input_id
            own = {"input_id": line.id} if line.id is not None else {}
            records.append(unread_record(line, f"{number}:0", None, task, {"task": task, "source": folder, **own}))
            continue
        obj = _json_object(path, number, line)
        where = _where(path, number)
        text = _raw_text(obj, where)
        gold = _raw_gold(obj, task, where)
        asked = _eea_chunks(checked, gold, chunk_size, where) if task == "EEA" else chunks
        if not asked:
            skipped.append(number)
            continue
        extra = _raw_extra(obj, task, folder, gold)
        record_id = text_id(text)
        for index, chunk in enumerate(asked):
            records.append(
                PromptRecord(
                    key=f"{number}:{index}",
                    id=record_id,
                    task=task,
                    instruction=oneke.make_instruction(task, chunk, text, lang, example),
                    extra=dict(extra),
                    text=text,
                )
            )
    if skipped and notes is not None:
        shown = ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else "")
        notes.append(
            f"{len(skipped)} lines of {path} have no events and were skipped (EEA asks only about a record's own "
            f"events, as the authors do): lines {shown}"
        )
    return records


def _raw_text(obj: dict[str, Any], where: str) -> str:
    if "text" not in obj:
        raise BadInput(f"{where}: missing field 'text': raw lines are {{\"text\", ...}}")
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"{where}: 'text' must be a non-empty string: fix or remove the line")
    return text


def _raw_gold(obj: dict[str, Any], task: str, where: str) -> list[Any] | None:
    """The line's gold annotations (DeepKE's raw `entity`/`relation`/`event` list), None if it has none."""
    name = GOLD_FIELDS[task]
    if name not in obj:
        if task == "EEA":
            raise BadInput(
                f"{where}: EEA asks about a record's known events, but the line has no 'event' list "
                '([{"event_type", "event_trigger", "arguments"}]); to find events in plain text use --task EE'
            )
        return None
    gold = obj[name]
    if not isinstance(gold, list) or not all(isinstance(item, dict) for item in gold):
        raise BadInput(f"{where}: '{name}' must be a list of objects, as in DeepKE's sample.json")
    return gold


def _eea_chunks(schema: oneke.Schema, events: list[Any] | None, chunk_size: int | None, where: str) -> list[Any]:
    """The schema chunks of one EEA record: its own event types (first-seen order) with their schema arguments.

    The authors' EEAProcesser.get_schemas: `{"event_type", "arguments"}` per distinct gold event type.
    """
    roles = {item["event_type"]: item["arguments"] for item in schema if isinstance(item, dict)}
    asked: list[dict[str, Any]] = []
    for event in events or []:
        event_type = event.get("event_type")
        if not isinstance(event_type, str):
            raise BadInput(f"{where}: each event needs an 'event_type' string")
        if event_type not in roles:
            raise BadInput(f"{where}: event type {event_type!r} is not in the schema: add it with its arguments")
        if all(item["event_type"] != event_type for item in asked):
            asked.append({"event_type": event_type, "arguments": roles[event_type]})
    return oneke.split_schema("EEA", asked, chunk_size) if asked else []


def _raw_extra(obj: dict[str, Any], task: str, folder: str, gold: list[Any] | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"task": task, "source": obj.get("source", folder)}
    if "id" in obj:
        extra["input_id"] = obj["id"]
    skip = {"id", "text", "source", GOLD_FIELDS[task], *ANSWER_FIELDS}
    extra.update({k: v for k, v in obj.items() if k not in skip})
    if "label" not in extra and gold is not None:
        extra["label"] = json.dumps(answers.unique_labels(task, gold), ensure_ascii=False)
    return extra


def read_example(spec: str) -> list[Any]:
    """Few-shot items for --example: inline JSON or a JSON file, a list of {"input": text, "output": answer}."""
    origin = "--example"
    text = spec
    if not spec.lstrip().startswith("["):
        origin = f"--example file {spec}"
        try:
            text = jsonfile.read_bounded(Path(spec), MAX_JSON_BYTES, "give a JSON list").decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{origin}: cannot be read as UTF-8 text ({e}): give a JSON list or a file") from None
    try:
        items = jsonfile.loads(text)
    except jsonfile.JsonLimitError as e:
        raise BadInput(f"{origin}: {e.msg} (line {e.lineno} column {e.colno})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{origin}: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    good = (
        isinstance(items, list)
        and items
        and all(isinstance(item, dict) and isinstance(item.get("input"), str) and "output" in item for item in items)
    )
    if not good:
        raise BadInput(f'{origin}: give a non-empty JSON list of {{"input": text, "output": answer}} items')
    return items
