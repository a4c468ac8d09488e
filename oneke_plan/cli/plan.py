"""oneke-plan: how a causal LM fits on your GPUs, written as a YAML placement profile."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oneke_plan import __version__, api
from oneke_plan.api.options import OUTPUT, PlanOptions, flag
from oneke_plan.api.plan_messages import long_document_line
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
from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
from oneke_plan.extract.engines import REGISTRY
from oneke_plan.plan.catalog import card_names
from oneke_plan.plan.report import BAR_LEGEND, bar, device_label, device_rows, speed_lines

if TYPE_CHECKING:
    from oneke_plan.plan.plans import PlanResult

EPILOG = """\
examples:
  oneke-plan oneke --gpu 24GiB --gpu 12GiB -o profiles/my-machine.yaml
  oneke-plan oneke --gpu "RTX 3060" --quantize 4bit
  oneke-plan oneke --gpu 24GiB --gpu 12GiB --solve max-input-tokens
  oneke-plan /models/OneKE                     # GPUs detected on this machine

exit codes: 0 planned, 2 bad input, 3 does not fit (the message says what would).
"""


@dataclass(frozen=True, kw_only=True)
class PlanCommand:
    """oneke-plan's flags about what it prints, which api.plan does not take (the rest are PlanOptions')."""

    format: str = field(
        default="yaml",
        metadata=flag(
            "stdout: the YAML profile (default, when there is no -o), or json: one JSON document with the profile "
            "and the summary's figures (docs/profile-format.md); -o still writes YAML",
            choices=("yaml", "json"),
            group=OUTPUT,
        ),
    )
    engine: str = field(
        default="hf",
        metadata=flag(
            "vllm: also print the equivalent `vllm serve` command line and environment (default: %(default)s)",
            choices=api.ENGINES,
            group=OUTPUT,
        ),
    )
    verbose: bool = field(
        default=False,
        metadata=flag("explain each planning step on stderr", names=("-v", "--verbose"), group=OUTPUT),
    )
    list_cards: bool = field(default=False, metadata=flag("print the built-in GPU catalog and exit", group=OUTPUT))
    debug: bool = field(default=False, metadata=flag("show tracebacks", group=OUTPUT))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="oneke-plan",
        description="Plan how a Hugging Face causal LM (OneKE first) fits on your GPUs, counting weights, KV cache, "
        "activations and the CUDA reserve, and write a YAML placement profile for oneke-run. Needs no weights and "
        "no network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, PlanOptions, PlanCommand)
    p.add_argument("--version", action="version", version=f"oneke-plan {__version__}")
    return p


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def summary_table(result: PlanResult) -> str:
    """One row per device of each replica (a `replica` column when there are several), with a compact bar."""
    rows = device_rows(result)
    several = len({r.replica for r in rows}) > 1
    lines = []
    for row in rows:
        device, est = row.device, row.estimate
        total = format_bytes(device.total_bytes) if device.total_bytes is not None else "unbounded"
        label = device_label(device.id)
        cells = [
            str(label),
            device.name if device.name != label else "",
            f"{format_bytes(est.total_bytes)} / {total}",
            format_bytes(est.weights_bytes),
            format_bytes(est.kv_cache_bytes),
            format_bytes(est.workspace_bytes),
            format_bytes(est.reserve_bytes),
            row.layers_text,
            bar(row),
        ]
        lines.append([str(row.replica), *cells] if several else cells)
    header = ["device", "name", "used / total", "weights", "KV cache", "workspace", "reserve", "layers", "use"]
    right: tuple[int, ...] = (2, 3, 4, 5, 6)
    if several:
        header, right = ["replica", *header], tuple(i + 1 for i in right)
    return format_table(header, lines, right=right)


def run(args: argparse.Namespace, report: PrintedReport) -> int:
    options, command = options_from(args, PlanOptions), options_from(args, PlanCommand)
    if command.list_cards:
        print("\n".join(card_names()))
        return 0
    if not options.model:
        raise BadInput("give a MODEL: 'oneke', a model directory, or a cached repo id; see oneke-plan --help")
    result = api.plan(options=options, report=report)
    report.release()  # planned: the notes it held come before the summary
    plan, profile = result.plan, result.profile
    settings = plan.settings
    if result.solved:
        print(f"oneke-plan: {result.solved}", file=sys.stderr)
    if command.verbose:
        for line in plan.log:
            print(f"  {line}", file=sys.stderr)
    if command.format == "json":
        sys.stdout.write(json.dumps(api.plan_document(result), indent=2, ensure_ascii=False) + "\n")
    elif options.output is None:
        sys.stdout.write(profile.to_yaml())
    layout = plan.layout
    quant = settings.quant.mode if settings.quant.mode != "none" else "no quantization"
    w = settings.workload
    print(
        f"\n{profile.model.source}: {layout.architecture}, {_count(layout.parameter_count)} parameters, "
        f"{plan.dtype}, {quant}; workload: batch {w.batch_size} x ({w.max_input_tokens} in + {w.max_new_tokens} "
        f"new) tokens",
        file=sys.stderr,
    )
    print(f"prompt template: {profile.template} ({result.template_reason})", file=sys.stderr)
    print(long_document_line(w), file=sys.stderr)
    print(summary_table(result), file=sys.stderr)
    print(BAR_LEGEND, file=sys.stderr)
    for line in speed_lines(profile.speed, w.batch_size, w.sequence_tokens):
        print(line, file=sys.stderr)
    if result.replicas:
        copies = profile.replica_count * profile.nodes
        where = f" on each of {profile.nodes} nodes" if profile.nodes > 1 else ""
        print(
            f"{profile.replica_count} replicas{where}: run with torchrun --nproc-per-node {profile.replica_count}"
            + (f" --nnodes {profile.nodes}" if profile.nodes > 1 else "")
            + f" -m oneke_plan.cli.run --profile ... ({copies} workers in all)",
            file=sys.stderr,
        )
    if result.unused_gpus:
        print(f"GPU {', '.join(map(str, result.unused_gpus))}: not needed by any replica", file=sys.stderr)
    for note in profile.notes:
        print(note, file=sys.stderr)
    if result.gpu_only_options is not None:
        fitting = result.gpu_only_options
        print("on the GPUs alone, these fit:" if fitting else "nothing tried fits on the GPUs alone", file=sys.stderr)
        for line in fitting:
            print(f"  {line}", file=sys.stderr)
    engine_lines = REGISTRY[command.engine].plan_lines  # what an engine prints besides the plan (vllm: its serve line)
    if engine_lines is not None:
        print(engine_lines(profile, plan.layout.num_layers, options.trust_remote_code), file=sys.stderr)
    if options.output is not None:
        print(f"profile written to {options.output}", file=sys.stderr)
    if options.plot is not None:
        print(f"picture drawn to {options.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    offline_and_quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    report = PrintedReport("oneke-plan")
    return run_main(
        "oneke-plan", lambda: run(args, report), args.debug or wants_debug(argv), report, owns_process=argv is None
    )


if __name__ == "__main__":
    sys.exit(main())
