"""oneke-plan --replicas: one copy of the model per group of GPUs, the same on every node: which groups, each one's
plan, and what would fit when they do not (every line computed by planning it with the Planner). The search for
groups is plan/replicas.py's; this runs it with the Planner's plans, and writes the profile and the messages."""

from __future__ import annotations

from dataclasses import replace

from oneke_plan.api.planner import Planner
from oneke_plan.core.errors import BadInput, DoesNotFit
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.plans import PlanResult, PlanSettings, check_replica_counts, predict_speed
from oneke_plan.plan.profile import REPLICAS_FORMAT_VERSION, Replica
from oneke_plan.plan.replicas import replica_groups, replica_inventory
from oneke_plan.plan.solve import bisect_largest, quantizations_after, with_value
from oneke_plan.plan.speed import combined


def plan_replicas(
    planner: Planner, inventory: Inventory, settings: PlanSettings, solve: str | None, count: int | str, nodes: int
) -> PlanResult:
    """Planner.plan_profile for `count` copies of the model (a number, or "auto" for as many as fit), one per group
    of GPUs, the same on `nodes` nodes: solve if asked, find the groups, plan and profile each; the first profile
    holds them all. Raises DoesNotFit (with what would fit) or BadInput."""
    check_replica_counts(count, nodes)
    if inventory.gpus and (inventory.cpu_bytes or inventory.offload_dir):
        raise BadInput(
            "--replicas: each replica must fit on its own GPUs; CPU or disk offload (--cpu-memory, "
            "--offload-dir) is not shared between replicas: drop them, or plan one replica"
        )
    if solve and count == "auto":
        raise BadInput("--solve with --replicas: give the number of replicas to solve for, not auto")
    planner.check_workload(with_value(settings, solve, 1).workload if solve else settings.workload)
    solved = None
    if solve:

        def fits(value: int) -> bool:
            return bool(replica_groups(planner.plan, inventory, with_value(settings, solve, value), count))

        best = bisect_largest(fits, planner.solve_bound(settings, solve))
        if best == 0:
            raise DoesNotFit(
                f"--solve {solve.replace('_', '-')}: even 1 does not fit {count} replicas.\n"
                + _replicas_do_not_fit(planner, inventory, with_value(settings, solve, 1), count)
            )
        settings = with_value(settings, solve, best)
        solved = f"the largest {solve} that fits {count} replicas is {best}"
    groups = replica_groups(planner.plan, inventory, settings, count)
    if not groups:
        raise DoesNotFit(_replicas_do_not_fit(planner, inventory, settings, count))
    copies = len(groups)
    inventories = [replica_inventory(inventory, g, copies) for g in groups]
    plans = [planner.plan(group_inventory, settings) for group_inventory in inventories]
    speeds = [predict_speed(p, group_inventory) for p, group_inventory in zip(plans, inventories, strict=True)]
    profiles = [planner.profile(*args) for args in zip(plans, inventories, speeds, strict=True)]
    first = profiles[0]
    first.replicas = [Replica(p.devices, p.device_map, p.estimate, p.speed) for p in profiles]
    first.speed = combined(speeds, nodes)
    first.nodes = nodes
    first.format_version = REPLICAS_FORMAT_VERSION
    used = {i for g in groups for i in g}
    unused = [g.index for g in inventory.gpus if g.index not in used]
    return PlanResult(plans[0], first, solved, None, plans, unused)


def _replicas_do_not_fit(planner: Planner, inventory: Inventory, settings: PlanSettings, count: int | str) -> str:
    """Why the replicas do not fit, and what would (each line computed)."""
    most = len(replica_groups(planner.plan, inventory, settings, "auto"))
    wanted = "one replica" if count == "auto" else f"{count} replicas"
    lines = [f"does not fit: {wanted} of the model need more than these GPUs hold (at most {most} fit)"]
    options = []
    if most >= 1 and count != "auto":
        options.append(f"--replicas {most}: fits")
    most_so_far = most
    for mode in quantizations_after(settings.quant.mode, planner.source.gguf_file is not None):
        trial = replace(settings, quant=replace(settings.quant, mode=mode))  # type: ignore[arg-type]
        most_quantized = len(replica_groups(planner.plan, inventory, trial, "auto"))
        if most_quantized >= (1 if count == "auto" else int(count)):
            options.append(f"--quantize {mode}: {wanted} fit")
        elif most_quantized > most_so_far:  # fewer copies than asked, but more than a smaller step: say how many
            options.append(f"--replicas {most_quantized} --quantize {mode}: fits")
        most_so_far = max(most_so_far, most_quantized)
    for what in ("max_input_tokens", "batch_size"):

        def fits(value: int, what: str = what) -> bool:
            trial = with_value(settings, what, value)
            return bool(replica_groups(planner.plan, inventory, trial, 1 if count == "auto" else count))

        best = bisect_largest(fits, min(planner.solve_bound(settings, what), getattr(settings.workload, what) - 1))
        if best >= 1:
            options.append(f"--{what.replace('_', '-')} {best}: {wanted} fit")
    lines.append("what would fit:" if options else "nothing tried fits; add GPUs or memory")
    lines += [f"  {line}" for line in options]
    return "\n".join(lines)
