"""The planner's last step, solve: the largest context or batch that fits, and, when a plan does not fit, what
would (bitsandbytes quantization, a shorter context, a smaller batch, CPU or disk offload).

Every answer here is found by planning it, never guessed: each function takes the planning of one copy of the model
as a function (`PlanFn`: machine and settings in, Plan out), so that solving is the same whoever measured the
model, and costs arithmetic once its measurements exist. What is found is returned as data (`Alternative`); the
sentences that report it belong to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import QUANT_MODES
from oneke_plan.plan.plans import Plan, PlanSettings

MAX_SOLVED_BATCH = 4096
UNBOUNDED_BYTES = 1 << 62  # memory without a limit, to ask how much of it a plan takes

PlanFn = Callable[[Inventory, PlanSettings], Plan]


def bisect_largest(fits: Callable[[int], bool], high: int) -> int:
    """Largest x in [1, high] with fits(x), given fits is monotone (True then False); 0 if fits(1) is False."""
    if high < 1 or not fits(1):
        return 0
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def with_value(settings: PlanSettings, what: str, value: int) -> PlanSettings:
    """`settings` with the workload's `what` ("max_input_tokens" or "batch_size") set to `value`."""
    return replace(settings, workload=replace(settings.workload, **{what: value}))


def solve_bound(settings: PlanSettings, what: str, max_positions: int | None) -> int:
    """The most --solve tries for `what`: the prompt tokens the model's positions (`max_positions`, None when the
    config gives none) leave beside max_new_tokens, or MAX_SOLVED_BATCH prompts."""
    if what == "max_input_tokens":
        return (max_positions or 1 << 20) - settings.workload.max_new_tokens
    return MAX_SOLVED_BATCH


def largest(plan: PlanFn, inventory: Inventory, settings: PlanSettings, what: str, bound: int) -> int:
    """The largest `what` up to `bound` whose plan fits (0 if even 1 does not), by bisection."""
    return bisect_largest(lambda value: plan(inventory, with_value(settings, what, value)).fits, bound)


def quantizations_after(mode: str, gguf: bool) -> list[str]:
    """The bitsandbytes modes smaller than `mode` that a plan may try (none for a GGUF file: transformers cannot
    quantize one)."""
    order: list[str] = list(QUANT_MODES) if not gguf else ["none"]  # QUANT_MODES: each smaller than the one before
    return order[order.index(mode) + 1 :]


def without_offload(inventory: Inventory) -> Inventory:
    """The machine's GPUs alone: no CPU memory for weights, no offload folder."""
    return replace(inventory, cpu_bytes=0, offload_dir=None, disk_bytes=None)


@dataclass(frozen=True)
class Alternative:
    """One change that makes a plan fit, found by planning it. `change`: "quantize" (`value` the mode),
    "max_input_tokens" or "batch_size" (`value` the largest that fits), "cpu_offload" (`value` the CPU bytes the plan
    takes) or "disk_offload". `plan`: the plan that fits, where the change was planned whole."""

    change: str
    value: str | int = ""
    plan: Plan | None = None


def alternatives(
    plan: PlanFn,
    inventory: Inventory,
    settings: PlanSettings,
    max_positions: int | None,
    gguf: bool,
    offload: bool = True,
) -> list[Alternative]:
    """What would fit instead of `settings` on `inventory`, in the order a user would try them: smaller
    quantization, the largest context, the largest batch, then (with `offload`) CPU and disk offload. `gguf`: the
    model is a GGUF file, which transformers neither quantizes nor offloads to disk."""
    found = []
    for mode in quantizations_after(settings.quant.mode, gguf):
        trial = plan(inventory, replace(settings, quant=replace(settings.quant, mode=mode)))  # type: ignore[arg-type]
        if trial.fits:
            found.append(Alternative("quantize", mode, trial))
    for what in ("max_input_tokens", "batch_size"):
        if what == "batch_size" and settings.workload.batch_size <= 1:
            continue
        best = largest(plan, inventory, settings, what, solve_bound(settings, what, max_positions))
        if best >= 1:
            found.append(Alternative(what, best))
    if offload:
        found += offload_alternatives(plan, inventory, settings, gguf)
    return found


def offload_alternatives(plan: PlanFn, inventory: Inventory, settings: PlanSettings, gguf: bool) -> list[Alternative]:
    """CPU offload (with as much CPU memory as the plan takes, when that is more than the machine gives) and disk
    offload (when no offload folder is set), each where it fits."""
    found = []
    if inventory.gpus:
        trial = plan(replace(inventory, cpu_bytes=UNBOUNDED_BYTES), settings)
        if trial.fits and "cpu" in trial.placement.estimates:
            need = trial.placement.estimates["cpu"].total_bytes
            if need > inventory.cpu_bytes:
                found.append(Alternative("cpu_offload", need, trial))
    if inventory.offload_dir is None and not gguf:
        trial = plan(replace(inventory, offload_dir="offload", disk_bytes=None), settings)
        if trial.fits:
            found.append(Alternative("disk_offload", "", trial))
    return found


def one_more(
    plan: PlanFn, inventory: Inventory, settings: PlanSettings, what: str, max_positions: int | None
) -> Plan | None:
    """The plan for one more `what` than `settings` solved for (to say why --solve stopped there); None when the
    solved value is the most --solve tries."""
    value = getattr(settings.workload, what)
    if value >= solve_bound(settings, what, max_positions):
        return None
    return plan(inventory, with_value(settings, what, value + 1))
