"""api.plan: oneke-plan's flow (a model and a machine in, a PlanResult out, the profile and picture written), and
the JSON document of a plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from oneke_plan.api.checks import (
    checked_adapter,
    listed,
    model_reads,
    model_source,
    one_of,
    replica_count,
    size_bytes,
)
from oneke_plan.api.options import (
    FLAG,
    PathLike,
    PlanOptions,
    Report,
    given,
    with_keywords,
)
from oneke_plan.core.errors import BadInput
from oneke_plan.formats.templates import default_template
from oneke_plan.io.files import Reads, output_target
from oneke_plan.measure.compat import stay_offline
from oneke_plan.plan.memory import DEFAULT_GPU_RESERVE_BYTES, Quantization, QuantMode, Workload

if TYPE_CHECKING:
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.inventory import Inventory
    from oneke_plan.plan.model_source import ModelSource
    from oneke_plan.plan.plans import PlanResult, PlanSettings


def plan(
    model: PathLike | None = None,
    gpus: Sequence[str] | None = None,
    *,
    options: PlanOptions | None = None,
    report: Report | None = None,
    **keywords: Any,
) -> PlanResult:
    """Plan how a model fits a machine: what oneke-plan does. `options` holds every flag (PlanOptions says what each
    field means); its fields may also be given as keyword arguments, and `model` and `gpus` as the first two
    positional ones: these override `options`, as in api.plan("oneke", ["24GiB"], batch_size=8).

    Returns the PlanResult: `profile` (the Profile oneke-run applies), `plan` (blocks, costs, placement, the log),
    what solving found, and, when the plan offloads, what would fit on the GPUs alone. Raises DoesNotFit (saying
    what would fit) or BadInput.
    """
    from oneke_plan.api.planner import Planner
    from oneke_plan.api.replica_planner import plan_replicas
    from oneke_plan.plan.plans import check_positive, check_replica_counts
    from oneke_plan.plan.profile import write_atomic, written_by_oneke_plan
    from oneke_plan.plan.report import drawn_by_oneke_plan, plot_svg

    keywords.update(given(model=model, gpus=gpus))
    options = with_keywords(PlanOptions, options, keywords, "plan")
    if options.model is None:
        raise TypeError("plan() needs a model: give it first, or as PlanOptions(model=...)")
    if options.solve:  # also with underscores, as Python names them: one spelling from here on
        options = replace(options, solve=options.solve.replace("_", "-"))
    report = report or Report()
    stay_offline()  # local files only: no library may reach the network (compat.stay_offline)
    check_choices(options)
    source = model_source(str(options.model))
    found = checked_adapter(options.adapter) if options.adapter is not None else None
    target = Path(options.output) if options.output is not None else None
    picture = Path(options.plot) if options.plot is not None else None
    if picture is not None and target is not None and picture.absolute() == target.absolute():
        raise BadInput(f"--plot {picture}: is also -o's file; give the picture its own name, e.g. machine.svg")
    replaced = replaced_plot = None
    reads = plan_reads(options, source, found)
    if target is not None:
        replaced = output_target(
            target,
            "-o",
            reads,
            written_by_oneke_plan,
            "a profile written by oneke-plan",
            options.overwrite,
            "machine.yaml",
        )
    if picture is not None:
        replaced_plot = output_target(
            picture,
            "--plot",
            reads,
            drawn_by_oneke_plan,
            "a picture written by oneke-plan",
            options.overwrite,
            "machine.svg",
        )
    inventory, reserve_bytes = planned_machine(options, report)
    settings = plan_settings(options, reserve_bytes)
    # Bad numbers are refused before the model's config is read (that imports transformers: about a second).
    check_positive(settings.workload)
    copies = replica_count(options.replicas)
    check_replica_counts(copies, options.nodes)
    planner = Planner(source, trust_remote_code=options.trust_remote_code, adapter=found)
    solving = options.solve.replace("-", "_") if options.solve else None
    if copies != 1 or options.nodes != 1:
        result = plan_replicas(planner, inventory, settings, solving, copies, options.nodes)
    else:
        result = planner.plan_profile(inventory, settings, solving)
    if options.template:
        chosen, why = options.template, "--template"
    else:
        chosen, why = default_template(source.config, bool(source.chat_template))
    result = replace(result, profile=replace(result.profile, template=chosen), template_reason=why)
    if target is not None:
        write_atomic(target, result.profile.to_yaml(), replaced)
    if picture is not None:
        write_atomic(picture, plot_svg(result), replaced_plot)
    return result


def plan_reads(options: PlanOptions, source: ModelSource, adapter: Adapter | None) -> Reads:
    """What oneke-plan reads, and the offload folder its profile will have oneke-run write to: never an output."""
    reads = model_reads(source).folder(adapter.directory if adapter is not None else None, "the adapter's folder")
    reads = reads.file(options.inventory_file, "the inventory")
    return reads.folder(options.offload_dir, "the offload folder")


def check_choices(options: PlanOptions) -> None:
    """Each flag that takes one of a few values holds one of the values its field declares: the API is called
    without argparse's choices."""
    for item in fields(options):
        spec = item.metadata.get(FLAG)
        value = getattr(options, item.name)
        if spec is None or spec.choices is None or (value is None and item.default is None):
            continue
        one_of(spec.spellings(item.name)[-1], value, spec.choices)


