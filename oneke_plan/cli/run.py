"""oneke-run: apply a placement profile and run OneKE extraction over a JSONL file."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan import __version__
from oneke_plan.cli.common import OneLineParser, device_label, format_table, interrupted_by, run_main, wants_debug
from oneke_plan.errors import BadInput, Interrupted
from oneke_plan.sizes import format_bytes

if TYPE_CHECKING:
    from oneke_plan.workers import Worker

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
        help="the checkpoint directory, or a repo id in the local Hugging Face cache "
        "(default: the profile's model source, when it is a directory)",
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
    raw.add_argument("--lang", choices=["zh", "en"], default="zh", help="instruction language (default: %(default)s)")
    raw.add_argument("--chunk-size", type=int, help="schema items per prompt (default: the authors' size per task)")
    raw.add_argument(
        "--example",
        metavar="JSON_OR_FILE",
        help='few-shot items added to every prompt (zh only, as the authors publish): [{"input": ..., "output": ...}]',
    )
    gen = p.add_argument_group("generation (defaults: the profile's workload)")
    gen.add_argument("--batch-size", type=int, metavar="N", help="prompts per batch (at most the planned batch)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length (at most the planned one)")
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


def _positive(flag: str, value: int | None, planned: int) -> int:
    if value is None:
        return planned
    if value <= 0:
        raise BadInput(f"{flag} must be a positive integer, not {value}")
    if value > planned:
        raise BadInput(
            f"{flag} {value} is more than the profile planned for ({planned}); re-plan with "
            f"oneke-plan ... {flag} {value}"
        )
    return value


def _read_records(args: argparse.Namespace, notes: list[str]) -> list[Any]:
    from oneke_plan import oneke
    from oneke_plan.extract import read_converted, read_example, read_raw

    if args.task is None:
        for flag, value in (("--schema", args.schema), ("--example", args.example), ("--chunk-size", args.chunk_size)):
            if value is not None:
                raise BadInput(f"{flag} needs --task (raw text input); converted files carry their prompts")
        return read_converted(args.input)
    if args.schema is None:
        raise BadInput(f"--task {args.task} needs --schema: inline JSON or a schema file")
    try:
        task = oneke.check_task(args.task.upper())
        schema = oneke.load_schema(args.schema, task)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    if args.chunk_size is not None and (args.chunk_size == 0 or args.chunk_size < -1):
        raise BadInput(f"--chunk-size must be a positive integer or -1 (no split), not {args.chunk_size}")
    example = read_example(args.example) if args.example is not None else None
    return read_raw(args.input, task, schema, args.lang, args.chunk_size, example, notes)


def _mode(args: argparse.Namespace) -> str:
    if args.resume and args.overwrite:
        raise BadInput("--resume keeps the answers in --output, --overwrite replaces them: give one of them")
    return "resume" if args.resume else "overwrite" if args.overwrite else "new"


def weight_table(profile: Any, measured: dict[Any, int]) -> str:
    rows = []
    for device in profile.devices:
        planned = int(profile.estimate.get(device.id, {}).get("weights_bytes", 0))
        loaded = measured.get(device.id, 0)
        diff = f"{(loaded - planned) / planned:+.2%}" if planned else "-"
        label = device_label(device.id)
        rows.append([str(label), format_bytes(planned), format_bytes(loaded), diff])
    return format_table(["device", "planned weights", "loaded weights", "difference"], rows, right=(1, 2, 3))


def peak_table(profile: Any) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    rows = []
    for gpu in profile.gpu_ids():
        free, total = torch.cuda.mem_get_info(gpu)
        planned = int(profile.estimate.get(gpu, {}).get("total_bytes", 0))
        rows.append(
            [
                f"GPU {gpu}",
                format_bytes(planned),
                format_bytes(torch.cuda.max_memory_allocated(gpu)),
                format_bytes(total - free),
            ]
        )
    return format_table(
        ["device", "planned total", "peak allocated (torch)", "in use now (driver)"], rows, right=(1, 2, 3)
    )


def _offload_dir(from_profile: str | None, from_flag: str | None) -> str | None:
    """The folder disk-offloaded weights are written to. A profile is data from elsewhere: it may name a relative
    folder under the current one, but writing anywhere else takes the user's own --offload-dir."""
    if from_flag is not None:
        return from_flag
    if from_profile is None:
        return None
    path = Path(from_profile)
    inside = not path.is_absolute() and Path.cwd() in (Path.cwd() / path).resolve().parents
    # Only a new folder, or one that holds nothing but an earlier offload (accelerate's index.json and .dat files).
    ours = not path.exists() or (
        path.is_dir() and all(f.name == "index.json" or f.suffix == ".dat" for f in path.iterdir())
    )
    if not (inside and ours):
        raise BadInput(
            f"the profile offloads weights to {from_profile!r}, which is outside the current folder or holds other "
            f"files; pass --offload-dir {from_profile} to confirm, or another folder"
        )
    return from_profile


