"""oneke-run's output files: a journal that every answer goes to at once, and the final output, written once.

For `--output OUT` (docs/output-format.md):
- `OUT.journal` (journal_path) is created when a run starts: a header line, then one fsync'd JSON line per
  prompt as it is answered. A crash loses nothing already answered; `--resume` reads it. The run holds an
  exclusive, non-blocking flock on it from start to end, so a second run on the same OUT stops at once.
- `OUT` is written when every prompt has a line: one line per prompt in input order, plus a merged line after
  the last prompt of each record (source + id, as DeepKE's evaluator groups them) that has several. It goes
  through a temporary file and os.replace; then the journal is removed.
- `--resume` keeps every answered line of OUT (once validated as this tool's output) and of the journal, and runs
  again the prompts with no line or an `error` line (too long for the plan, out of memory).

One journal per worker (oneke-run under torchrun, oneke_plan/extract/workers.py): journal_path takes the worker's
rank and the world size, so each worker appends to and locks its own part; every worker's start() also reads the other
parts (what they answered is done, whatever the world size was), and when all are through, one of them writes OUT
from all parts (finish with peers=True) and removes them.

Nothing here is deleted or replaced unless it is a regular single-link file the tool wrote (oneke_plan.io.files).
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.stops import held
from oneke_plan.extract.answer_lines import OutputWriter, encode_line, folded_line, is_answered, unfolded_lines
from oneke_plan.extract.inputs import PromptRecord
from oneke_plan.formats import answers
from oneke_plan.io import jsonfile
from oneke_plan.io.files import Reads, fsync_dir, os_error, output_target, same_file, write_all, write_atomic
from oneke_plan.io.limits import MAX_ANSWER_LINE_BYTES

JOURNAL_FORMAT = 1
MODES = ("new", "resume", "overwrite")
MERGED_OUTPUT = "{}"
"""A merged line's `output`: no answer of its own, so DeepKE's evaluator, which joins every line of an id, counts
each answer once. The merged answer is in the line's `parsed`."""


def journal_path(output: str | os.PathLike[str], rank: int = 0, world_size: int = 1) -> Path:
    """Where the worker `rank` of `world_size` journals answers for `output`: OUT.journal for a single process,
    OUT.journal-R-of-N for one of several."""
    output = Path(output)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    suffix = ".journal" if world_size == 1 else f".journal-{rank}-of-{world_size}"
    return output.with_name(output.name + suffix)


# ---------------------------------------------------------------- reading existing files


def is_prompt_line(line: Any) -> bool:
    return isinstance(line, dict) and isinstance(line.get("key"), str) and isinstance(line.get("instruction"), str)


def is_merged_line(line: Any) -> bool:
    return isinstance(line, dict) and line.get("merged") is True and isinstance(line.get("chunks"), list)


def _is_output_line(line: Any) -> bool:
    return is_prompt_line(line) or is_merged_line(line)


def _first_line_is_foreign(path: Path) -> bool:
    """Whether the first line of `path` is complete, not blank and no output line (or longer than any answer line,
    limits.MAX_ANSWER_LINE_BYTES), read without reading further: a huge file that is no output is refused from it."""
    with open(path, "rb") as handle:
        line = handle.readline(MAX_ANSWER_LINE_BYTES + 1)
    if not line.endswith(b"\n"):
        return len(line) > MAX_ANSWER_LINE_BYTES
    return bool(line.strip()) and not _is_output_line(_decode(line))


def _complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The newline-terminated lines of `data`, and the length they cover (a killed writer leaves a partial tail)."""
    end = data.rfind(b"\n") + 1
    return [line for line in data[:end].split(b"\n") if line.strip()], end


def _decode(raw: bytes) -> Any:
    try:
        return jsonfile.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


_HEAD = 4096  # bytes that hold a journal's header line (under 100)


def _may_be_journal(head: bytes) -> bool:
    """Whether a file starting with `head` (its first _HEAD bytes) may be a journal: its first line is the header,
    or the file is too short to tell. A file of any size that is not one is refused without reading further."""
    if b"\n" not in head:
        return len(head) < _HEAD
    header, _, _ = _parse_journal(head[: head.index(b"\n") + 1])
    return header is not None


def _parse_journal(data: bytes) -> tuple[dict[str, Any] | None, list[Any], int]:
    """(header, decoded answer lines, length of the complete lines) of a journal's bytes. The header is None when
    the first line is not this version's journal header; an undecodable answer line is None."""
    lines, end = _complete_lines(data)
    header = _decode(lines[0]) if lines else None
    if not (isinstance(header, dict) and header.get("oneke_run_journal") == JOURNAL_FORMAT):
        header = None
    return header, [_decode(raw) for raw in lines[1:]], end


