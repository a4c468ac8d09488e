"""A plan as data (settings in; the Plan and the PlanResult out) and the planner's rules that need no model built:
the dtype fallback, the devices as slots, a plan's speed and its offload warning. (Pricing and placing a plan: fit.py;
solving for the largest workload and what would fit: solve.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
from oneke_plan.plan.blocks import ModelLayout
from oneke_plan.plan.fit import (
    BlockCost,
    Placement,
    Slot,
    cpu_quantization_by_device,
)
from oneke_plan.plan.inventory import Inventory, runs_bf16
from oneke_plan.plan.memory import (
    DEFAULT_CPU_RESERVE_BYTES,
    DEFAULT_GPU_RESERVE_BYTES,
    DTYPE_BYTES,
    Quantization,
    Workload,
)
from oneke_plan.plan.profile import (
    Profile,
)
from oneke_plan.plan.speed import OffloadCost, SpeedPrediction, predict, rates_of


@dataclass(frozen=True)
class PlanSettings:
    """Everything besides the model and the machine that changes a plan."""

    workload: Workload
    quant: Quantization = Quantization()
    dtype: str = "auto"
    strategy: str = "fill"
    reserve_bytes: int = DEFAULT_GPU_RESERVE_BYTES
    cpu_reserve_bytes: int = DEFAULT_CPU_RESERVE_BYTES
    eager_attention: bool = False


def check_positive(workload: Workload) -> None:
    """Token counts and batch size are positive (needs no model: callers check this before building one)."""
    for name in ("max_input_tokens", "max_new_tokens", "batch_size"):
        if getattr(workload, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, not {getattr(workload, name)}")


def check_replica_counts(count: int | str, nodes: int) -> None:
    """--replicas and --nodes are positive (or --replicas auto); needs no model."""
    if nodes < 1 or (count != "auto" and int(count) < 1):
        raise BadInput("--replicas and --nodes must be positive (or --replicas auto)")


@dataclass
class Plan:
    settings: PlanSettings
    dtype: str
    attn_implementation: str  # what transformers runs attention with: "sdpa" or "eager" (as the build chose)
    slots: list[Slot]
    costs: list[BlockCost]
    placement: Placement
    layout: ModelLayout
    log: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.placement.fits


@dataclass(frozen=True)
class PlanResult:
    """A written plan: the plan, its profile, what solving found, and (for plans that offload) what would fit on
    the GPUs alone, each line computed by planning it."""

    plan: Plan
    profile: Profile
    solved: str | None = None
    gpu_only_options: list[str] | None = None
    replicas: list[Plan] = field(default_factory=list)  # with --replicas: every copy's plan (`plan` is the first)
    unused_gpus: list[int] = field(default_factory=list)  # GPUs no replica needs
    template_reason: str = ""  # why the profile's chat template is the one it is, in words


@dataclass(frozen=True)
class ModelDtype:
    """The dtype transformers' `from_pretrained(dtype="auto")` would load the model in, and where it came from."""

    name: str | None  # e.g. "bfloat16"; None when neither the config nor the weights say
    origin: str  # "config.json", "the checkpoint", or why it is unknown


def resolve_dtype(requested: str, model: ModelDtype, inventory: Inventory) -> tuple[str, list[str]]:
    """The compute dtype, and why. `auto` keeps the model's own dtype; bf16 needs compute capability >= 8.0
    (Ampere), so older cards get fp16, with a warning."""
    notes: list[str] = []
    if requested != "auto":
        if requested == "float16" and model.name == "bfloat16":
            notes.append("warning: the model was trained in bf16; fp16 can overflow and give wrong outputs")
        return requested, notes + [f"dtype: {requested}, as --dtype says (the model's own: {model.name})"]
    if model.name is None:
        raise BadInput(
            f"--dtype auto: {model.origin}; pass --dtype bfloat16, float16 or float32 (transformers would load it "
            "as float32)"
        )
    if model.name not in DTYPE_BYTES:
        raise BadInput(
            f"--dtype auto: the model's dtype is {model.name} (from {model.origin}), which oneke-plan does not plan "
            "for; pass --dtype bfloat16, float16 or float32"
        )
    if model.name != "bfloat16":
        return model.name, notes + [f"dtype: {model.name}, as {model.origin} says"]
    old = [g for g in inventory.gpus if not runs_bf16(g)]
    if old:
        names = ", ".join(f"GPU {g.index} ({g.name}, {g.capability_text})" for g in old)
        notes.append(
            f"warning: {names} cannot run bf16, so float16 is used; the model was trained in bf16 and "
            "fp16 can overflow and give wrong outputs"
        )
        return "float16", notes
    unknown = [g.index for g in inventory.gpus if g.compute_capability is None]
    if unknown:
        notes.append(
            f"dtype: bfloat16, as {model.origin} says, assuming GPU {', '.join(map(str, unknown))} support it "
            "(compute capability unknown: describe the card by name, e.g. --gpu 'RTX 3090', to check)"
        )
    else:
        notes.append(
            f"dtype: bfloat16, as {model.origin} says" + (" and every GPU supports it" if inventory.gpus else "")
        )
    return "bfloat16", notes


