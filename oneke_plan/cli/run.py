"""oneke-run: apply a placement profile and run OneKE extraction over a JSONL file (flags and printing around
oneke_plan.api.run)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from oneke_plan import __version__, api
from oneke_plan.api import GpuMemory, RunSummary
from oneke_plan.api.options import RUN, RunOptions, flag
from oneke_plan.cli.common import (
    OneLineParser,
    PrintedReport,
    add_options,
    format_table,
    offline_and_quiet,
    options_from,
    run_main,
    wants_debug,
)
from oneke_plan.core import stops
from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
from oneke_plan.extract.workers import Worker
from oneke_plan.plan.profile import Profile
from oneke_plan.plan.report import device_label

EPILOG = """\
examples:
  # the authors' converted files (lines with id and an instruction JSON string), as they are:
  oneke-run --profile profiles/oneke-24gib+12gib-bf16.yaml --model /models/OneKE \\
            --input examples/deepke/NER/test.json --output ner.out.jsonl
  # raw text lines with a task and a schema:
  oneke-run --profile P.yaml --model /models/OneKE --input texts.jsonl --output out.jsonl \\
            --task NER --schema '["人物", "地理位置", "组织机构"]' --lang zh
  # texts longer than the plan's max_input_tokens: cut into windows that fit, each answered, answers merged:
  oneke-run --profile P.yaml --model /models/OneKE --input articles.jsonl --output out.jsonl \\
            --task NER --schema '["人物", "地理位置", "组织机构"]' --split-long
  # continue an interrupted run, and retry prompts that failed (too long, out of memory) after re-planning:
  oneke-run --profile P.yaml --model /models/OneKE --input IN --output OUT --resume
  # the same run on vLLM (pip install 'oneke-plan[vllm]'), the profile translated for it:
  oneke-run --profile P.yaml --model /models/OneKE --input IN --output OUT --engine vllm
  # score the answers against the input's labels:
  oneke-score OUT

files: answers go to OUT.journal as they come (fsync'd; it is also the lock that stops a second run on OUT);
OUT is written at the end in input order, with a merged line per record of several prompts (docs/output-format.md).

exit codes: 0 done, 2 bad input, 3 machine does not match the profile.
"""


@dataclass(frozen=True, kw_only=True)
class RunCommand:
    """oneke-run's flags that api.run does not take as they are (the rest are RunOptions'): --no-progress, because
    the API's progress bar is off unless asked for while oneke-run's is on unless refused."""

    no_progress: bool = field(default=False, metadata=flag("no progress bar", group=RUN))
    debug: bool = field(default=False, metadata=flag("show tracebacks", group=RUN))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="oneke-run",
        description="Load a model exactly as an oneke-plan profile says (meta init, tie_weights, load, dispatch; "
        "16-bit, or bitsandbytes 8/4-bit) and run OneKE extraction over a JSONL file in batches. Each answer is "
        "journaled as soon as it is done; --resume continues an interrupted run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, RunOptions, RunCommand)
    p.add_argument("--version", action="version", version=f"oneke-run {__version__}")
    return p


class RunReport(PrintedReport):
    """oneke-run's notes on stderr, and the table of planned against loaded weights."""

    def weights_loaded(self, profile: Profile, loaded_bytes: dict[int | str, int]) -> None:
        print(weight_table(profile, loaded_bytes), file=sys.stderr)


def weight_table(profile: Profile, measured: dict[Any, int]) -> str:
    rows = []
    for device in profile.devices:
        planned = profile.estimate_on(device.id).weights_bytes
        loaded = measured.get(device.id, 0)
        diff = f"{(loaded - planned) / planned:+.2%}" if planned else "-"
        label = device_label(device.id)
        rows.append([str(label), format_bytes(planned), format_bytes(loaded), diff])
    return format_table(["device", "planned weights", "loaded weights", "difference"], rows, right=(1, 2, 3))


def peak_table(memory: list[GpuMemory]) -> str:
    rows = [
        [
            f"GPU {gpu.gpu}",
            format_bytes(gpu.planned_total_bytes),
            format_bytes(gpu.peak_allocated_bytes),
            format_bytes(gpu.in_use_bytes),
        ]
        for gpu in memory
    ]
    return format_table(
        ["device", "planned total", "peak allocated (torch)", "in use now (driver)"], rows, right=(1, 2, 3)
    )


def run(args: argparse.Namespace, report: RunReport) -> int:
    options, command = options_from(args, RunOptions), options_from(args, RunCommand)
    summary = None
    try:
        summary = api.run(options=replace(options, progress=not command.no_progress), report=report)
        stops.disarm()  # the run is through: a signal now changes neither its exit code nor its totals
    except KeyboardInterrupt:
        if summary is None:
            raise
        stops.disarm()  # the signal came as api.run returned: the run is through all the same
    report.release()  # a run that loaded nothing (every prompt answered) held its notes until here
    _report(summary)
    if summary.gpu_memory:
        print(peak_table(summary.gpu_memory), file=sys.stderr)
    return 0


def _report(summary: RunSummary) -> None:
    """The run's line: this worker's, and with several workers, worker 0's line for all of them."""
    worker, mine = summary.worker, summary.mine
    if mine is not None and worker.distributed:
        stats, _ = mine
        rate = stats.new_tokens / stats.seconds if stats.seconds else 0.0
        print(
            f"oneke-run: worker {worker.rank}: {stats.prompts} prompts, {stats.new_tokens} tokens in "
            f"{stats.seconds:.1f} s ({rate:.1f} tokens/s)",
            file=sys.stderr,
        )
    if worker.rank != 0 or not summary.done:
        return
    total = summary.total
    rate = total.new_tokens / total.seconds if total.seconds else 0.0
    workers = f" by {worker.world_size} workers" if worker.distributed else ""
    print(
        f"oneke-run: {total.prompts} prompts answered{workers} ({summary.already_done} already done), "
        f"{total.new_tokens} tokens in {total.seconds:.1f} s ({rate:.1f} tokens/s); {total.parse_errors} "
        f"answers are not valid JSON (kept raw with parse_error), {total.too_long} prompts too "
        f"long, {total.out_of_memory} out of memory (lines with 'error': --resume retries them) "
        f"-> {summary.output}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    offline_and_quiet()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # --engine vllm: dozens of INFO and WARNING lines
    parser = build_parser()
    args = parser.parse_args(argv)
    report = RunReport("oneke-run")
    code = run_main(
        "oneke-run", lambda: run(args, report), args.debug or wants_debug(argv), report, owns_process=argv is None
    )
    if _under_torchrun_with_peers():
        # By now every file is written and closed, and the workers have left their process group together. Tearing
        # down the interpreter can still abort or crash in torch's gloo threads (seen as SIGABRT / SIGSEGV after the
        # last line, about 1 run in 25 on a loaded machine), which torchrun reports as a failed worker and which
        # leaves the other node waiting in torchrun's exit barrier: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _under_torchrun_with_peers() -> bool:
    try:
        return Worker.from_env().distributed
    except BadInput:
        return False


if __name__ == "__main__":
    sys.exit(main())
