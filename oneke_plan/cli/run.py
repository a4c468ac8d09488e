"""oneke-run: apply a placement profile and run OneKE extraction over a JSONL file (flags and printing around
oneke_plan.api.run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from oneke_plan import __version__, api
from oneke_plan.api import GpuMemory, RunSummary
from oneke_plan.cli.common import (
    OneLineParser,
    PrintedReport,
    format_table,
    offline_and_quiet,
    run_main,
    wants_debug,
)
from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
from oneke_plan.extract.workers import Worker
from oneke_plan.formats.templates import TEMPLATES
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


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="oneke-run",
        description="Load a model exactly as an oneke-plan profile says (meta init, tie_weights, load, dispatch; "
        "16-bit, or bitsandbytes 8/4-bit) and run OneKE extraction over a JSONL file in batches. Each answer is "
        "journaled as soon as it is done; --resume continues an interrupted run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", type=Path, required=True, metavar="P.yaml", help="a profile written by oneke-plan")
    p.add_argument(
        "--model",
        metavar="DIR_OR_REPO_ID",
        help="the checkpoint directory, a repo id in the local Hugging Face cache, or a GGUF file "
        "(default: the profile's model source, when it is a directory or a file)",
    )
    p.add_argument(
        "--adapter",
        type=Path,
        metavar="DIR",
        help="the LoRA adapter the profile was planned with (default: the profile's adapter path); another one, "
        "changed files or another base model's adapter are refused before loading (exit 3)",
    )
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="IN.jsonl",
        help="the authors' converted file (id + instruction), or raw lines ({id?, text}) with --task",
    )
    p.add_argument("--output", type=Path, required=True, metavar="OUT.jsonl", help="answers, one JSON line each")
    raw = p.add_argument_group("raw text input")
    raw.add_argument("--task", help="NER, RE, EE, EET, EEA, KG or SPO: read --input as raw text lines")
    raw.add_argument("--schema", help="the schema: inline JSON, or a file (JSON, or the authors' 3-line schema.json)")
    raw.add_argument("--lang", choices=api.LANGUAGES, default="zh", help="instruction language (default: %(default)s)")
    raw.add_argument("--chunk-size", type=int, help="schema items per prompt (default: the authors' size per task)")
    raw.add_argument(
        "--example",
        metavar="JSON_OR_FILE",
        help='few-shot items added to every prompt (zh only, as the authors publish): [{"input": ..., "output": ...}]',
    )
    gen = p.add_argument_group("generation (defaults: the profile's workload)")
    gen.add_argument(
        "--engine",
        choices=api.ENGINES,
        default="hf",
        help="who generates: hf (default: the model loaded as planned, oneke-run's decoder) or vllm (vLLM's engine "
        "with the plan translated for it; needs pip install 'oneke-plan[vllm]'); both decode greedily",
    )
    gen.add_argument("--batch-size", type=int, metavar="N", help="prompts per batch (at most the planned batch)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length (at most the planned one)")
    gen.add_argument(
        "--template",
        choices=list(TEMPLATES),
        metavar="NAME",
        help="the chat template around each prompt: a DeepKE template or 'model' (the model's own) (default: the "
        "profile's; see oneke-plan --template)",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--resume",
        action="store_true",
        help="keep the answers already in --output (and its journal), run the rest and the prompts that failed",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (only once the new one is complete)"
    )
    run.add_argument(
        "--offload-dir",
        metavar="DIR",
        help="where disk-offloaded weights go (default: the profile's offload_dir when it is a relative path "
        "inside the current folder; any other folder must be confirmed here)",
    )
    run.add_argument("--force", action="store_true", help="run even if the machine does not match the profile")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the model to run (off by default; OneKE does not need it)",
    )
    run.add_argument("--debug", action="store_true", help="show tracebacks")
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


def run(args: argparse.Namespace) -> int:
    summary = api.run(
        args.profile,
        args.input,
        args.output,
        model=args.model,
        task=args.task,
        schema=args.schema,
        lang=args.lang,
        chunk_size=args.chunk_size,
        example=args.example,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        resume=args.resume,
        overwrite=args.overwrite,
        offload_dir=args.offload_dir,
        force=args.force,
        progress=not args.no_progress,
        template=args.template,
        trust_remote_code=args.trust_remote_code,
        adapter=args.adapter,
        engine=args.engine,
        report=RunReport("oneke-run"),
    )
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
    code = run_main("oneke-run", lambda: run(args), args.debug or wants_debug(argv))
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