def make_slots(inventory: Inventory, reserve_bytes: int, cpu_reserve_bytes: int) -> list[Slot]:
    """Devices in fill order: GPUs, then CPU (when it may hold weights), then disk (when an offload dir is set).
    Each GPU keeps its own reserve when the machine gives one (--reserve INDEX=SIZE, an inventory file's card),
    else `reserve_bytes`; the CPU likewise (--reserve cpu=SIZE), else `cpu_reserve_bytes`."""
    slots = [
        Slot(g.index, f"GPU {g.index}", g.free_bytes, reserve_bytes if g.reserve_bytes is None else g.reserve_bytes)
        for g in inventory.gpus
    ]
    if inventory.cpu_bytes > 0 or not inventory.gpus:
        cpu_reserve = cpu_reserve_bytes if inventory.cpu_reserve_bytes is None else inventory.cpu_reserve_bytes
        slots.append(Slot("cpu", "CPU", inventory.cpu_bytes, cpu_reserve))
    if inventory.offload_dir is not None:
        slots.append(Slot("disk", "disk", inventory.disk_bytes, 0))
    return slots


def predict_speed(plan: Plan, inventory: Inventory) -> SpeedPrediction:
    """The plan's decode and prefill speed from each device's bandwidth and throughput (speed.py)."""
    placement = plan.placement
    return predict(
        plan.layout, placement.assignment, placement.estimates, plan.slots, plan.settings.workload, rates_of(inventory)
    )


def offload_cost_of(plan: Plan, inventory: Inventory) -> OffloadCost | None:
    """What the plan's CPU- and disk-offloaded weights cost each decoding step (the speed prediction's figures);
    None when the plan offloads nothing beside GPUs, or does not fit."""
    return predict_speed(plan, inventory).offload if plan.fits else None


def plan_gpus(plan: Plan) -> list[int]:
    return [slot.id for slot in plan.slots if isinstance(slot.id, int)]


def offload_slowdown_text(plan: Plan, inventory: Inventory) -> str:
    """'about 23x slower', or, where a bandwidth is not known, what would tell how much; for a plan that offloads
    (what would fit: CPU or disk offload)."""
    cost = offload_cost_of(plan, inventory)
    if cost is None:  # nothing read from an offload at each step (everything on disk: the disk runs nothing)
        return "how much slower is not predicted"
    if cost.slowdown is None:
        return f"slower by a factor not known without {_unknown_bandwidths(cost)}"
    return f"about {cost.slowdown:.0f}x slower"


def _unknown_bandwidths(cost: OffloadCost) -> str:
    """The devices whose memory bandwidth an offload slowdown lacks, and how to give it."""
    devices = cost.unknown_devices
    flags = " ".join(f"--bandwidth {device}=GB/s" for device in devices)
    which = " and ".join("the CPU" if device == "cpu" else f"GPU {device}" for device in devices)
    if devices == ("cpu",):
        return f"the memory bandwidth of the CPU (pass what this machine measures: {flags})"
    return f"the memory bandwidth of {which} (name the card, e.g. --gpu 'RTX 3090', or pass {flags})"


def offload_note(plan: Plan, inventory: Inventory) -> list[str]:
    """A warning when a plan with GPUs keeps weights on the CPU or disk: how much, how long each token takes at
    least and how much slower it decodes, with the bandwidths it assumed (or which one it lacks)."""
    cost = offload_cost_of(plan, inventory)
    if cost is None or not plan_gpus(plan):  # without GPUs, offloading to disk is the plan itself, not a warning
        return []
    names = {"cpu": "the CPU", "disk": "disk"}
    where = " and ".join(f"{format_bytes(n)} on {names[str(d)]}" for d, n in cost.bytes_by_device.items())
    head = f"warning: offload: {where} are copied to the GPU at every decoding step, so each new token takes at least "
    figures = "; ".join(cost.figures)
    if cost.slowdown is None or cost.step_seconds is None:
        return [
            f"{head}{cost.link_seconds:.2f} s for the copy alone ({figures}); how much slower than with every weight "
            f"on a GPU is not known without {_unknown_bandwidths(cost)}"
        ]
    return [
        f"{head}{cost.step_seconds:.2f} s: about {cost.slowdown:.0f}x slower than with every weight on a GPU "
        f"(the speed prediction's decoding step; {figures})"
    ]


def cpu_quantization_note(plan: Plan) -> list[str]:
    """A warning when bitsandbytes would quantize weights on the CPU (fit.quantized_on_cpu): 8/4-bit saves no memory
    there, and the plan prices the CPU as if the weights were not quantized (fit.cpu_quantization_by_device, the
    bytes fit.estimate adds)."""
    extra = sum(cpu_quantization_by_device(plan.placement.assignment, plan.costs).values())
    if plan.settings.quant.mode == "none" or not extra:
        return []
    return [
        f"warning: --quantize {plan.settings.quant.mode} on the CPU saves no memory here: bitsandbytes' CPU path "
        "keeps more than its quantized weights (the float checkpoint's pages read while quantizing, and buffers of "
        "every matmul that the allocator keeps), which depends on the allocator and cannot be counted, so the CPU "
        f"is priced as without quantization ({format_bytes(extra)} more than the quantized weights, in its "
        "workspace); plan without --quantize on the CPU"
    ]


def peaks_text(plan: Plan) -> str:
    """'GPU 0 11.61 GiB of 12.00 GiB, CPU 3.20 GiB of 22.00 GiB' for the devices a plan uses."""
    parts = []
    for slot in plan.slots:
        est = plan.placement.estimates.get(slot.id)
        if est is not None:
            cap = format_bytes(slot.capacity_bytes) if slot.capacity_bytes is not None else "unbounded"
            parts.append(f"{slot.name} {format_bytes(est.total_bytes)} of {cap}")
    return ", ".join(parts)
