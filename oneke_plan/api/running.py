"""api.run: oneke-run's flow, from profile and input file to output file: checks first, the output locked, then
the machine, the engine (hf or vLLM) and the answers; torchrun workers split and merge."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.checks import file_flag
from oneke_plan.api.extraction import extraction_runner, read_records, windowed
from oneke_plan.api.loading import check_machine_noted
from oneke_plan.api.options import PathLike, Report, RunOptions, given, with_keywords
from oneke_plan.api.preflight import RunContext, preflight
from oneke_plan.core.errors import Interrupted, interrupted_by
from oneke_plan.extract.engines import EngineRun
from oneke_plan.plan.profile import Profile

if TYPE_CHECKING:
    from oneke_plan.extract.inputs import PromptRecord
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.runner import RunStats
    from oneke_plan.extract.workers import Worker


@dataclass(frozen=True)
class GpuMemory:
    """One GPU of the profile after a run, in bytes: the plan's total, torch's peak allocation, the driver's use."""

    gpu: int
    planned_total_bytes: int
    peak_allocated_bytes: int
    in_use_bytes: int


@dataclass(frozen=True)
class RunSummary:
    """What api.run did. `parts` holds each worker's (RunStats, prompts it had to answer), None for a worker that
    had nothing left to answer; one entry without torchrun. `gpu_memory` is this worker's GPUs after the run (empty
    without CUDA, or when it loaded nothing)."""

    output: Path
    prompts: int  # in the input
    worker: Worker
    parts: list[tuple[RunStats, int] | None]
    gpu_memory: list[GpuMemory] = field(default_factory=list)

    @property
    def mine(self) -> tuple[RunStats, int] | None:
        return self.parts[self.worker.rank] if self.worker.distributed else self.parts[0]

    @property
    def done(self) -> list[tuple[RunStats, int]]:
        return [part for part in self.parts if part is not None]

    @property
    def already_done(self) -> int:
        """Prompts an earlier run had answered."""
        return self.prompts - sum(pending for _, pending in self.done)

    @property
    def total(self) -> RunStats:
        """Every worker's RunStats added up, but `seconds`: the slowest worker's."""
        from dataclasses import fields

        from oneke_plan.extract.runner import RunStats

        total = RunStats()
        for stats, _ in self.done:
            for name in (f.name for f in fields(stats)):
                mine, theirs = getattr(total, name), getattr(stats, name)
                setattr(total, name, max(mine, theirs) if name == "seconds" else mine + theirs)
        return total


def run(
    profile: Profile | PathLike | None = None,
    input: PathLike | None = None,
    output: PathLike | None = None,
    *,
    options: RunOptions | None = None,
    report: Report | None = None,
    **keywords: Any,
) -> RunSummary:
    """oneke-run: `options` holds each of its flags (load, read_records and extract say what they do); its fields
    may also be given as keyword arguments, and `profile`, `input` and `output` as the first three positional ones:
    these override `options`, as in api.run("P.yaml", "in.jsonl", "out.jsonl", batch_size=2).

    `engine`: who generates. "hf" (the default) loads the model as the profile places it and decodes with
    oneke-run's own decoder; "vllm" starts vLLM's offline engine with the profile translated for it
    (oneke_plan.plan.vllm_plan: dtype, context, batch, KV bytes, 4-bit, pipeline stages), refusing in one line what
    vLLM cannot express. Prompts, output lines, journal, resume and workers are the same for both.

    The order is oneke-run's: everything about the input and the output is checked, and the output locked, before
    the machine check and the load (minutes), and a run whose prompts are all answered loads nothing. Under
    torchrun, each worker runs its replica on the prompts whose key hashes to it and journals them in its own part;
    worker 0 writes OUTPUT from all parts; at the start the workers wait at most `join_timeout` seconds for each
    other, and a worker that did not come is named in one line (BadInput). SIGINT and SIGTERM (as
    KeyboardInterrupt) become Interrupted, whose message says what was kept and how to continue. The workers leave
    their process group before this returns, but the interpreter's teardown can still abort a finished worker in
    torch's gloo threads: oneke-run therefore ends with os._exit under torchrun (cli/run.py), and a script that
    calls run under torchrun may want to do the same.
    """
    from oneke_plan.extract.workers import join_timeout

    keywords.update(given(profile=profile, input=input, output=output))
    options = with_keywords(RunOptions, options, keywords, "run")
    report = report or Report()
    join = join_timeout(options.join_timeout)  # a flag's value: checked before anything else is read
    made: list[RunOutput] = []  # the run's files, once made: what an interruption says was kept
    try:
        return _run(options, report, join, made)
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (cli.common): say what was kept, and how to go on
        signum = interrupted_by(exc)
        note = made[0].interruption_note() if made else "nothing was written yet: run the same command again"
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}: {note}", signum) from None


