"""oneke-plan: how a causal LM fits on your GPUs, written as a YAML placement profile."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from oneke_plan import __version__
from oneke_plan.catalog import card_names
from oneke_plan.cli.common import OneLineParser, device_label, format_table, run_main, wants_debug
from oneke_plan.errors import BadInput
from oneke_plan.memory import DEFAULT_GPU_RESERVE_BYTES, QUANT_MODES, Quantization, Workload
from oneke_plan.sizes import SizeError, format_bytes, parse_size

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
        help="'oneke' (built-in config), a model directory with config.json, or a repo id in the local "
        "Hugging Face cache",
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
        metavar="SIZE",
        default=format_bytes(DEFAULT_GPU_RESERVE_BYTES).replace(" ", ""),
        help="per-GPU runtime reserve for the CUDA context and allocator slack (default: %(default)s)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="compute dtype; auto = the config's, bf16 only where every GPU supports it",
    )
    model.add_argument(
        "--quantize",
        choices=QUANT_MODES,
        default="none",
        help="load Linear weights with bitsandbytes 8-bit or 4-bit (default: %(default)s)",
    )
    model.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit data type")
    model.add_argument("--no-double-quant", action="store_true", help="4-bit: keep absmax scales in fp32")
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the model to run (off by default; OneKE does not need it)",
    )
    work = p.add_argument_group("workload")
    work.add_argument(
        "--max-input-tokens",
        type=int,
        default=512,
        metavar="N",
        help="longest prompt, in tokens (default: %(default)s)",
    )
    work.add_argument(
        "--max-new-tokens", type=int, default=512, metavar="N", help="longest answer, in tokens (default: %(default)s)"
    )
    work.add_argument(
        "--batch-size", type=int, default=4, metavar="N", help="prompts generated together (default: %(default)s)"
    )
    work.add_argument(
        "--eager-attention",
        action="store_true",
        help="count attention scores as eager attention materializes them (default: SDPA)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--strategy",
        choices=["fill", "balanced"],
        default="fill",
        help="fill GPUs in order (default), or spread layers in proportion to each GPU's memory",
    )
    out.add_argument(
        "--solve",
        choices=["max-input-tokens", "batch-size"],
        help="find the largest context (or batch) that fits, and plan for it",
    )
    scale = p.add_argument_group("many GPUs, many nodes (run the profile with torchrun: see README)")
    scale.add_argument(
        "--replicas",
        default="1",
        metavar="N|auto",
        help="split the GPUs into N groups, each holding a whole copy of the model; auto = as many as fit "
        "(default: 1)",
    )
    scale.add_argument(
        "--nodes", type=int, default=1, metavar="N", help="the same replicas on N identical nodes (default: 1)"
    )
    out.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the profile here (default: stdout)")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="let -o replace an existing file that is not a profile written by oneke-plan (never a model's file, "
        "a device, a FIFO or a link)",
    )
    out.add_argument("-v", "--verbose", action="store_true", help="explain each planning step on stderr")
    out.add_argument("--list-cards", action="store_true", help="print the built-in GPU catalog and exit")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"oneke-plan {__version__}")
    return p


def _size(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise BadInput(f"{flag}: {exc}") from None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def summary_table(plans, profile) -> str:  # type: ignore[no-untyped-def]
    """One row per device of each replica (a `replica` column when there are several)."""
    several = len(plans) > 1
    rows = []
    for index, plan in enumerate(plans):
        copy = profile.replica(index) if several else profile
        layers = [c.name for c in plan.costs if c.kind == "layer"]
        for device in copy.devices:
            est = copy.estimate[device.id]
            mine = [i for i, name in enumerate(layers) if plan.placement.assignment.get(name) == device.id]
            span = "-" if not mine else f"{mine[0]}-{mine[-1]}" if len(mine) > 1 else str(mine[0])
            total = format_bytes(device.total_bytes) if device.total_bytes is not None else "unbounded"
            label = device_label(device.id)
            row = [
                str(label),
                device.name if device.name != label else "",
                f"{format_bytes(est['total_bytes'])} / {total}",
                format_bytes(est["weights_bytes"]),
                format_bytes(est["kv_cache_bytes"]),
                format_bytes(est["workspace_bytes"]),
                format_bytes(est["reserve_bytes"]),
                span,
            ]
            rows.append([str(index), *row] if several else row)
    header = ["device", "name", "used / total", "weights", "KV cache", "workspace", "reserve", "layers"]
    right: tuple[int, ...] = (2, 3, 4, 5, 6)
    if several:
        header, right = ["replica", *header], tuple(i + 1 for i in right)
    return format_table(header, rows, right=right)


def _output_target(path: Path, overwrite: bool, model_dir: Path | None) -> os.stat_result | None:
    """Check `-o PATH` before planning; return what it is now (None: absent) for the write to confirm.

    Replaced only if it is a regular single-link file (oneke_plan.files) and a profile oneke-plan wrote, or
    --overwrite says so; a file of the model's own directory never.
    """
    from oneke_plan.files import replaceable_stat
    from oneke_plan.profile import written_by_oneke_plan

    if path.is_dir():
        raise BadInput(f"-o {path}: is a folder; give a file name such as {path}/machine.yaml")
    if not path.parent.exists():
        raise BadInput(f"-o {path}: folder {path.parent} does not exist; create it first")
    existing = replaceable_stat(path, "-o")
    if existing is None:
        return None
    if model_dir is not None and Path(model_dir).resolve() in path.resolve().parents:
        raise BadInput(
            f"-o {path}: is a file of the model {model_dir}; oneke-plan never replaces it: choose another path"
        )
    if not overwrite and not written_by_oneke_plan(path):
        raise BadInput(
            f"-o {path}: exists and is not a profile written by oneke-plan; choose another path, or pass --overwrite "
            "to replace it"
        )
    return existing


def run(args: argparse.Namespace) -> int:
    from oneke_plan.inventory import build_inventory
    from oneke_plan.model_source import resolve_model
    from oneke_plan.planner import Planner, PlanSettings
    from oneke_plan.profile import write_atomic

    if args.list_cards:
        print("\n".join(card_names()))
        return 0
    if not args.model:
        raise BadInput("give a MODEL: 'oneke', a model directory, or a cached repo id; see oneke-plan --help")
    source = resolve_model(args.model)
    replaced = _output_target(args.output, args.overwrite, source.directory) if args.output is not None else None
    reserve = _size("--reserve", args.reserve)
    inventory = build_inventory(args.gpu, args.inventory, args.cpu_memory, args.offload_dir)
    if inventory.source == "detected" and not inventory.gpus:
        import torch

        why = f" (torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None else ""
        print(
            f"oneke-plan: no CUDA GPU detected here{why}, so this plan is for the CPU alone; describe the machine "
            "you plan for with --gpu (e.g. --gpu 24GiB --gpu 12GiB) or --inventory",
            file=sys.stderr,
        )
    settings = PlanSettings(
        workload=Workload(args.max_input_tokens, args.max_new_tokens, args.batch_size),
        quant=Quantization(args.quantize, args.quant_type, not args.no_double_quant),
        dtype=args.dtype,
        strategy=args.strategy,
        reserve_bytes=reserve,
        eager_attention=args.eager_attention,
    )
    planner = Planner(source, trust_remote_code=args.trust_remote_code)
    replicas: int | str = args.replicas
    if args.replicas != "auto":
        try:
            replicas = int(args.replicas)
        except ValueError:
            raise BadInput(f"--replicas {args.replicas!r}: give a number of replicas, or auto") from None
    solve = args.solve.replace("-", "_") if args.solve else None
    result = planner.plan_profile(inventory, settings, solve, replicas, args.nodes)
    plan, profile = result.plan, result.profile
    settings = plan.settings
    if result.solved:
        print(f"oneke-plan: {result.solved}", file=sys.stderr)
    if args.verbose:
        for line in plan.log:
            print(f"  {line}", file=sys.stderr)
    text = profile.to_yaml()
    if args.output is None:
        sys.stdout.write(text)
    else:
        write_atomic(args.output, text, replaced)
    layout = plan.layout
    quant = settings.quant.mode if settings.quant.mode != "none" else "no quantization"
    w = settings.workload
    print(
        f"\n{planner.source.name}: {layout.architecture}, {_count(layout.parameter_count)} parameters, "
        f"{plan.dtype}, {quant}; workload: batch {w.batch_size} x ({w.max_input_tokens} in + {w.max_new_tokens} "
        f"new) tokens",
        file=sys.stderr,
    )
    print(summary_table(result.replicas or [plan], profile), file=sys.stderr)
    if result.replicas:
        copies = profile.replica_count * profile.nodes
        where = f" on each of {profile.nodes} nodes" if profile.nodes > 1 else ""
        print(
            f"{profile.replica_count} replicas{where}: run with torchrun --nproc-per-node {profile.replica_count}"
            + (f" --nnodes {profile.nodes}" if profile.nodes > 1 else "")
            + f" oneke-run --profile ... ({copies} workers in all)",
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
    if args.output is not None:
        print(f"profile written to {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "device N is not available" when planning elsewhere
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main("oneke-plan", lambda: run(args), args.debug or wants_debug(argv))


if __name__ == "__main__":
    sys.exit(main())