def planned_machine(options: PlanOptions, report: Report) -> tuple[Inventory, int]:
    """The machine to plan for (described GPUs, an inventory file, or the GPUs detected here) with the reserves and
    rates the options give, and the reserve every GPU keeps unless told otherwise, in bytes."""
    from oneke_plan.plan.catalog import GB_PER_S, TFLOPS
    from oneke_plan.plan.inventory import (
        apply_device_values,
        build_inventory,
        check_reserves,
        parse_device_values,
        parse_rate,
    )

    reserves = parse_device_values("--reserve", listed(options.reserve), lambda v, where: size_bytes(where, v))
    bandwidths = parse_device_values(
        "--bandwidth", listed(options.bandwidth), lambda v, where: parse_rate(v, GB_PER_S, where, "GB/s")
    )
    throughputs = parse_device_values(
        "--tflops", listed(options.tflops), lambda v, where: parse_rate(v, TFLOPS, where, "TFLOPS")
    )
    reserve_bytes = DEFAULT_GPU_RESERVE_BYTES if reserves.every_gpu is None else reserves.every_gpu
    inventory = build_inventory(
        listed(options.gpus) or None,
        Path(options.inventory_file) if options.inventory_file is not None else None,
        options.cpu_memory,
        options.offload_dir,
    )
    inventory = apply_device_values(inventory, reserves, bandwidths, throughputs)
    if options.cpu_memory is not None:
        cpu_where = f"--cpu-memory {options.cpu_memory}"
    else:
        cpu_where = f"{options.inventory_file}: cpu_memory" if options.inventory_file else "the memory available here"
    check_reserves(inventory, reserves, cpu_where)
    if inventory.source == "detected" and not inventory.gpus:
        import torch

        why = f" (torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None else ""
        report.note(
            f"no CUDA GPU detected here{why}, so this plan is for the CPU alone; describe the machine you plan for "
            "with --gpu (e.g. --gpu 24GiB --gpu 12GiB) or --inventory"
        )
    return inventory, reserve_bytes


def plan_settings(options: PlanOptions, reserve_bytes: int) -> PlanSettings:
    """What the planner plans for: the workload, the quantization, the dtype, the strategy, the reserve (bytes)."""
    from oneke_plan.plan.plans import PlanSettings

    return PlanSettings(
        workload=Workload(options.max_input_tokens, options.max_new_tokens, options.batch_size),
        quant=Quantization(cast(QuantMode, options.quantize), options.quant_type, options.double_quant),
        dtype=options.dtype,
        strategy=options.strategy,
        reserve_bytes=reserve_bytes,
        eager_attention=options.eager_attention,
    )


def plan_document(result: PlanResult) -> dict[str, Any]:
    """`oneke-plan --format json`'s document: the profile's content and the summary's figures (docs/profile-format.md,
    "JSON output"), plain JSON types."""
    from oneke_plan.plan.report import plan_document as document

    return document(result)
