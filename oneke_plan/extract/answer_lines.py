"""The JSON line that carries each prompt's answer, and the writer that journals them.

Answer lines keep the input's fields and add (docs/output-format.md):
- `output`: what DeepKE's evaluator scores: the answer as JSON text, RE/SPO items renamed to its `head`/`tail`,
  or the model's text as it is when that is not a JSON answer; "" when the prompt was not answered;
- `raw_output`: the model's text, verbatim;
- `parsed` (the answer as JSON, as in `output`) or `parse_error` (why the text is not an answer);
- `error` instead, when the prompt was not answered (too long for the plan, out of memory): --resume retries it;
- `key`: the prompt's place in the input (line number; `line:chunk` for raw input).

Why a line, fsync'd, per prompt: a crash, an out-of-memory kill or a SIGTERM loses no answer already given, and
--resume reads them back. Standard library only (no torch).
"""

from __future__ import annotations

import json
import os
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.stops import held
from oneke_plan.extract.inputs import PromptRecord
from oneke_plan.formats import answers
from oneke_plan.io.files import os_error, write_all


def _base_line(record: PromptRecord) -> dict[str, Any]:
    return {"id": record.id, "instruction": record.instruction, **record.extra}


def answer_line(record: PromptRecord, raw_text: str, parsed: Any, parse_error: str | None) -> dict[str, Any]:
    """The line of an answered prompt (field meanings: the module docstring)."""
    line = _base_line(record)
    if parse_error is None:
        answer = answers.head_tail_answer(record.task, parsed)
        line["output"] = json.dumps(answer, ensure_ascii=False)
        line["parsed"] = answer
    else:
        line["output"] = raw_text
        line["parse_error"] = parse_error
    line["raw_output"] = raw_text
    line["key"] = record.key
    return line


def error_line(record: PromptRecord, reason: str) -> dict[str, Any]:
    """The line of a prompt that was not answered (too long, out of memory): --resume runs it again."""
    line = _base_line(record)
    line["output"] = ""
    line["error"] = reason
    line["key"] = record.key
    return line


WINDOW_FIELDS = ("key", "raw_output", "parse_error", "error")
"""What a split record's line keeps of each window's own line in its `windows` entries, with the window's place in
the text: the model's text (or why there is none), from which --resume rebuilds the window's line (unfolded_lines);
its parsed answer is in the record's merge, and each window's would only repeat it."""


def folded_line(whole: PromptRecord, windows: list[PromptRecord], lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The line of a record whose text was split into windows (extract/windows.py): the record's own fields and
    instruction, its answer the merge of the windows' answers (answers.merge_outputs, duplicates removed by the
    scorer's rule), and `windows`, each window's place (`start`, `end`: characters of the text) and its own text.

    A window with no answer (out of memory) makes the record's line an `error` line, so that --resume runs that
    window again; windows whose answer is no JSON are listed in `failed_windows`, and with none parsed the line's
    `output` is "" and `parse_error` says so.
    """
    line = _base_line(whole)
    unanswered = [item for item in lines if "error" in item]
    good = [item["parsed"] for item in lines if "parsed" in item]
    if unanswered:
        line["output"] = ""
        line["error"] = f"{len(unanswered)} of {len(lines)} windows got no answer: {unanswered[0]['error']}"
    elif good:
        merged = answers.merge_outputs(whole.task, good)
        line["output"] = json.dumps(merged, ensure_ascii=False)
        line["parsed"] = merged
    else:
        line["output"] = ""
        line["parse_error"] = f"no window's answer is one: {lines[0].get('parse_error')}"
    failed = [item["key"] for item in lines if "parse_error" in item]
    if failed and good:
        line["failed_windows"] = failed
    line["key"] = whole.key
    line["windows"] = [
        {**{name: item[name] for name in WINDOW_FIELDS if name in item}, **_place(window)}
        for window, item in zip(windows, lines, strict=True)
    ]
    return line


def _place(window: PromptRecord) -> dict[str, int]:
    assert window.window is not None
    return {"start": window.window.start, "end": window.window.end}


def unfolded_lines(line: dict[str, Any], windows: list[PromptRecord]) -> list[dict[str, Any]] | None:
    """The windows' own lines, rebuilt from a split record's line (folded_line) and the windows this run cut the
    record's text into: each answer parsed again from its text, as the run parsed it. None when they are not the
    same record (its id or instruction changed) or not the same windows (another plan, overlap or input)."""
    entries = line.get("windows")
    whole = windows[0].window.whole if windows and windows[0].window else None
    if whole is None or (line.get("id"), line.get("instruction")) != (whole.id, whole.instruction):
        return None
    if not isinstance(entries, list) or len(entries) != len(windows):
        return None
    found = []
    for window, entry in zip(windows, entries, strict=True):
        if not isinstance(entry, dict) or entry.get("key") != window.key:
            return None
        if {name: entry.get(name) for name in ("start", "end")} != _place(window):
            return None
        if isinstance(entry.get("error"), str):
            found.append(error_line(window, entry["error"]))
        elif isinstance(entry.get("raw_output"), str):
            raw = entry["raw_output"]
            found.append(answer_line(window, raw, *answers.parse_output(window.task, raw)))
        else:
            return None
    return found


def is_answered(line: dict[str, Any]) -> bool:
    """Whether a prompt line holds the model's answer (good JSON or not), rather than a reason it got none.

    Lines written before `error` existed (no `raw_output`) marked failures with an empty `output`.
    """
    if "error" in line:
        return False
    return "raw_output" in line or line.get("output") != ""


def encode_line(line: dict[str, Any]) -> bytes:
    """One JSON line, UTF-8, newline-terminated (non-ASCII kept as is, as the authors write their files)."""
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


class OutputWriter:
    """Appends one JSON line per prompt, fsync'd before the next prompt starts, so a crash loses no answer.

    Writes to a path (opened for appending) or to an open file descriptor (not closed here). Every line written
    is kept in `written` (key -> line) for whoever assembles the final output.
    """

    def __init__(self, target: str | os.PathLike[str] | int, name: str | None = None) -> None:
        self.name = name or str(target)
        self._owned = not isinstance(target, int)
        self.written: dict[str, dict[str, Any]] = {}
        if isinstance(target, int):
            self._fd = target
            return
        try:
            self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            raise BadInput(f"{target}: cannot open the output for writing ({e.strerror})") from None

    def write_line(self, line: dict[str, Any]) -> None:
        """Append `line` whole, and record it: a stop signal waits for both (core.stops.held)."""
        data = encode_line(line)
        with held():
            try:
                write_all(self._fd, data)
            except OSError as e:
                raise os_error(
                    self.name, "be written", e, "the answers before this one are kept: rerun with --resume"
                ) from None
            self.written[str(line["key"])] = line

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
