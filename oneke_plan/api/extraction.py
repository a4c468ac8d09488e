"""api.read_records and api.extract: an input file's prompts, and their answers from a loaded model, batched and
journaled as oneke-run does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.checks import json_text, one_of
from oneke_plan.api.options import LANGUAGES, PathLike, Report
from oneke_plan.api.preflight import output_mode, within_plan
from oneke_plan.core.errors import BadInput
from oneke_plan.extract.engines import hf_decoder
from oneke_plan.io.files import Reads
from oneke_plan.plan.profile import Profile

if TYPE_CHECKING:
    from oneke_plan.extract.answer_lines import OutputWriter
    from oneke_plan.extract.inputs import PromptRecord
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.runner import Decoder, Runner, RunStats


def read_records(
    input: PathLike,
    task: str | None = None,
    schema: str | list[Any] | dict[str, Any] | None = None,
    lang: str = "zh",
    chunk_size: int | None = None,
    example: str | list[Any] | None = None,
    report: Report | None = None,
) -> list[PromptRecord]:
    """The prompts of an input file, as oneke-run reads them.

    Without `task`: the authors' converted file (one `{"id", "instruction", ...}` line per prompt, the instruction
    passed to the model unchanged). With `task` (NER, RE, EE, EET, EEA, KG or SPO): raw text lines (`{"text", ...}`)
    and a `schema` (inline JSON, a schema file, or the list itself), one prompt per `chunk_size` schema items (-1:
    no split; default: the authors' size per task), in `lang` ("zh" or "en"), with few-shot `example` items (zh).
    Lines skipped with a reason are Report notes; BadInput when no prompt is left.
    """
    from oneke_plan.extract.inputs import read_converted, read_example, read_raw
    from oneke_plan.formats import oneke

    report = report or Report()
    notes: list[str] = []
    one_of("--lang", lang, LANGUAGES)
    if task is None:
        for flag, value in (("--schema", schema), ("--example", example), ("--chunk-size", chunk_size)):
            if value is not None:
                raise BadInput(f"{flag} needs --task (raw text input); converted files carry their prompts")
        records = read_converted(input)
    else:
        if schema is None:
            raise BadInput(f"--task {task} needs --schema: inline JSON or a schema file")
        try:
            checked = oneke.check_task(task.upper())
            items = oneke.load_schema(json_text(schema), checked)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if chunk_size is not None and (chunk_size == 0 or chunk_size < -1):
            raise BadInput(f"--chunk-size must be a positive integer or -1 (no split), not {chunk_size}")
        examples = read_example(json_text(example)) if example is not None else None
        records = read_raw(input, checked, items, lang, chunk_size, examples, notes)
    if not records:  # the refusal says why in its one line
        raise BadInput(f"{input}: no prompt to run" + (f": {'; '.join(notes)}" if notes else ""))
    if all(record.error is not None for record in records):  # nothing the model could be loaded for
        others = " (and so is every other line)" if len(records) > 1 else ""
        raise BadInput(f"{input}: no prompt to run: {records[0].error}{others}")
    for note in notes:
        report.note(note)
    return records


def windowed(
    records: list[PromptRecord],
    tokenizer: Any,
    profile: Profile,
    split_long: bool,
    window_overlap: int | None,
    report: Report,
) -> list[PromptRecord]:
    """`records` as a run answers them: with `split_long`, each prompt longer than the profile's max_input_tokens
    replaced by windows of its text that fit (oneke_plan.extract.windows; `window_overlap` tokens repeated across
    each cut, None: one sentence), what was split said in a Report note."""
    if not split_long:
        if window_overlap is not None:
            raise BadInput("--window-overlap needs --split-long: without it no text is split")
        return records
    from oneke_plan.extract.windows import split_long as split
    from oneke_plan.extract.windows import summary

    done = split(records, tokenizer, profile.template, profile.workload.max_input_tokens, window_overlap)
    for note in summary(done):
        report.note(note)
    return done.records


def extraction_runner(
    decoder: Decoder, tokenizer: Any, profile: Profile, writer: OutputWriter | None, batch_size: int, progress: bool
) -> Runner:
    """oneke-run's extraction around an engine's decoder: continuous batches of at most `batch_size` prompts,
    prompts longer than the profile's max_input_tokens reported (never cut), out of memory retried with smaller
    batches."""
    from oneke_plan.extract.runner import Runner

    max_input = profile.workload.max_input_tokens
    return Runner(decoder, tokenizer, writer, batch_size, max_input, progress=progress, template=profile.template)


class Extraction:
    """The answer lines of an extraction (api.extract), one dict per prompt (docs/output-format.md), each yielded
    once it is written. Nothing runs until it is iterated, and it runs once; `stats` (runner.RunStats: prompts,
    tokens, seconds, ...) counts what it did, and `pending` is how many prompts it had to answer."""

    def __init__(
        self,
        records: list[PromptRecord],
        make_runner: Callable[[OutputWriter | None], Runner],
        output: RunOutput | None,
    ) -> None:
        self.records = records
        self._make_runner = make_runner
        self._output = output
        self._runner: Runner | None = None
        self._started = False
        self.pending = 0

    @property
    def stats(self) -> RunStats:
        from oneke_plan.extract.runner import RunStats

        return self._runner.stats if self._runner is not None else RunStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._started:
            raise RuntimeError("an Extraction runs once: call api.extract again (with resume=True to continue)")
        self._started = True
        if self._output is None:
            self.pending = len(self.records)
            self._runner = self._make_runner(None)
            yield from self._runner.lines(self.records)
            return
        with self._output as output:
            pending = output.start(self.records)
            self.pending = len(pending)
            if pending:
                self._runner = self._make_runner(output.writer)
                yield from self._runner.lines(pending)
            output.finish(self.records)


def extract(
    model: Any,
    tokenizer: Any,
    profile: Profile,
    records: list[PromptRecord],
    output: PathLike | None = None,
    *,
    input: PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    split_long: bool = False,
    window_overlap: int | None = None,
    progress: bool = False,
    report: Report | None = None,
) -> Extraction:
    """Answer `records` (read_records) with a model loaded by `load`, as oneke-run does; iterate the result for
    each prompt's answer line as soon as it is written.

    `batch_size` and `max_new_tokens` default to the profile's workload and may not exceed it. Without `output`,
    the lines are only yielded. With `output`, the files are oneke-run's: each line is journaled (fsync'd) to
    OUTPUT.journal, which also locks OUTPUT against a second run, and when every prompt has a line OUTPUT is
    written in input order with a merged line per record of several prompts; `resume` keeps the answers an
    earlier run left (in OUTPUT or its journal) and answers the rest and the failed ones, `overwrite` replaces
    OUTPUT (an earlier output, or an empty file; never another file), neither refuses an existing one. Only
    prompts answered by this call are yielded. `split_long` and `window_overlap`: as oneke-run's --split-long and
    --window-overlap (windowed): each window is a prompt of its own, yielded as it is answered, and OUTPUT holds
    one line per split record. `input` is the file the records came from, so that OUTPUT is never
    that file (nor in the model's folder or the offload folder). Stopping the iteration early keeps the journal
    (resume continues it). Under torchrun with several workers, an output file needs api.run (it splits and merges).
    """
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.workers import Worker

    batch = within_plan("--batch-size", batch_size, profile.workload.batch_size)
    records = windowed(records, tokenizer, profile, split_long, window_overlap, report or Report())
    max_new = within_plan("--max-new-tokens", max_new_tokens, profile.workload.max_new_tokens)
    mode = output_mode(resume, overwrite)
    name = getattr(model, "name_or_path", None)
    model_dir = Path(name) if name and Path(name).is_dir() else None
    files = None
    if output is not None:
        if Worker.from_env().distributed:
            raise BadInput(
                "api.extract writes an output file for one process; under torchrun use api.run, which gives each "
                "worker its part and merges them"
            )
        reads = Reads().folder(model_dir, "the model's folder").folder(profile.offload_dir, "the offload folder")
        files = RunOutput(Path(output), Path(input) if input is not None else None, mode, reads=reads)
    elif mode != "new":
        raise BadInput("resume and overwrite are about an output file: give output=PATH too")

    def make_runner(writer: OutputWriter | None) -> Runner:
        decoder = hf_decoder(model, tokenizer, profile, max_new, model_dir)
        return extraction_runner(decoder, tokenizer, profile, writer, batch, progress)

    return Extraction(records, make_runner, files)
