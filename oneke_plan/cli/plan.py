"""oneke-plan: how a causal LM fits on your GPUs, written as a YAML placement profile."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from oneke_plan import __version__, api
from oneke_plan.api import DEFAULT_WORKLOAD
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
from oneke_plan.formats.templates import DEEPKE_TEMPLATES, MODEL_TEMPLATE, ONEKE_TEMPLATE, TEMPLATES
from oneke_plan.plan.catalog import card_names
from oneke_plan.plan.memory import DEFAULT_CPU_RESERVE_BYTES, DEFAULT_GPU_RESERVE_BYTES, QUANT_MODES
from oneke_plan.plan.model_source import ONEKE_REPO_ID
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


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="oneke-plan",
        description="Plan how a Hugging Face causal LM (OneKE first) fits on your GPUs, counting weights, KV cache, "
        "activations and the CUDA reserve, and write a YAML placement profile for oneke-run. Needs no weights and "
        "no network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="'oneke' (built-in config), a model directory with config.json, a repo id in the local "
        "Hugging Face cache, or a GGUF file (or a folder holding one .gguf)",
    )
    machine = p.add_argument_group("machine (default: the GPUs detected here)")
    machine.add_argument(
        "--gpu",
        action="append",
        metavar="SPEC",
        default=None,
        help="a GPU you have or plan for, in device order: a size (24GiB, 12GB), a card name "
        "('RTX 3090'), or NAME:SIZE; repeat for each GPU",
    )
    machine.add_argument(
        "--inventory",
        type=Path,
        metavar="FILE.yaml",
        help="GPUs from a YAML file: gpus: [{name: RTX 3090}, {memory: 12GiB}]",
    )
    machine.add_argument(
        "--cpu-memory",
        metavar="SIZE",
        help="host memory the model may use for offloaded weights (slow: they cross PCIe at every step); "
        "default: none with GPUs, the memory available here without",
    )
    machine.add_argument("--offload-dir", metavar="DIR", help="enable disk offload into DIR")
    machine.add_argument(
        "--reserve",
        action="append",
        metavar="[DEVICE=]SIZE",
        help="runtime reserve for the CUDA context and allocator slack: SIZE for every GPU, INDEX=SIZE for one "
        f"(cpu=SIZE for the host); repeatable (default: {format_bytes(DEFAULT_GPU_RESERVE_BYTES).replace(' ', '')} "
        f"a GPU, {format_bytes(DEFAULT_CPU_RESERVE_BYTES).replace(' ', '')} for the CPU)",
    )
    machine.add_argument(
        "--bandwidth",
        action="append",
        metavar="[DEVICE=]GB/s",
        help="memory bandwidth for the speed prediction, in GB/s: for every GPU, or INDEX=GB/s, cpu=GB/s; "
        "default: the catalog's vendor figure for a named card, else unknown",
    )
    machine.add_argument(
        "--tflops",
        action="append",
        metavar="[DEVICE=]TFLOPS",
        help="dense 16-bit matmul throughput for the prefill prediction, in TFLOPS, as --bandwidth",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--dtype",
        choices=api.DTYPES,
        default="auto",
        help="compute dtype; auto = the config's, bf16 only where every GPU supports it",
    )
    model.add_argument(
        "--quantize",
        choices=QUANT_MODES,
        default="none",
        help="load Linear weights with bitsandbytes 8-bit or 4-bit (default: %(default)s)",
    )
    model.add_argument("--quant-type", choices=api.QUANT_TYPES, default="nf4", help="4-bit data type")
    model.add_argument("--no-double-quant", action="store_true", help="4-bit: keep absmax scales in fp32")
    model.add_argument(
        "--template",
        choices=list(TEMPLATES),
        metavar="NAME",
        help="the chat template oneke-run wraps prompts in, recorded in the profile: one of DeepKE's "
        f"({', '.join(DEEPKE_TEMPLATES)}) or {MODEL_TEMPLATE} (the model's own, from its "
        f"tokenizer). Default: DeepKE's for the models DeepKE names one for (OneKE's is {ONEKE_TEMPLATE}), else the "
        f"model's own where its tokenizer carries one, else {ONEKE_TEMPLATE}",
    )
    model.add_argument(
        "--adapter",
        type=Path,
        metavar="DIR",
        help="a LoRA adapter (peft's adapter_config.json + adapter_model.safetensors) for oneke-run to apply: merged "
        "on load in 16-bit, kept unmerged with --quantize; its memory is counted and it is fingerprinted (needs "
        "peft: pip install 'oneke-plan[lora]')",
    )
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the model to run (off by default; OneKE does not need it)",
    )
    work = p.add_argument_group("workload")
    work.add_argument(
        "--max-input-tokens",
        type=int,
        default=DEFAULT_WORKLOAD.max_input_tokens,
        metavar="N",
        help="longest prompt, in tokens (default: %(default)s)",
    )
    work.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_WORKLOAD.max_new_tokens,
        metavar="N",
        help="longest answer, in tokens (default: %(default)s)",
    )
    work.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_WORKLOAD.batch_size,
        metavar="N",
        help="prompts generated together (default: %(default)s)",
    )
    work.add_argument(
        "--eager-attention",
        action="store_true",
        help="count attention scores as eager attention materializes them (default: SDPA)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--strategy",
        choices=api.STRATEGIES,
        default="fill",
        help="fill GPUs in order (default), or spread layers in proportion to each GPU's memory",
    )
    out.add_argument(
        "--solve",
        choices=api.SOLVE_FOR,
        help="find the largest context (or batch) that fits, and plan for it",
    )
    scale = p.add_argument_group("many GPUs, many nodes (run the profile with torchrun: see README)")
    scale.add_argument(
        "--replicas",
        default="1",
        metavar="N|auto",
        help="split the GPUs into N groups, each holding a whole copy of the model; auto = as many as fit (default: 1)",
    )
    scale.add_argument(
        "--nodes", type=int, default=1, metavar="N", help="the same replicas on N identical nodes (default: 1)"
    )
    out.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the profile here (default: stdout)")
    out.add_argument(
        "--format",
        choices=("yaml", "json"),
        default="yaml",
        help="stdout: the YAML profile (default, when there is no -o), or json: one JSON document with the "
        "profile and the summary's figures (docs/profile-format.md); -o still writes YAML",
    )
    out.add_argument("--plot", type=Path, metavar="FILE.svg", help="draw each device's memory as an SVG picture")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="let -o replace an existing file that is not a profile written by oneke-plan (never a model's file, "
        "a device, a FIFO or a link)",
    )
    out.add_argument(
        "--engine",
        choices=api.ENGINES,
        default="hf",
        help="vllm: also print the equivalent `vllm serve` command line and environment (default: %(default)s)",
    )
    out.add_argument("-v", "--verbose", action="store_true", help="explain each planning step on stderr")
    out.add_argument("--list-cards", action="store_true", help="print the built-in GPU catalog and exit")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
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


def run(args: argparse.Namespace) -> int:
    if args.list_cards:
        print("\n".join(card_names()))
        return 0
    if not args.model:
        raise BadInput("give a MODEL: 'oneke', a model directory, or a cached repo id; see oneke-plan --help")
    result = api.plan(
        args.model,
        args.gpu,
        inventory_file=args.inventory,
        cpu_memory=args.cpu_memory,
        offload_dir=args.offload_dir,
        max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
        quantize=args.quantize,
        quant_type=args.quant_type,
        double_quant=not args.no_double_quant,
        reserve=args.reserve,
        bandwidth=args.bandwidth,
        tflops=args.tflops,
        strategy=args.strategy,
        eager_attention=args.eager_attention,
        template=args.template,
        solve=args.solve,
        replicas=args.replicas,
        nodes=args.nodes,
        trust_remote_code=args.trust_remote_code,
        adapter=args.adapter,
        output=args.output,
        plot=args.plot,
        overwrite=args.overwrite,
        report=PrintedReport("oneke-plan"),
    )
    plan, profile = result.plan, result.profile
    settings = plan.settings
    if result.solved:
        print(f"oneke-plan: {result.solved}", file=sys.stderr)
    if args.verbose:
        for line in plan.log:
            print(f"  {line}", file=sys.stderr)
    if args.format == "json":
        sys.stdout.write(json.dumps(api.plan_document(result), indent=2, ensure_ascii=False) + "\n")
    elif args.output is None:
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
        options = result.gpu_only_options
        print("on the GPUs alone, these fit:" if options else "nothing tried fits on the GPUs alone", file=sys.stderr)
        for line in options:
            print(f"  {line}", file=sys.stderr)
    if args.engine == "vllm":
        print(vllm_lines(profile, plan.layout.num_layers), file=sys.stderr)
    if args.output is not None:
        print(f"profile written to {args.output}", file=sys.stderr)
    if args.plot is not None:
        print(f"picture drawn to {args.plot}", file=sys.stderr)
    return 0


def vllm_lines(profile, num_layers: int) -> str:  # type: ignore[no-untyped-def]
    """The plan as `vllm serve` runs it, one command per replica (or why vLLM cannot run it: oneke-run's hf engine
    can, so the plan stands)."""
    from oneke_plan.plan.vllm_plan import vllm_settings

    source = profile.model.source
    model = ONEKE_REPO_ID if source == "oneke" else str(source)
    lines = ["vLLM (the same plan: send requests with temperature 0, greedy as oneke-run):"]
    for index in range(profile.replica_count):
        copy = profile.replica(index)
        where = f"  replica {index}: " if profile.replica_count > 1 else "  "
        try:
            settings = vllm_settings(copy, model, num_layers)
        except BadInput as exc:
            lines.append(f"{where}{exc}")
            continue
        lines.append(where + settings.serve_command())
        lines += [f"    ({note})" for note in settings.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    offline_and_quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main("oneke-plan", lambda: run(args), args.debug or wants_debug(argv))


if __name__ == "__main__":
    sys.exit(main())