def _run(options: RunOptions, report: Report, join: timedelta, made: list[RunOutput]) -> RunSummary:
    """api.run's flow, from the preflight to the summary; the output files, once made, go to `made`."""
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.workers import Group

    input, output = options.input, options.output
    context = preflight(
        options.profile,
        model=options.model,
        adapter=options.adapter,
        offload_dir=options.offload_dir,
        template=options.template,
        engine=options.engine,
        batch_size=options.batch_size,
        max_new_tokens=options.max_new_tokens,
        resume=options.resume,
        overwrite=options.overwrite,
        trust_remote_code=options.trust_remote_code,
        force=options.force,
        report=report,
    )
    records = read_records(
        input, options.task, options.schema, options.lang, options.chunk_size, options.example, report
    )
    records, tokenizer = _windows(context, records, options, report)
    reads = context.reads.file(input, "the input file").file(file_flag(options.schema), "the --schema file")
    reads = reads.file(file_flag(options.example), "the --example file")
    worker, mode = context.worker, context.output_mode
    if worker.restarts and mode == "new":
        mode = "resume"  # torchrun restarted the workers after one failed: each continues its part
    with Group(worker, join) as group:
        files = RunOutput(Path(output), Path(input), mode, worker.rank, worker.world_size, reads)
        made.append(files)
        try:
            if worker.distributed:  # every worker looks at what earlier runs left before any of this run writes
                files.prepare()
                group.barrier()
            mine = _answer(context, records, files, options.progress, report, tokenizer)
            if worker.distributed:
                if worker.rank != 0:
                    files.close()  # worker 0 reads and removes this part once every worker is through
                group.barrier()
                if worker.rank == 0:
                    files.finish(records, peers=True)
            elif mine is not None:
                files.finish(records)
        finally:
            files.close()
        parts = group.gather(mine)
    # an engine that allocates in its own processes (vLLM): this one's torch peak would say nothing about it
    measured = mine is not None and context.engine.measures_gpu_memory
    memory = gpu_memory(context.profile) if measured else []
    return RunSummary(Path(output), len(records), worker, parts, memory)


def _windows(
    context: RunContext, records: list[PromptRecord], options: RunOptions, report: Report
) -> tuple[list[PromptRecord], tuple[Any, list[int]] | None]:
    """The records with long texts split (--split-long), and the checked tokenizer that measured them (None without
    --split-long), which the engine's start then reuses instead of loading and checking it again."""
    checked = None
    if options.split_long:
        from oneke_plan.extract.engines import checked_tokenizer

        checked = checked_tokenizer(context.profile, context.source, context.trust_remote_code)
    tokenizer = checked[0] if checked else None
    return windowed(records, tokenizer, context.profile, options.split_long, options.window_overlap, report), checked


def _answer(
    context: RunContext,
    records: list[PromptRecord],
    files: RunOutput,
    progress: bool,
    report: Report,
    tokenizer: tuple[Any, list[int]] | None = None,
) -> tuple[RunStats, int] | None:
    """Lock the output and find the prompts left, check the machine, then start the engine (for hf, load's checks
    and load) and answer them. Returns the run's statistics and how many prompts were pending, or None when every
    prompt was answered."""
    profile, source, worker = context.profile, context.source, context.worker
    pending = files.start(records, lambda record: worker.mine(record.key))
    gpus = check_machine_noted(context, report)
    if not pending:
        if not worker.distributed:
            rewritten = files.finish(records)
            what = f"; {files.output} rewritten in input order with the journal's answers" if rewritten else ""
            report.note(f"nothing to do: all {len(records)} prompts are answered{what}")
        return None
    assert files.writer is not None
    run = EngineRun(
        profile,
        source,
        context.batch_size,
        context.max_new_tokens,
        context.trust_remote_code,
        context.adapter,
        gpus,
        tokenizer,
    )
    started = context.engine.start(run, report)
    try:
        runner = extraction_runner(started.decoder, started.tokenizer, profile, files.writer, run.batch_size, progress)
        return runner.run(pending), len(pending)
    finally:
        started.close()


def gpu_memory(profile: Profile) -> list[GpuMemory]:
    """Each GPU of `profile`, now: the planned total, torch's peak allocation and the driver's memory in use, in
    bytes; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for gpu in profile.gpu_ids():
        free, total = torch.cuda.mem_get_info(gpu)
        planned = profile.estimate_on(gpu).total_bytes
        found.append(GpuMemory(gpu, planned, torch.cuda.max_memory_allocated(gpu), total - free))
    return found
