"""oneke-plan's algorithm, step by step, each step saying what it decided and why.

1. Build the model on the meta device and read its blocks (layout.py).
2. Choose the dtype: the config's, bf16 only where every GPU supports it.
3. Price every block: weights for the dtype/quantization, KV cache and activations for the workload (fit.py).
4. Place blocks on devices so that weights + KV + workspace + reserve fit each device (fit.py).
5. Turn the placement into per-device max_memory budgets and let accelerate's infer_auto_device_map build the
   device_map from the same meta model; check it agrees block for block.
6. If nothing fits: say by how much, and compute (not guess) what would: 8-bit, 4-bit, a shorter context, a
   smaller batch, CPU or disk offload.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from oneke_plan import __version__
from oneke_plan.errors import BadInput, DoesNotFit
from oneke_plan.fit import BlockCost, DeviceEstimate, DeviceId, Placement, Slot, block_costs, place
from oneke_plan.inventory import Inventory
from oneke_plan.layout import ModelLayout, build_meta_model, load_config, read_layout
from oneke_plan.memory import (
    DEFAULT_CPU_RESERVE_BYTES,
    DEFAULT_GPU_RESERVE_BYTES,
    DTYPE_BYTES,
    Quantization,
    Workload,
)
from oneke_plan.model_source import ModelSource
from oneke_plan.profile import ESTIMATE_KEYS, Profile, ProfileDevice
from oneke_plan.sizes import format_bytes

BF16_MIN_CAPABILITY = (8, 0)
MAX_SOLVED_BATCH = 4096


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


@dataclass
class Plan:
    settings: PlanSettings
    dtype: str
    slots: list[Slot]
    costs: list[BlockCost]
    placement: Placement
    log: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.placement.fits


def resolve_dtype(requested: str, config_dtype: str | None, inventory: Inventory) -> tuple[str, list[str]]:
    """The compute dtype, and why. bf16 needs compute capability >= 8.0 (Ampere); older cards get fp16."""
    notes: list[str] = []
    if requested != "auto":
        if requested == "float16" and config_dtype == "bfloat16":
            notes.append("warning: the model was trained in bf16; fp16 can overflow and give wrong outputs")
        return requested, notes
    base = config_dtype if config_dtype in DTYPE_BYTES else "bfloat16"
    if config_dtype not in DTYPE_BYTES:
        notes.append(f"dtype: the config names no usable dtype ({config_dtype!r}); using bfloat16")
    if base != "bfloat16":
        return base, notes + [f"dtype: {base}, as the config says"]
    old = [g for g in inventory.gpus if g.compute_capability is not None and g.compute_capability < BF16_MIN_CAPABILITY]
    if old:
        names = ", ".join(
            f"GPU {g.index} ({g.name}, {g.compute_capability[0]}.{g.compute_capability[1]})"  # type: ignore[index]
            for g in old
        )
        notes.append(
            f"warning: {names} cannot run bf16, so float16 is used; the model was trained in bf16 and "
            "fp16 can overflow and give wrong outputs"
        )
        return "float16", notes
    unknown = [g.index for g in inventory.gpus if g.compute_capability is None]
    if unknown:
        notes.append(
            f"dtype: bfloat16, assuming GPU {', '.join(map(str, unknown))} support it (compute capability "
            "unknown: describe the card by name, e.g. --gpu 'RTX 3090', to check)"
        )
    else:
        notes.append("dtype: bfloat16, as the config says" + (" and every GPU supports it" if inventory.gpus else ""))
    return "bfloat16", notes


def make_slots(inventory: Inventory, reserve_bytes: int, cpu_reserve_bytes: int) -> list[Slot]:
    """Devices in fill order: GPUs, then CPU (when it may hold weights), then disk (when an offload dir is set)."""
    slots = [Slot(g.index, f"GPU {g.index}", g.free_bytes, reserve_bytes) for g in inventory.gpus]
    if inventory.cpu_bytes > 0 or not inventory.gpus:
        slots.append(Slot("cpu", "CPU", inventory.cpu_bytes, cpu_reserve_bytes))
    if inventory.offload_dir is not None:
        slots.append(Slot("disk", "disk", inventory.disk_bytes, 0))
    return slots


class Planner:
    """Holds one model's meta build and layout, so that re-planning (suggestions, solving) costs arithmetic only."""

    def __init__(self, source: ModelSource, trust_remote_code: bool = False, build_dtype: str = "bfloat16"):
        self.source = source
        self.config = load_config(source, trust_remote_code)
        self.model: Any = build_meta_model(self.config, build_dtype, trust_remote_code)
        self.layout: ModelLayout = read_layout(self.model, self.config)

    # -- steps 2-4 ---------------------------------------------------------------------------------------------
    def check_workload(self, workload: Workload) -> None:
        for name in ("max_input_tokens", "max_new_tokens", "batch_size"):
            if getattr(workload, name) <= 0:
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, not {getattr(workload, name)}")
        limit = self.layout.max_position_embeddings
        if limit and workload.sequence_tokens > limit:
            raise BadInput(
                f"--max-input-tokens {workload.max_input_tokens} + --max-new-tokens {workload.max_new_tokens} = "
                f"{workload.sequence_tokens} tokens is beyond the model's max_position_embeddings ({limit}); "
                "lower one of them"
            )

    def plan(self, inventory: Inventory, settings: PlanSettings) -> Plan:
        self.check_workload(settings.workload)
        dtype, log = resolve_dtype(settings.dtype, self.layout.config_dtype, inventory)
        slots = make_slots(inventory, settings.reserve_bytes, settings.cpu_reserve_bytes)
        if not slots:
            raise BadInput("no device to plan for: no GPU was given or detected and --cpu-memory is 0")
        costs = block_costs(self.layout, dtype, settings.quant, settings.workload, settings.eager_attention)
        layer = next((c for c in costs if c.kind == "layer"), None)
        if layer is not None:
            log.append(
                f"per decoder layer: weights {format_bytes(layer.weights_bytes)}, KV cache "
                f"{format_bytes(layer.kv_cache_bytes)} ({settings.workload.batch_size} x "
                f"{settings.workload.sequence_tokens} tokens), "
                f"prefill activations {format_bytes(layer.activation_bytes)}"
            )
        for slot in slots:
            cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
            log.append(f"{slot.name}: {cap} usable, of which reserve {format_bytes(slot.reserve_bytes)}")
        placement = place(costs, slots, settings.strategy)
        return Plan(settings, dtype, slots, costs, placement, log + placement.log)

    # -- step 5 ------------------------------------------------------------------------------------------------
    def device_map(self, plan: Plan) -> dict[str, DeviceId]:
        """accelerate's infer_auto_device_map on the meta model, with max_memory budgets that reproduce the plan.

        Budgets are in accelerate's own units (its compute_module_sizes at the plan's dtype), so quantization does
        not change them: the plan decides which blocks go where, accelerate writes the map and handles tied
        weights. accelerate keeps the largest layer's size free on its main devices (first GPU, CPU) for offloaded
        layers; that room is added back so the budget holds exactly the planned blocks.
        """
        from accelerate import infer_auto_device_map
        from accelerate.utils import compute_module_sizes, get_max_layer_size

        torch_dtype = getattr(__import__("torch"), plan.dtype)
        sizes = compute_module_sizes(self.model, dtype=torch_dtype)
        budgets: dict[DeviceId, int] = {s.id: 0 for s in plan.slots if s.id != "disk"}
        for block in self.layout.blocks:
            device = plan.placement.assignment[block.name]
            if device != "disk":
                budgets[device] += sum(sizes[t.name] for t in block.tensors)
        top = (
            list(self.model.named_parameters(recurse=False))
            + list(self.model.named_children())
            + list(self.model.named_buffers(recurse=False))
        )
        max_layer, _ = get_max_layer_size(top, sizes, list(self.layout.no_split_module_classes))
        gpus = [s.id for s in plan.slots if s.is_gpu]
        for main in [gpus[0], "cpu"] if gpus else ["cpu"]:
            if main in budgets:
                budgets[main] += max_layer
        with warnings.catch_warnings():
            # accelerate warns that offloaded buffers might not fit a GPU: the plan already counted them.
            warnings.simplefilter("ignore")
            device_map = infer_auto_device_map(
                self.model,
                max_memory=budgets,
                no_split_module_classes=list(self.layout.no_split_module_classes),
                dtype=torch_dtype,
            )
        self._check_agrees(device_map, plan.placement)
        return dict(device_map)

    def _check_agrees(self, device_map: dict[str, DeviceId], placement: Placement) -> None:
        for block in self.layout.blocks:
            found = {
                d
                for key, d in device_map.items()
                if key == ""
                or key == block.name
                or block.name.startswith(key + ".")
                or key.startswith(block.name + ".")
            }
            if found != {placement.assignment[block.name]}:
                raise RuntimeError(
                    f"internal error: accelerate put {block.name} on {sorted(map(str, found))}, the plan on "
                    f"{placement.assignment[block.name]!r}; please report this with the command you ran"
                )

    # -- step 6 ------------------------------------------------------------------------------------------------
    def largest(self, inventory: Inventory, settings: PlanSettings, what: str) -> int:
        """The largest max_input_tokens or batch_size that fits (0 if even 1 does not), by bisection on the
        pure placement; nothing is loaded."""
        workload = settings.workload
        if what == "max_input_tokens":
            high = (self.layout.max_position_embeddings or 1 << 20) - workload.max_new_tokens
        else:
            high = MAX_SOLVED_BATCH

        def fits(value: int) -> bool:
            trial = replace(settings, workload=replace(workload, **{what: value}))
            return self.plan(inventory, trial).fits

        return bisect_largest(fits, high)

    def alternatives(self, inventory: Inventory, settings: PlanSettings) -> list[str]:
        """What would fit instead, each line computed by planning it."""
        lines = []
        order = ["none", "8bit", "4bit"]
        for mode in order[order.index(settings.quant.mode) + 1 :]:
            trial = self.plan(inventory, replace(settings, quant=replace(settings.quant, mode=mode)))  # type: ignore[arg-type]
            if trial.fits:
                lines.append(f"--quantize {mode}: fits ({_peaks(trial)})")
        context = self.largest(inventory, settings, "max_input_tokens")
        if context >= 1:
            lines.append(f"--max-input-tokens {context} (with batch {settings.workload.batch_size}): fits")
        if settings.workload.batch_size > 1:
            batch = self.largest(inventory, settings, "batch_size")
            if batch >= 1:
                lines.append(f"--batch-size {batch}: fits")
        if inventory.gpus:
            unbounded_cpu = replace(inventory, cpu_bytes=1 << 62)
            trial = self.plan(unbounded_cpu, settings)
            if trial.fits and "cpu" in trial.placement.estimates:
                need = trial.placement.estimates["cpu"].total_bytes
                if need > inventory.cpu_bytes:
                    lines.append(
                        f"CPU offload: --cpu-memory {format_bytes(need).replace(' ', '')} "
                        "(slow: weights cross PCIe every step)"
                    )
        if inventory.offload_dir is None:
            trial = self.plan(replace(inventory, offload_dir="offload", disk_bytes=None), settings)
            if trial.fits:
                lines.append("disk offload: --offload-dir DIR (very slow)")
        return lines

    def does_not_fit_message(self, plan: Plan, inventory: Inventory) -> str:
        placement = plan.placement
        left = [c for c in plan.costs if c.name in placement.unplaced]
        left_bytes = sum(c.weights_bytes + c.kv_cache_bytes for c in left)
        lines = [
            f"does not fit: {len(left)} blocks ({left[0].name} .. {left[-1].name}) are left over, "
            f"{format_bytes(left_bytes)} of weights and KV cache, after every device was filled:"
        ]
        for slot in plan.slots:
            est = placement.estimates.get(slot.id)
            used = est.total_bytes if est else 0
            cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
            lines.append(f"  {slot.name}: {format_bytes(used)} of {cap} planned")
        options = self.alternatives(inventory, plan.settings)
        lines.append("what would fit:" if options else "nothing tried fits; add GPUs or memory")
        lines += [f"  {line}" for line in options]
        return "\n".join(lines)

    # -- the profile -------------------------------------------------------------------------------------------
    def profile(self, plan: Plan, inventory: Inventory) -> Profile:
        if not plan.fits:
            raise DoesNotFit(self.does_not_fit_message(plan, inventory))
        device_map = self.device_map(plan)
        devices = []
        used = [s for s in plan.slots if s.is_gpu or s.id in plan.placement.estimates]
        for slot in used:
            gpu = next((g for g in inventory.gpus if g.index == slot.id), None)
            total = gpu.total_bytes if gpu else slot.capacity_bytes
            cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}" if gpu and gpu.compute_capability else None
            name = gpu.name if gpu else slot.name
            devices.append(ProfileDevice(slot.id, name, total, slot.capacity_bytes, cc))
        estimate = {}
        for slot in used:
            est = plan.placement.estimates.get(slot.id, DeviceEstimate())
            estimate[slot.id] = {key: getattr(est, key) for key in ESTIMATE_KEYS}
        quant: dict[str, Any] = {"mode": plan.settings.quant.mode}
        if plan.settings.quant.mode == "4bit":
            quant.update(quant_type=plan.settings.quant.quant_type, double_quant=plan.settings.quant.double_quant)
        workload = plan.settings.workload
        return Profile(
            model={
                "source": self.source.name,
                "architecture": self.layout.architecture,
                "model_type": self.layout.model_type,
                "parameter_count": self.layout.parameter_count,
                "config_fingerprint": self.source.fingerprint,
            },
            dtype=plan.dtype,
            quantization=quant,
            workload={
                "max_input_tokens": workload.max_input_tokens,
                "max_new_tokens": workload.max_new_tokens,
                "batch_size": workload.batch_size,
            },
            devices=devices,
            device_map=device_map,
            estimate=estimate,
            strategy=plan.settings.strategy,
            offload_dir=inventory.offload_dir if "disk" in device_map.values() else None,
            created_by=f"oneke-plan {__version__}",
            notes=[line for line in plan.log if line.startswith("warning")],
        )


def bisect_largest(fits: Callable[[int], bool], high: int) -> int:
    """Largest x in [1, high] with fits(x), given fits is monotone (True then False); 0 if fits(1) is False."""
    if high < 1 or not fits(1):
        return 0
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _peaks(plan: Plan) -> str:
    """'GPU 0 11.61 GiB of 12.00 GiB, CPU 3.20 GiB of 22.00 GiB' for the devices a plan uses."""
    parts = []
    for slot in plan.slots:
        est = plan.placement.estimates.get(slot.id)
        if est is not None:
            cap = format_bytes(slot.capacity_bytes) if slot.capacity_bytes is not None else "unbounded"
            parts.append(f"{slot.name} {format_bytes(est.total_bytes)} of {cap}")
    return ", ".join(parts)
