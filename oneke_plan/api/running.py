"""api.run: oneke-run's flow, from profile and input file to output file: checks first, the output locked, then
the machine, the engine (hf or vLLM) and the answers; torchrun workers split and merge."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.checks import (
    checkpoint_source,
    offload_folder,
    one_of,
    output_mode,
    planned,
    run_adapter,
    with_template,
    workers_profile,
)
from oneke_plan.api.extraction import extraction_runner, hf_decoder, read_records
from oneke_plan.api.loading import check_machine_noted, load_checked
from oneke_plan.api.options import PathLike, Report
from oneke_plan.core.errors import Interrupted, interrupted_by
from oneke_plan.measure.compat import stay_offline
from oneke_plan.plan.profile import Profile, read_profile
from oneke_plan.plan.vllm_plan import ENGINES

if TYPE_CHECKING:
    from oneke_plan.extract.inputs import PromptRecord
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.runner import RunStats
    from oneke_plan.extract.workers import Worker
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.model_source import ModelSource


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
    profile: Profile | PathLike,
    input: PathLike,
    output: PathLike,
    *,
    model: PathLike | None = None,
    task: str | None = None,
    schema: str | list[Any] | dict[str, Any] | None = None,
    lang: str = "zh",
    chunk_size: int | None = None,
    example: str | list[Any] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    offload_dir: str | None = None,
    force: bool = False,
    progress: bool = False,
    template: str | None = None,
    trust_remote_code: bool = False,
    adapter: PathLike | None = None,
    engine: str = "hf",
    report: Report | None = None,
) -> RunSummary:
    """oneke-run: each parameter is one of its flags (load, read_records and extract say what they do).

    `engine`: who generates. "hf" (the default) loads the model as the profile places it and decodes with
    oneke-run's own decoder; "vllm" starts vLLM's offline engine with the profile translated for it
    (oneke_plan.plan.vllm_plan: dtype, context, batch, KV bytes, 4-bit, pipeline stages), refusing in one line what
    vLLM cannot express. Prompts, output lines, journal, resume and workers are the same for both.

    The order is oneke-run's: everything about the input and the output is checked, and the output locked, before
    the machine check and the load (minutes), and a run whose prompts are all answered loads nothing. Under
    torchrun, each worker runs its replica on the prompts whose key hashes to it and journals them in its own part;
    worker 0 writes OUTPUT from all parts. SIGINT and SIGTERM (as KeyboardInterrupt) become Interrupted, whose
    message says what was kept and how to continue. The workers leave their process group before this returns, but
    the interpreter's teardown can still abort a finished worker in torch's gloo threads: oneke-run therefore ends
    with os._exit under torchrun (cli/run.py), and a script that calls run under torchrun may want to do the same.
    """
    from oneke_plan.extract.engines import check_engine
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.workers import Group, Worker

    report = report or Report()
    stay_offline()  # local files only: no library may reach the network (compat.stay_offline)
    one_of("--engine", engine, ENGINES)
    profile = profile if isinstance(profile, Profile) else read_profile(Path(profile))
    batch = planned("--batch-size", batch_size, profile.workload.batch_size)
    max_new = planned("--max-new-tokens", max_new_tokens, profile.workload.max_new_tokens)
    profile = with_template(profile, template, report)
    source = checkpoint_source(profile, model, trust_remote_code)
    found = run_adapter(profile, adapter)
    profile = replace(profile, offload_dir=offload_folder(profile.offload_dir, offload_dir))
    mode = output_mode(resume, overwrite)
    records = read_records(input, task, schema, lang, chunk_size, example, report)
    worker = Worker.from_env()
    profile = workers_profile(profile, worker)
    check_engine(engine, profile, source)
    if worker.restarts and mode == "new":
        mode = "resume"  # torchrun restarted the workers after one failed: each continues its part
    with Group(worker) as group:
        files = RunOutput(Path(output), Path(input), mode, worker.rank, worker.world_size)
        if worker.distributed:  # every worker looks at what earlier runs left before any of this run writes
            files.prepare()
            group.barrier()
        try:
            mine = _answer(
                profile, source, found, records, files, worker, batch, max_new, force, trust_remote_code, progress,
                engine,
                report,
            )
            if worker.distributed:
                if worker.rank != 0:
                    files.close()  # worker 0 reads and removes this part once every worker is through
                group.barrier()
                if worker.rank == 0:
                    files.finish(records, peers=True)
            elif mine is not None:
                files.finish(records)
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (cli.common): say what was kept, and how to go on
            signum = interrupted_by(exc)
            note = files.interruption_note()
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}: {note}", signum) from None
        finally:
            files.close()
        parts = group.gather(mine)
    # vLLM allocates in its own processes: this one's torch peak would say nothing about them
    memory = gpu_memory(profile) if mine is not None and engine == "hf" else []
    return RunSummary(Path(output), len(records), worker, parts, memory)


def _answer(
    profile: Profile,
    source: ModelSource,
    adapter: Adapter | None,
    records: list[PromptRecord],
    files: RunOutput,
    worker: Worker,
    batch_size: int,
    max_new_tokens: int,
    force: bool,
    trust_remote_code: bool,
    progress: bool,
    engine: str,
    report: Report,
) -> tuple[RunStats, int] | None:
    """Lock the output and find the prompts left, check the machine, then start the engine (for hf, load's checks
    and load) and answer them. Returns the run's statistics and how many prompts were pending, or None when every
    prompt was answered."""
    pending = files.start(records, lambda record: worker.mine(record.key))
    check_machine_noted(profile, source, force, report)
    if not pending:
        if not worker.distributed:
            rewritten = files.finish(records)
            what = f"; {files.output} rewritten in input order with the journal's answers" if rewritten else ""
            report.note(f"nothing to do: all {len(records)} prompts are answered{what}")
        return None
    assert files.writer is not None
    if engine == "vllm":
        from oneke_plan.extract.engines import vllm_decoder

        vllm, tokenizer = vllm_decoder(profile, source, batch_size, max_new_tokens, trust_remote_code, report.note)
        try:
            runner = extraction_runner(vllm, tokenizer, profile, files.writer, batch_size, progress)
            return runner.run(pending), len(pending)
        finally:
            vllm.close()
    model, tokenizer = load_checked(profile, source, trust_remote_code, report, adapter)
    # a GGUF's end tokens are its own (config and tokenizer from its metadata): transformers reads no
    # generation_config.json beside a GGUF, and neither does the decoder
    checkpoint_dir = source.directory if source.gguf_file is None else None
    decoder = hf_decoder(model, tokenizer, profile, max_new_tokens, checkpoint_dir)
    return extraction_runner(decoder, tokenizer, profile, files.writer, batch_size, progress).run(pending), len(pending)


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