def read_output(path: Path) -> list[dict[str, Any]]:
    """The lines of an existing output, after checking every complete line is one this tool writes.

    Nothing is changed: a partial last line (an older version appended to OUT directly) is ignored, and OUT is only
    ever replaced as a whole. BadInput, naming the first foreign line, if the file is not such an output.
    """
    try:
        if _first_line_is_foreign(path):
            raise BadInput(
                f"--output {path}, line 1: not an answer line of oneke-run: it is left as is; choose another path, "
                "or pass --overwrite to replace the file"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise os_error(path, "be read", exc) from None
    lines, _ = _complete_lines(data)
    if not lines:
        raise BadInput(
            f"--output {path}: exists but holds no answer lines, so it is not an output of oneke-run: "
            "choose another path, or pass --overwrite to replace it"
        )
    parsed = []
    for number, raw in enumerate(lines, 1):
        line = _decode(raw)
        if not _is_output_line(line):
            raise BadInput(
                f"--output {path}, line {number}: not an answer line of oneke-run: it is left as is; choose another "
                "path, or pass --overwrite to replace the file"
            )
        parsed.append(line)
    return parsed


# ---------------------------------------------------------------- the run's files


FIRST_LINE_BYTES = 4 * 2**20
"""How much of an existing OUT is read to find its first line (an answer line is a prompt and its answer: a few
KiB)."""


def written_by_oneke_run(path: Path) -> bool:
    """Whether the file at `path` looks like an output of oneke-run: its first line is an answer line (a prompt's
    line or a merged one). At most FIRST_LINE_BYTES are read; --resume then validates every line (read_output)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(FIRST_LINE_BYTES)
    except OSError:
        return False
    end = head.find(b"\n")
    if end < 0:
        return False
    line = _decode(head[:end])
    return is_prompt_line(line) or is_merged_line(line)


class RunOutput:
    """The files of one oneke-run: lock and journal at start(), the final output at finish().

    Use as a context manager: on exit the lock is released, and a journal this run created is removed if it holds
    no answer (a failed load or a refused machine leaves nothing behind).
    """

    def __init__(
        self,
        output: Path,
        input_path: Path | None,
        mode: str,
        rank: int = 0,
        world_size: int = 1,
        reads: Reads | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.output = Path(output)
        # What the run reads (the input file, None: records not from a file): never OUT nor its journal.
        self.reads = (reads or Reads()).file(input_path, "the input file")
        self.mode = mode
        self.journal = journal_path(self.output, rank, world_size)
        self.done: dict[str, dict[str, Any]] = {}
        self.writer: OutputWriter | None = None
        self._fd: int | None = None
        self._created = False
        self._output_stat: os.stat_result | None = None
        self._header_bytes = 0
        self._prepared = False
        self._kept = False  # close() found answers in the journal (kept for --resume)
        self._finished = False  # finish() wrote OUT and removed the journals

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- start

    def start(self, records: list[PromptRecord], mine: Any = None) -> list[PromptRecord]:
        """Check the paths, take the lock, read what earlier runs (and other workers) answered; return the prompts
        still to run (of those `mine(record)` says this worker runs, when given)."""
        if not self._prepared:
            self.prepare()
        self._lock()
        header, existing = self._read_journal()
        if self.mode == "resume":
            # An interrupted --overwrite's journal: the old OUT is to be replaced, its answers are not kept.
            if header.get("mode") != "overwrite" and self._output_stat is not None:
                windows = windows_of(records)
                for line in read_output(self.output):
                    if is_prompt_line(line):
                        self._keep(line, windows)
            for peer in self.peer_journals():
                for line in self._peer_answers(peer):
                    self.done.setdefault(line["key"], line)
        for line in existing:
            self.done[line["key"]] = line  # the journal is newer than OUT; later lines win
        _check_same_input(self.done, records, self.output)
        assert self._fd is not None
        self.writer = OutputWriter(self._fd, str(self.journal))
        return [
            r
            for r in records
            if (mine is None or mine(r)) and (r.key not in self.done or not is_answered(self.done[r.key]))
        ]

    def _keep(self, line: dict[str, Any], windows: dict[str, list[PromptRecord]]) -> None:
        """Keep one prompt line of OUT as done; a split record's line as its windows' lines, when this run cuts its
        text into the same windows."""
        key = line["key"]
        if "windows" not in line or key not in windows:
            self.done[key] = line
            return
        unfolded = unfolded_lines(line, windows[key])
        if unfolded is None:
            raise BadInput(
                f"{self.output}: its line for key {key} was written for another prompt (different id or instruction) "
                "or split into other windows than this run's: resume only with the same input, schema, language, "
                "profile (its max_input_tokens) and --window-overlap, or use a new --output"
            )
        for window in unfolded:
            self.done[window["key"]] = window

    def prepare(self) -> None:
        """What start() checks before it creates anything: the paths, and (a new run) that no worker of an earlier
        run left a journal. Workers of one run call it before any of them starts (a barrier between): after, their
        own journals are there."""
        self._check_paths()
        peers = self.peer_journals()
        if peers and self.mode == "new":
            raise BadInput(
                f"--output {self.output}: an interrupted run left answers in {peers[0]}: pass --resume to continue "
                "it, or --overwrite to start over"
            )
        self._prepared = True

    def peer_journals(self) -> list[Path]:
        """The journals of OUT other than this worker's: other workers' parts, of any world size, and the single
        process's (a run may be resumed with another number of workers)."""
        folder = self.output.parent
        names = [self.output.name + ".journal", *(p.name for p in folder.glob(self.output.name + ".journal-*-of-*"))]
        return sorted(folder / n for n in set(names) if n != self.journal.name and (folder / n).is_file())

    def _peer_answers(self, peer: Path) -> list[dict[str, Any]]:
        """The answer lines of another worker's journal, read without a lock (validated, never changed); an
        answered line of it is kept over an error line of another."""
        data = _read_journal_or_none(peer)
        if data is None:
            return []
        header, answers, _ = _parse_journal(data)
        if header is None:
            raise BadInput(f"{peer}: not a journal of this oneke-run version, so it is left as is: move it away")
        return [line for line in answers if is_prompt_line(line)]

    def _check_paths(self) -> None:
        self._output_stat = output_target(
            self.output,
            "--output",
            self.reads,
            written_by_oneke_run,
            "an output of oneke-run",
            self.mode == "overwrite",
            "out.jsonl",
        )
        # the journal: validated as one before it is resumed or replaced (_validated_journal)
        output_target(self.journal, f"--output {self.output}: its journal", self.reads, None, "a journal")
        if self._output_stat is not None and self.mode == "new":
            raise BadInput(
                f"--output {self.output}: already exists; pass --resume to continue it or --overwrite to replace it"
            )

    def _lock(self) -> None:
        """Create the journal already locked and with its header (a temporary file hard-linked into place), or lock
        the journal an interrupted run left. Another process holding it means another run: BadInput at once. A stop
        signal waits for the end (core.stops.held): the journal is there and recorded as this run's, or not there."""
        with held():
            self._lock_held()

    def _lock_held(self) -> None:
        header = {"oneke_run_journal": JOURNAL_FORMAT, "mode": self.mode, "pid": os.getpid()}
        self._header_bytes = len(encode_line(header))
        folder = self.journal.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.journal.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise os_error(
                folder, "create the run's journal in this folder", exc, "choose another --output folder"
            ) from None
        try:
            write_all(fd, encode_line(header))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.link(tmp, self.journal)
                self._fd, self._created = fd, True
                fsync_dir(folder)
                return
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links: create in place (a tiny window before the lock)
                os.close(fd)
                fd = -1
                self._fd, self._created = _create_locked(self.journal, header), True
                return
            self._fd = self._lock_existing_journal()
            if self.mode == "overwrite":  # an interrupted run's journal (validated first): this run starts over
                self._validated_journal(self._fd)
                os.replace(tmp, self.journal)
                os.close(self._fd)
                self._fd, self._created, fd = fd, True, -1
        except OSError as exc:
            raise os_error(self.journal, "be created", exc, "choose another --output folder") from None
        finally:
            if fd != -1 and fd != self._fd:
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)

    def _lock_existing_journal(self) -> int:
        fd = os.open(self.journal, os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _journal_pid(self.journal)
            who = f"another oneke-run (pid {pid})" if pid else "another oneke-run"
            raise BadInput(
                f"--output {self.output}: {who} is writing it (it holds the lock on {self.journal}): wait for it "
                "to finish, or choose another --output"
            ) from None
        if not same_file(os.fstat(fd), self.journal):  # removed by a run that just finished: ours is stale
            os.close(fd)
            raise BadInput(f"--output {self.output}: another oneke-run just finished with it; run this again")
        return fd

    def _read_journal(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(header, answer lines) of a journal an earlier run left (({}, []) if this run created it), once it is
        validated as one; a partial last line (the kill came mid-write) is then cut off."""
        if self._created:
            return {}, []
        assert self._fd is not None
        header, answers, end, size = self._validated_journal(self._fd)
        if self.mode == "new":
            raise BadInput(
                f"--output {self.output}: an interrupted run left {len(answers)} answers in {self.journal}: pass "
                "--resume to continue it, or --overwrite to start over"
            )
        if end < size:
            try:
                os.ftruncate(self._fd, end)
            except OSError as exc:
                raise os_error(self.journal, "be repaired (cut its partial last line)", exc) from None
        return header, answers

    def _validated_journal(self, fd: int) -> tuple[dict[str, Any], list[dict[str, Any]], int, int]:
        """(header, answer lines, length of the complete lines, file size) of a journal; BadInput, touching
        nothing, if it is not one."""
        data = _read_fd(fd, self.journal) if _may_be_journal(os.pread(fd, _HEAD, 0)) else b""
        header, answers, end = _parse_journal(data)
        if header is None:
            raise BadInput(
                f"{self.journal}: not a journal of this oneke-run version, so it is left as is: move it away to "
                f"run with --output {self.output}"
            )
        bad = next((n for n, line in enumerate(answers, 2) if not is_prompt_line(line)), None)
        if bad is not None:
            raise BadInput(f"{self.journal}, line {bad}: not an answer line of oneke-run; it is left as is")
        return header, answers, end, len(data)

    # -------------------------------------------------------- finish

    def finish(self, records: list[PromptRecord], peers: bool = False) -> bool:
        """Write OUT from every prompt's line, in input order with merged lines, then remove the journal (with
        `peers`: after reading every other worker's journal, which are then removed too).

        Returns False when OUT already held exactly that (nothing was rewritten).
        """
        if self.writer is not None:
            self.done.update(self.writer.written)
        others = self.peer_journals() if peers else []
        for peer in others:
            for line in self._peer_answers(peer):
                known = self.done.get(line["key"])
                if known is None or (is_answered(line) and not is_answered(known)):
                    self.done[line["key"]] = line
        missing = [r.key for r in records if r.key not in self.done]
        if missing:
            raise RuntimeError(f"no line for prompts {missing[:5]}: the run ended early")
        data = b"".join(encode_line(line) for line in final_lines(records, self.done))
        changed = not (self._output_stat is not None and _read_or_none(self.output) == data)
        with held():  # a stop waits: OUT written and the journals removed, or OUT as it was and the journals kept
            if changed:
                write_atomic(
                    self.output,
                    [data],
                    self._output_stat,
                    f"every answer is kept in {self.journal}: rerun with --resume",
                )
            self._remove_journal()
            for peer in others:
                _remove_finished_journal(peer)
            self._finished = True
        return changed

    def _remove_journal(self) -> None:
        try:
            self.journal.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise os_error(self.journal, "be removed (the output is complete; remove it yourself)", exc) from None
        fsync_dir(self.journal.parent)
        self._created = False

    def _journal_has_answers(self) -> bool:
        """Whether anything beyond the header reached the journal: its size, not `writer.written`, which an
        interrupt between a line's write and its bookkeeping would leave behind."""
        assert self._fd is not None
        return not self._created or os.fstat(self._fd).st_size > self._header_bytes

    def interruption_note(self) -> str:
        """What an interrupted run leaves, and how to continue (for the one line the CLI prints), before or after
        close()."""
        if self._finished:
            return f"{self.output} was already complete"
        kept = self._journal_has_answers() if self._fd is not None else self._kept
        if not kept:
            return "no prompt was answered yet, so nothing was kept"
        if not self.journal.exists():  # another worker's finish() wrote OUT and removed every part
            return f"{self.output} was already complete"
        return f"every answer so far is kept in {self.journal}: run the same command with --resume to continue"

    def close(self) -> None:
        """Release the lock; remove the journal this run created if no answer reached it. A stop signal waits for
        the end (core.stops.held)."""
        if self._fd is None:
            return
        with held():
            try:
                self._kept = self._journal_has_answers()
                if self._created and not self._kept:
                    self.journal.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None


def _check_same_input(done: dict[str, dict[str, Any]], records: list[PromptRecord], output: Path) -> None:
    """Refuse lines that another input wrote: keys are line numbers, so they would silently match wrong prompts."""
    by_key = {record.key: record for record in records}
    for key, line in done.items():
        record = by_key.get(key)
        if record is None:
            raise BadInput(
                f"{output}: holds an answer for prompt {key}, which this input does not have: resume only with the "
                "same input, schema and language, or use a new --output"
            )
        if (line.get("id"), line.get("instruction")) != (record.id, record.instruction):
            raise BadInput(
                f"{output}: its line for key {key} was written for another prompt (different id or instruction): "
                "resume only with the same input, schema and language, or use a new --output"
            )


def windows_of(records: list[PromptRecord]) -> dict[str, list[PromptRecord]]:
    """The windows of each split record (extract/windows.py), by the whole record's key, in order."""
    found: dict[str, list[PromptRecord]] = {}
    for record in records:
        if record.window is not None:
            found.setdefault(record.window.whole.key, []).append(record)
    return found


def _whole_lines(
    records: list[PromptRecord], done: dict[str, dict[str, Any]]
) -> Iterator[tuple[PromptRecord, dict[str, Any]]]:
    """(prompt, its line) in input order, the windows of a split record folded into that record's line."""
    windows: list[PromptRecord] = []
    for record in records:
        if record.window is None:
            yield record, done[record.key]
            continue
        windows.append(record)
        if record.window.number == record.window.count:
            whole = record.window.whole
            yield whole, folded_line(whole, windows, [done[window.key] for window in windows])
            windows = []


def final_lines(records: list[PromptRecord], done: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every prompt's line in input order (a split record's windows folded into one line); after the last prompt of
    a record with several, its merged line."""
    whole = list(_whole_lines(records, done))
    groups: dict[tuple[str, str], list[PromptRecord]] = {}
    for record, _ in whole:
        groups.setdefault(record.group, []).append(record)
    lines = {record.key: line for record, line in whole}
    for record, line in whole:
        yield line
        members = groups[record.group]
        if len(members) > 1 and members[-1] is record:
            yield merged_line(record.task, [lines[m.key] for m in members])


def merged_line(task: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """One record's answer from all its chunks' lines (answers.merge_outputs), marked `"merged": true`.

    Its `output` is "{}" (MERGED_OUTPUT) so that DeepKE's evaluator, which adds every line of an id to the record,
    does not count the chunks' answers twice; readers of the merged answer take `parsed`. `chunks` lists the keys
    merged; `failed_chunks` those that gave no parsed answer.
    """
    first = lines[0]
    line: dict[str, Any] = {"id": first.get("id"), "task": task}
    for name in ("source", "label"):
        if name in first:
            line[name] = first[name]
    line["output"] = MERGED_OUTPUT
    line["parsed"] = answers.merge_outputs(task, [item.get("parsed") for item in lines])
    line["merged"] = True
    line["chunks"] = [item["key"] for item in lines]
    failed = [item["key"] for item in lines if "parsed" not in item]
    if failed:
        line["failed_chunks"] = failed
    return line


# ---------------------------------------------------------------- small helpers


def _create_locked(path: Path, header: dict[str, Any]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    write_all(fd, encode_line(header))
    return fd


def _read_fd(fd: int, name: Path) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    try:
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        raise os_error(name, "be read", exc) from None


def _read_journal_or_none(path: Path) -> bytes | None:
    """Another worker's journal, or None if it cannot be read; only its head when that shows it is no journal."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
            return head + handle.read() if _may_be_journal(head) else head
    except OSError:
        return None


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _remove_finished_journal(path: Path) -> None:
    """Remove another worker's journal once its answers are in OUT: only a regular single-link file nobody holds
    the lock of (a run still writing it keeps it, and says so)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise os_error(path, "be removed (its answers are in the output; remove it yourself)", exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"{path}: another oneke-run is still writing it; it is left as is") from None
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and same_file(info, path):
            path.unlink()
    finally:
        os.close(fd)


def _journal_pid(path: Path) -> int | None:
    """The pid in a journal's header (read-only), for the message naming the run that holds it."""
    try:
        with open(path, "rb") as handle:
            header = _decode(handle.readline(4096))
    except OSError:
        return None
    pid = header.get("pid") if isinstance(header, dict) else None
    return pid if isinstance(pid, int) else None