def run(args: argparse.Namespace) -> int:
    from oneke_plan.model_source import resolve_model
    from oneke_plan.outputs import RunOutput
    from oneke_plan.profile import read_profile
    from oneke_plan.workers import Group, Worker

    profile = read_profile(args.profile)
    workload = profile.workload
    batch_size = _positive("--batch-size", args.batch_size, workload["batch_size"])
    max_new = _positive("--max-new-tokens", args.max_new_tokens, workload["max_new_tokens"])
    if args.trust_remote_code and not args.model:
        raise BadInput("--trust-remote-code runs code from the model directory: name it yourself with --model")
    model_name = args.model or profile.model.get("source")
    if not model_name or model_name == "oneke":
        raise BadInput(
            "the profile was planned from the built-in OneKE config, which has no weights: pass "
            "--model DIR (OneKE's checkpoint directory) or --model zjunlp/OneKE (from the local cache)"
        )
    source = resolve_model(str(model_name))
    profile.offload_dir = _offload_dir(profile.offload_dir, args.offload_dir)
    notes: list[str] = []
    mode = _mode(args)
    records = _read_records(args, notes)
    for note in notes:
        print(f"oneke-run: {note}", file=sys.stderr)
    if not records:
        raise BadInput(f"{args.input}: no prompt to run (see the note above)")
    worker = Worker.from_env()
    if worker.distributed or profile.replicas:
        worker.check(profile.replica_count, profile.nodes)
        profile = profile.replica(worker.local_rank)
    if worker.restarts and mode == "new":
        mode = "resume"  # torchrun restarted the workers after one failed: each continues its part
    with Group(worker) as group:
        output = RunOutput(args.output, args.input, mode, worker.rank, worker.world_size)
        if worker.distributed:  # every worker looks at what earlier runs left before any of this run writes
            output.prepare()
            group.barrier()
        try:
            answered = _answer(args, profile, source, records, output, batch_size, max_new, worker)
            if worker.distributed:
                if worker.rank != 0:
                    output.close()  # worker 0 reads and removes this part once every worker is through
                group.barrier()
                if worker.rank == 0:
                    output.finish(records, peers=True)
            elif answered is not None:
                output.finish(records)
        except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (cli.common): say what was kept, and how to go on
            signum = interrupted_by(exc)
            note = output.interruption_note()
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}: {note}", signum) from None
        finally:
            output.close()
        all_stats = group.gather(answered)
    _report(args, records, worker, all_stats)
    peaks = peak_table(profile)
    if peaks and answered is not None:
        print(peaks, file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, records: list[Any], worker: Worker, answered: list[Any]) -> None:
    """The run's line: this worker's, and with several workers, worker 0's line for all of them."""
    done = [a for a in answered if a is not None]
    mine = answered[worker.rank] if worker.distributed else answered[0]
    if mine is not None and worker.distributed:
        stats, _ = mine
        rate = stats.new_tokens / stats.seconds if stats.seconds else 0.0
        print(
            f"oneke-run: worker {worker.rank}: {stats.prompts} prompts, {stats.new_tokens} tokens in "
            f"{stats.seconds:.1f} s ({rate:.1f} tokens/s)",
            file=sys.stderr,
        )
    if worker.rank != 0 or not done:
        return
    prompts = sum(s.prompts for s, _ in done)
    tokens = sum(s.new_tokens for s, _ in done)
    seconds = max(s.seconds for s, _ in done)
    pending = sum(p for _, p in done)
    rate = tokens / seconds if seconds else 0.0
    workers = f" by {worker.world_size} workers" if worker.distributed else ""
    print(
        f"oneke-run: {prompts} prompts answered{workers} ({len(records) - pending} already done), "
        f"{tokens} tokens in {seconds:.1f} s ({rate:.1f} tokens/s); {sum(s.parse_errors for s, _ in done)} "
        f"answers are not valid JSON (kept raw with parse_error), {sum(s.too_long for s, _ in done)} prompts too "
        f"long, {sum(s.out_of_memory for s, _ in done)} out of memory (lines with 'error': --resume retries them) "
        f"-> {args.output}",
        file=sys.stderr,
    )


def _answer(
    args: argparse.Namespace,
    profile: Any,
    source: Any,
    records: list[Any],
    output: Any,
    batch_size: int,
    max_new: int,
    worker: Worker,
) -> Any:
    """Check the machine, then everything else that is cheap (device_map, offload folder, tokenizer, checkpoint
    names), then load the model, check it computes finite numbers, and answer the pending prompts. Returns the run's
    statistics and how many prompts were pending, or None when every prompt was already answered."""
    from oneke_plan.checkpoint import read_checkpoint
    from oneke_plan.generation import GreedyGenerator
    from oneke_plan.loaded_weights import measured_weight_bytes
    from oneke_plan.loader import check_before_load, check_finite_outputs, load_model
    from oneke_plan.machine import check_machine
    from oneke_plan.runner import Runner

    pending = output.start(records, lambda record: worker.mine(record.key))
    for problem in check_machine(profile, source, force=args.force):
        print(f"oneke-run: warning (--force): {problem}", file=sys.stderr)
    if not pending:
        if not worker.distributed:
            rewritten = output.finish(records)
            what = f"; {args.output} rewritten in input order with the journal's answers" if rewritten else ""
            print(f"oneke-run: nothing to do: all {len(records)} prompts are answered{what}", file=sys.stderr)
        return None
    tokenizer = check_before_load(profile, source, trust_remote_code=args.trust_remote_code)
    model = load_model(profile, source, trust_remote_code=args.trust_remote_code)
    stored = read_checkpoint(source.directory).dtypes if source.directory else None
    measured = measured_weight_bytes(model, profile.device_map, profile.dtype, profile.offload_dir, stored)
    print(weight_table(profile, measured), file=sys.stderr)
    check_finite_outputs(model, tokenizer, str(source.directory))
    generator = GreedyGenerator(model, tokenizer, max_new, model_dir=source.directory)
    assert output.writer is not None
    runner = Runner(
        generator,
        tokenizer,
        output.writer,
        batch_size,
        profile.workload["max_input_tokens"],
        progress=not args.no_progress,
    )
    stats = runner.run(pending)
    return stats, len(pending)


def main(argv: list[str] | None = None) -> int:
    for name in ("accelerate", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main("oneke-run", lambda: run(args), args.debug or wants_debug(argv))


if __name__ == "__main__":
    sys.exit(main())
