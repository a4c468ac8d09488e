"""api.plan: oneke-plan's flow (a model and a machine in, a PlanResult out, the profile and picture written), and
the JSON document of a plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from oneke_plan.api.checks import (
    checked_adapter,
    listed,
    model_source,
    one_of,
    output_target,
    replica_count,
    size_bytes,
)
from oneke_plan.api.options import DEFAULT_WORKLOAD, DTYPES, QUANT_TYPES, SOLVE_FOR, STRATEGIES, PathLike, Report
from oneke_plan.core.errors import BadInput
from oneke_plan.formats.templates import TEMPLATES, default_template
from oneke_plan.measure.compat import stay_offline
from oneke_plan.plan.memory import DEFAULT_GPU_RESERVE_BYTES, QUANT_MODES, Quantization, QuantMode, Workload

if TYPE_CHECKING:
    from oneke_plan.plan.plans import PlanResult


def plan(
    model: PathLike,
    gpus: Sequence[str] | None = None,
    *,
    inventory_file: PathLike | None = None,
    cpu_memory: str | int | None = None,
    offload_dir: str | None = None,
    max_input_tokens: int = DEFAULT_WORKLOAD.max_input_tokens,
    max_new_tokens: int = DEFAULT_WORKLOAD.max_new_tokens,
    batch_size: int = DEFAULT_WORKLOAD.batch_size,
    dtype: str = "auto",
    quantize: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
    reserve: str | int | Sequence[str | int] | None = None,
    bandwidth: str | float | Sequence[str | float] | None = None,
    tflops: str | float | Sequence[str | float] | None = None,
    strategy: str = "fill",
    eager_attention: bool = False,
    template: str | None = None,
    solve: str | None = None,
    replicas: int | str = 1,
    nodes: int = 1,
    trust_remote_code: bool = False,
    adapter: PathLike | None = None,
    output: PathLike | None = None,
    plot: PathLike | None = None,
    overwrite: bool = False,
    report: Report | None = None,
) -> PlanResult:
    """Plan how `model` fits a machine: what oneke-plan does, each parameter one of its flags.

    `model`: "oneke" (the built-in config: no weights needed), a model directory, or a repo id in the local Hugging
    Face cache. The machine: `gpus` (each a size such as "24GiB", a card name such as "RTX 3090", or NAME:SIZE, in
    device order) or `inventory_file` (YAML), else the GPUs detected here; `cpu_memory` (bytes or a size string) is
    host memory the model may use for offloaded weights; `offload_dir` enables disk offload. The workload: tokens
    per prompt and per answer, prompts per batch. `reserve`: bytes each GPU keeps for the CUDA context, one value
    for every GPU ("2GiB") and/or per device ("1=3GiB", "cpu=4GiB"), as a value or a list of them (default 1 GiB
    a GPU, 2 GiB for the CPU). `bandwidth` (GB/s) and `tflops` (dense 16-bit TFLOPS) give the speed prediction
    the rates the catalog does not know, in the same forms ("cpu=19.5"). `solve`: "max_input_tokens" or
    "batch_size" to plan for the largest that fits. `template`: the chat template the profile records for
    oneke-run's prompts (templates.TEMPLATES), by default the one the model's config implies. `replicas`: copies
    of the model (a number, or "auto"), on `nodes` identical nodes. `adapter`: a LoRA adapter folder (peft's
    adapter_config.json and adapter_model.safetensors) oneke-run will apply: merged on load in 16-bit, kept
    unmerged with `quantize`; its memory is counted and it is fingerprinted in the profile (DoesNotFit for an
    adapter of another base). `output`: write the profile there (a file oneke-plan wrote, or any regular file with
    `overwrite`; never a file of the model's directory); `plot`: write the per-device picture there as SVG (same
    rules).

    Returns the PlanResult: `profile` (the Profile oneke-run applies), `plan` (blocks, costs, placement, the log),
    what solving found, and, when the plan offloads, what would fit on the GPUs alone. Raises DoesNotFit (saying
    what would fit) or BadInput.
    """
    from oneke_plan.api.planner import Planner
    from oneke_plan.api.replica_planner import plan_replicas
    from oneke_plan.plan.catalog import GB_PER_S, TFLOPS
    from oneke_plan.plan.inventory import apply_device_values, build_inventory, parse_device_values, parse_rate
    from oneke_plan.plan.plans import PlanSettings, check_positive, check_replica_counts
    from oneke_plan.plan.profile import write_atomic, written_by_oneke_plan
    from oneke_plan.plan.report import drawn_by_oneke_plan, plot_svg

    report = report or Report()
    stay_offline()  # local files only: no library may reach the network (compat.stay_offline)
    for flag, value, allowed in (
        ("--dtype", dtype, DTYPES),
        ("--quantize", quantize, QUANT_MODES),
        ("--quant-type", quant_type, QUANT_TYPES),
        ("--strategy", strategy, STRATEGIES),
        ("--solve", solve.replace("_", "-") if solve else None, (None, *SOLVE_FOR)),
        ("--template", template, (None, *TEMPLATES)),
    ):
        one_of(flag, value, allowed)
    source = model_source(str(model))
    found = checked_adapter(adapter) if adapter is not None else None
    target = Path(output) if output is not None else None
    picture = Path(plot) if plot is not None else None
    if picture is not None and target is not None and picture.absolute() == target.absolute():
        raise BadInput(f"--plot {picture}: is also -o's file; give the picture its own name, e.g. machine.svg")
    replaced = replaced_plot = None
    if target is not None:
        replaced = output_target(
            target, "-o", overwrite, source.directory, written_by_oneke_plan, "a profile", ".yaml"
        )
    if picture is not None:
        replaced_plot = output_target(
            picture, "--plot", overwrite, source.directory, drawn_by_oneke_plan, "a picture", ".svg"
        )
    reserves = parse_device_values("--reserve", listed(reserve), lambda v, where: size_bytes(where, v))
    bandwidths = parse_device_values(
        "--bandwidth", listed(bandwidth), lambda v, where: parse_rate(v, GB_PER_S, where, "GB/s")
    )
    throughputs = parse_device_values(
        "--tflops", listed(tflops), lambda v, where: parse_rate(v, TFLOPS, where, "TFLOPS")
    )
    reserve_bytes = DEFAULT_GPU_RESERVE_BYTES if reserves.every_gpu is None else reserves.every_gpu
    inventory = build_inventory(
        list(gpus) if gpus else None,
        Path(inventory_file) if inventory_file is not None else None,
        cpu_memory,
        offload_dir,
    )
    inventory = apply_device_values(inventory, reserves, bandwidths, throughputs)
    if inventory.source == "detected" and not inventory.gpus:
        import torch

        why = f" (torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None else ""
        report.note(
            f"no CUDA GPU detected here{why}, so this plan is for the CPU alone; describe the machine you plan for "
            "with --gpu (e.g. --gpu 24GiB --gpu 12GiB) or --inventory"
        )
    settings = PlanSettings(
        workload=Workload(max_input_tokens, max_new_tokens, batch_size),
        quant=Quantization(cast(QuantMode, quantize), quant_type, double_quant),
        dtype=dtype,
        strategy=strategy,
        reserve_bytes=reserve_bytes,
        eager_attention=eager_attention,
    )
    # Bad numbers are refused before the model's config is read (that imports transformers: about a second).
    check_positive(settings.workload)
    copies = replica_count(replicas)
    check_replica_counts(copies, nodes)
    planner = Planner(source, trust_remote_code=trust_remote_code, adapter=found)
    solving = solve.replace("-", "_") if solve else None
    if copies != 1 or nodes != 1:
        result = plan_replicas(planner, inventory, settings, solving, copies, nodes)
    else:
        result = planner.plan_profile(inventory, settings, solving)
    if template:
        chosen, why = template, "--template"
    else:
        chosen, why = default_template(source.config, bool(source.chat_template))
    result = replace(result, profile=replace(result.profile, template=chosen), template_reason=why)
    if target is not None:
        write_atomic(target, result.profile.to_yaml(), replaced)
    if picture is not None:
        write_atomic(picture, plot_svg(result), replaced_plot)
    return result


def plan_document(result: PlanResult) -> dict[str, Any]:
    """`oneke-plan --format json`'s document: the profile's content and the summary's figures (docs/profile-format.md,
    "JSON output"), plain JSON types."""
    from oneke_plan.plan.report import plan_document as document

    return document(result)
