"""The planner's first two steps, price and place, as pure functions over byte counts (no torch).

Price: `price` turns what was measured (each block's tensors, the memory the model's forward holds per block for
the workload, the weights bitsandbytes would quantize, a LoRA adapter's bytes) into one `BlockCost` per block for
a quantization. Place: `estimate` sums a placement per device; `place` fills devices in order (or balanced) and says
why: every step of `fill` is kept as a `PlacementStep` record, and each block that moves to the next device gets a
log line saying what it needs and what the device has left. Both live here, apart from the measuring (which needs
the model built) and from solving (which re-plans for other settings), so that a plan for new settings is
arithmetic once its measurements exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from oneke_plan.core.errors import BadInput
from oneke_plan.core.records import byte_count, checks
from oneke_plan.core.sizes import format_bytes
from oneke_plan.plan.blocks import BlockInfo, ModelLayout, TensorInfo
from oneke_plan.plan.memory import (
    NO_QUANTIZATION,
    Quantization,
    Workload,
    linear_weight_bytes,
    logits_bytes,
    merges_on_load,
    quant_scratch_bytes,
)

DeviceId = int | str
OFFLOAD_DEVICES = ("cpu", "disk")


@dataclass(frozen=True)
class BlockCost:
    """One block priced in bytes. State (KV cache), activations, logits and scratch are charged to its execution
    device. `kv_cache_bytes` is the state it holds at the last decoding step, `prefill_state_bytes` right after the
    prefill (larger for a sliding window's cache when the prompt is longer than the window).

    `weights_bytes` is the block as loaded with the plan's quantization; `unquantized_weights_bytes` the same block
    in the compute dtype, which is how transformers keeps bitsandbytes models' CPU- and disk-offloaded modules.
    """

    name: str
    kind: str
    weights_bytes: int
    unquantized_weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    logits_bytes: int
    quant_scratch_bytes: int
    tied_to: str | None
    prefill_state_bytes: int = 0
    # A LoRA adapter merged on load (adapter.py): its tensors in this block while they exist, before the merge, and
    # the largest transient of merging one of its layers. Load-time memory: the weights are the base's after it.
    adapter_load_bytes: int = 0
    merge_scratch_bytes: int = 0


@dataclass(frozen=True)
class Slot:
    """A device the planner may fill: `capacity_bytes` is all it may use, reserve included."""

    id: DeviceId
    name: str
    capacity_bytes: int | None  # None: unbounded (disk with unknown size)
    reserve_bytes: int

    @property
    def is_gpu(self) -> bool:
        return isinstance(self.id, int)


@dataclass(frozen=True)
class DeviceEstimate:
    """What a device holds, in bytes, term by term (docs/memory-model.md); a profile's `estimate.<id>`."""

    weights_bytes: int = field(default=0, metadata=checks(byte_count, required=True))
    kv_cache_bytes: int = field(default=0, metadata=checks(byte_count, required=True))
    workspace_bytes: int = field(default=0, metadata=checks(byte_count, required=True))
    reserve_bytes: int = field(default=0, metadata=checks(byte_count, required=True))

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes + self.reserve_bytes

    def to_data(self) -> dict[str, int]:
        """As a profile writes it: the four terms and their sum, `total_bytes`."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class PlacementStep:
    """One decision of `fill`: `blocks` (a block and the blocks tied to it) tried on `device`, in bytes.

    `over` is the device the step is about: the tried device itself, unless the trial pushed another device past its
    limit (the device an offloaded block runs on). `need` is what the blocks add to `over`'s estimate, term by term
    (a device's first block brings its reserve); `left_bytes` is what `over` had left under `limit_bytes` before the
    trial (None: unbounded). `capped`: the limit is a cap on `over`'s weights (see `place`), not its whole estimate.
    """

    blocks: tuple[str, ...]
    label: str  # "layer 33" for the 34th decoder layer, else the block's name
    device: DeviceId
    placed: bool
    over: DeviceId
    need: DeviceEstimate
    left_bytes: int | None
    limit_bytes: int | None
    capped: bool = False

    @property
    def need_bytes(self) -> int:
        """What the step adds to `over`: its whole estimate, or only its weights when `capped`."""
        return self.need.weights_bytes if self.capped else self.need.total_bytes


@dataclass
class Placement:
    assignment: dict[str, DeviceId]  # block name -> device
    estimates: dict[DeviceId, DeviceEstimate]
    unplaced: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    steps: list[PlacementStep] = field(default_factory=list)  # every decision of the fill that made it, in order

    @property
    def fits(self) -> bool:
        return not self.unplaced

    def first_refusal(self) -> PlacementStep | None:
        """The last device's refusal of the first block that did not fit (None when everything fits)."""
        if not self.unplaced:
            return None
        return next((s for s in reversed(self.steps) if not s.placed and self.unplaced[0] in s.blocks), None)


def _tensor_bytes(tensor: TensorInfo, quant: Quantization, quantizable: Mapping[str, tuple[int, int]]) -> int:
    shape = quantizable.get(tensor.name) if quant.mode != "none" else None
    if shape is not None:
        return linear_weight_bytes(*shape, quant, tensor.dtype_bytes)
    return tensor.numel * tensor.dtype_bytes


def block_weights_bytes(
    block: BlockInfo, quant: Quantization = NO_QUANTIZATION, quantizable: Mapping[str, tuple[int, int]] | None = None
) -> int:
    """Bytes of the block's parameters and buffers once loaded with `quant` (tied ones counted once): the layout's
    bytes per element, and bitsandbytes' layout for the weights transformers quantizes (`quantizable`)."""
    return sum(_tensor_bytes(t, quant, quantizable or {}) for t in block.tensors)


@dataclass(frozen=True)
class MeasuredMemory:
    """What the model's own forward holds per block for one workload (measure/forward.py), in bytes."""

    prefill_state_bytes: Mapping[str, int]  # KV cache / recurrent state each block keeps after the prefill
    decode_state_bytes: Mapping[str, int]  # ... and at the last decoding step
    peak_bytes: Mapping[str, int]  # transient bytes while each block runs
    outside_prefill_state_bytes: int = 0  # what runs outside every block (masks, ...): charged to the first
    outside_decode_state_bytes: int = 0  # block's device
    outside_peak_bytes: int = 0


def block_costs(
    layout: ModelLayout,
    quant: Quantization,
    workload: Workload,
    memory: MeasuredMemory,
    quantizable: Mapping[str, tuple[int, int]] | None = None,
) -> list[BlockCost]:
    """Price every block of `layout`: weights for the quantization, state and transient peak as measured for the
    workload, plus what generation adds on the lm_head's device (logits_bytes) and bitsandbytes' scratch."""
    quantizable = quantizable or {}
    costs = []
    for i, block in enumerate(layout.blocks):
        scratch = 0
        if quant.mode != "none":
            shapes = [quantizable[t.name] for t in block.tensors if t.name in quantizable]
            scratch = max((quant_scratch_bytes(*shape, quant) for shape in shapes), default=0)
        prefill_state = memory.prefill_state_bytes.get(block.name, 0)
        decode_state = memory.decode_state_bytes.get(block.name, 0)
        peak = max(memory.peak_bytes.get(block.name, 0), 0)
        if i == 0:
            prefill_state += memory.outside_prefill_state_bytes
            decode_state += memory.outside_decode_state_bytes
            peak = max(peak, memory.outside_peak_bytes)
        logits = logits_bytes(workload.batch_size, layout.vocab_size) if block.kind == "lm_head" else 0
        costs.append(
            BlockCost(
                block.name,
                block.kind,
                block_weights_bytes(block, quant, quantizable),
                block_weights_bytes(block),
                decode_state,
                peak,
                logits,
                scratch,
                block.tied_to,
                prefill_state,
            )
        )
    return costs


@dataclass(frozen=True)
class AdapterBytes:
    """A LoRA adapter's bytes per block, as peft builds it onto the model: its tensors, and the largest transient
    of merging one of its layers into the weights."""

    resident_bytes: Mapping[str, int]
    merge_scratch_bytes: Mapping[str, int]


def price(
    layout: ModelLayout,
    quant: Quantization,
    workload: Workload,
    memory: MeasuredMemory,
    quantizable: Mapping[str, tuple[int, int]] | None = None,
    adapter: AdapterBytes | None = None,
) -> list[BlockCost]:
    """Every block priced for the settings: `block_costs`, and the adapter's tensors with the weights when it
    stays unmerged (8/4-bit: merges_on_load), as load-time memory when it is merged on load (16-bit).
    `quantizable`: what bitsandbytes would quantize, given whenever `quant` quantizes (BadInput when that is
    nothing)."""
    if quant.mode != "none" and not quantizable:
        raise BadInput(
            f"--quantize {quant.mode}: transformers' bitsandbytes integration quantizes no layer of "
            f"{layout.architecture} (it converts nn.Linear and Conv1D modules only), so it would load unchanged; "
            "plan without --quantize"
        )
    costs = block_costs(layout, quant, workload, memory, quantizable)
    if adapter is None:
        return costs
    resident, scratch = adapter.resident_bytes, adapter.merge_scratch_bytes
    if not merges_on_load(quant.mode):
        return [
            replace(c, weights_bytes=c.weights_bytes + resident.get(c.name, 0),
                    unquantized_weights_bytes=c.unquantized_weights_bytes + resident.get(c.name, 0))
            for c in costs
        ]  # fmt: skip
    return [
        replace(c, adapter_load_bytes=resident.get(c.name, 0), merge_scratch_bytes=scratch.get(c.name, 0))
        for c in costs
    ]


def main_device(assignment: dict[str, DeviceId], slots: Sequence[Slot]) -> DeviceId:
    """Where accelerate runs blocks offloaded to CPU or disk: the first GPU that holds a block (dispatch_model's
    main device), after copying their weights there; the CPU when no GPU holds any."""
    used = set(assignment.values())
    return next((s.id for s in slots if s.is_gpu and s.id in used), "cpu")


def execution_device(device: DeviceId, main: DeviceId) -> DeviceId:
    """Where a block's computation (and so its KV cache and activations) happens: its own device if that is a GPU,
    else the main device."""
    return main if device in OFFLOAD_DEVICES else device


def stays_quantized(home: DeviceId, assignment: Mapping[str, DeviceId]) -> bool:
    """Whether transformers quantizes a block stored on `home` with bitsandbytes.

    On a GPU, yes. With GPUs present, CPU- and disk-offloaded modules are left unquantized (transformers'
    llm_int8_enable_fp32_cpu_offload, which such maps require). Without GPUs, bitsandbytes quantizes on the CPU,
    but only when the whole model is on the CPU: with disk offload transformers needs that same flag, and it leaves
    every CPU and disk module unquantized.
    """
    if home not in OFFLOAD_DEVICES:
        return True
    values = set(assignment.values())
    return home == "cpu" and not any(isinstance(d, int) for d in values) and "disk" not in values


def quantized_on_cpu(home: DeviceId, assignment: Mapping[str, DeviceId]) -> bool:
    """Whether bitsandbytes quantizes a block stored on `home` on the CPU itself (a CPU-only plan, stays_quantized).

    Such a block is priced no lower than unquantized (`cpu_quantization_bytes`): its quantized tensors are what the
    model holds, but the process holds more. Measured on SmolLM2-135M (docs/memory-model.md, "Quantization and
    offload"): the float checkpoint's pages read while quantizing stay resident as long as an unquantized tensor
    still maps the file (float32), and glibc keeps the heap of bitsandbytes' per-call buffers (int8 and float16
    copies of the input, int32 and float32 products): over one prefill an 8-bit process peaked up to 1.2 GiB
    above the unquantized one in the runs of docs/benchmarks.md's table (1.8 GiB in an earlier bfloat16 run),
    varying from run to run: the CPU's reserve, not the plan's terms, has to hold that. That retention depends on
    the allocator, not on shapes alone, so it cannot be counted; the plan says so (plans.cpu_quantization_note)
    and prices the CPU as if unquantized, never lower.
    """
    return home == "cpu" and stays_quantized(home, assignment)


def cpu_quantization_bytes(cost: BlockCost) -> int:
    """What a block quantized on the CPU adds to the CPU's workspace beyond its quantized weights: the difference
    to its unquantized weights, so that the CPU is priced at no less than without quantization (quantized_on_cpu)."""
    return max(cost.unquantized_weights_bytes - cost.weights_bytes, 0)


def cpu_quantization_by_device(assignment: Mapping[str, DeviceId], costs: Sequence[BlockCost]) -> dict[DeviceId, int]:
    """Per device, what the blocks bitsandbytes quantizes there on the CPU add to its workspace
    (cpu_quantization_bytes); devices without such blocks are left out."""
    added: dict[DeviceId, int] = {}
    for cost in costs:
        home = assignment.get(cost.name)
        if home is not None and quantized_on_cpu(home, assignment):
            added[home] = added.get(home, 0) + cpu_quantization_bytes(cost)
    return added


def estimate(
    assignment: dict[str, DeviceId], costs: Sequence[BlockCost], slots: Sequence[Slot]
) -> dict[DeviceId, DeviceEstimate]:
    """Per-device bytes of a placement. KV cache = the state of the blocks run there after the prefill or at the
    last step, whichever is more (the two are not summed block by block: a sliding window's cache is largest after
    the prefill, a full one at the end). Workspace = largest activation + logits + largest quantization scratch
    + (on the main GPU) a staging copy of the largest offloaded block. With a LoRA adapter merged on load, the
    device's load peak (weights + the adapter's tensors there + the largest merge transient) is covered too: the
    workspace is raised where that peak is above what inference holds beside the weights. Blocks bitsandbytes
    quantizes on the CPU add their unquantized bytes less their quantized ones to the CPU's workspace
    (cpu_quantization_bytes): 8/4-bit saves no memory there."""
    weights: dict[DeviceId, int] = {}
    kv: dict[DeviceId, int] = {}
    prefill_kv: dict[DeviceId, int] = {}
    activation: dict[DeviceId, int] = {}
    logits: dict[DeviceId, int] = {}
    scratch: dict[DeviceId, int] = {}
    staging: dict[DeviceId, int] = {}
    adapter_load: dict[DeviceId, int] = {}
    merge_scratch: dict[DeviceId, int] = {}
    cpu_quantization = cpu_quantization_by_device(assignment, costs)
    main = main_device(assignment, slots)
    for cost in costs:
        if cost.name not in assignment:
            continue
        home = assignment[cost.name]
        run = execution_device(home, main)
        quantized = stays_quantized(home, assignment)
        stored = cost.weights_bytes if quantized else cost.unquantized_weights_bytes
        weights[home] = weights.get(home, 0) + stored
        kv[run] = kv.get(run, 0) + cost.kv_cache_bytes
        prefill_kv[run] = prefill_kv.get(run, 0) + cost.prefill_state_bytes
        activation[run] = max(activation.get(run, 0), cost.activation_bytes)
        logits[run] = logits.get(run, 0) + cost.logits_bytes
        if quantized:
            scratch[run] = max(scratch.get(run, 0), cost.quant_scratch_bytes)
        if home != run:
            staging[run] = max(staging.get(run, 0), stored)
        if cost.adapter_load_bytes:
            adapter_load[home] = adapter_load.get(home, 0) + cost.adapter_load_bytes
            merge_scratch[home] = max(merge_scratch.get(home, 0), cost.merge_scratch_bytes)
    used = set(weights) | set(kv) | set(activation)
    result = {}
    for slot in slots:
        if slot.id not in used:
            continue
        workspace = (
            activation.get(slot.id, 0) + logits.get(slot.id, 0) + scratch.get(slot.id, 0) + staging.get(slot.id, 0)
            + cpu_quantization.get(slot.id, 0)
        )
        reserve = slot.reserve_bytes if slot.id != "disk" else 0
        state = max(kv.get(slot.id, 0), prefill_kv.get(slot.id, 0))
        load_peak = adapter_load.get(slot.id, 0) + merge_scratch.get(slot.id, 0)
        workspace = max(workspace, load_peak - state)
        result[slot.id] = DeviceEstimate(weights.get(slot.id, 0), state, workspace, reserve)
    return result


def device_owner(name: str, device_map: Mapping[str, DeviceId]) -> DeviceId:
    """The device a device_map gives the tensor or module `name`: its longest matching key, as accelerate reads
    it. Raises KeyError when no key covers `name`."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise KeyError(name)
    return device_map[best]


def _minus(after: DeviceEstimate | None, before: DeviceEstimate | None) -> DeviceEstimate:
    """Term by term, what a device's estimate grew by."""
    a, b = after or DeviceEstimate(), before or DeviceEstimate()
    return DeviceEstimate(
        a.weights_bytes - b.weights_bytes,
        a.kv_cache_bytes - b.kv_cache_bytes,
        a.workspace_bytes - b.workspace_bytes,
        a.reserve_bytes - b.reserve_bytes,
    )


def _labels(costs: Sequence[BlockCost]) -> dict[str, str]:
    """'layer N' for the N-th decoder layer (from 0), the block's own name for the rest."""
    layers = [c.name for c in costs if c.kind == "layer"]
    return {c.name: c.name for c in costs} | {name: f"layer {i}" for i, name in enumerate(layers)}


def _step(
    group: list[str],
    label: str,
    device: DeviceId,
    before: dict[DeviceId, DeviceEstimate],
    after: dict[DeviceId, DeviceEstimate],
    limits: Mapping[DeviceId, int | None],
    caps: Mapping[DeviceId, int],
) -> PlacementStep:
    """Judge one trial: placed if no device passes its weight cap or limit; else about the device that does (the tried
    one first), with what the trial adds there and what it had left."""
    capped = [d for d, cap in caps.items() if d in after and after[d].weights_bytes > cap]
    over = [d for d, e in after.items() if limits.get(d) is not None and e.total_bytes > limits[d]]  # type: ignore[operator]
    if capped:
        d = device if device in capped else capped[0]
        used = (before.get(d) or DeviceEstimate()).weights_bytes
        return PlacementStep(tuple(group), label, device, False, d, _minus(after[d], before.get(d)), caps[d] - used,
                             caps[d], capped=True)  # fmt: skip
    if over:
        d = device if device in over else over[0]
        limit = limits[d]
        left = None if limit is None else limit - (before.get(d) or DeviceEstimate()).total_bytes
        return PlacementStep(tuple(group), label, device, False, d, _minus(after[d], before.get(d)), left, limit)
    limit = limits.get(device)
    left = None if limit is None else limit - (before.get(device) or DeviceEstimate()).total_bytes
    return PlacementStep(tuple(group), label, device, True, device, _minus(after[device], before.get(device)), left,
                         limit)  # fmt: skip


def fill(
    costs: Sequence[BlockCost],
    slots: Sequence[Slot],
    limits: Mapping[DeviceId, int | None],
    weight_caps: dict[DeviceId, int] | None = None,
) -> Placement:
    """Place blocks in model order, each on the current device while every device stays within `limits` (and
    its weights within `weight_caps`), else on the next device. Blocks tied to an earlier block go where it went.
    Every trial is kept, as a PlacementStep, in the placement's `steps`."""
    caps = weight_caps or {}
    labels = _labels(costs)
    partners: dict[str, list[str]] = {}
    for cost in costs:
        if cost.tied_to:
            partners.setdefault(cost.tied_to, []).append(cost.name)
    assignment: dict[str, DeviceId] = {}
    estimates: dict[DeviceId, DeviceEstimate] = {}
    unplaced: list[str] = []
    steps: list[PlacementStep] = []
    current = 0
    for cost in costs:
        if cost.name in assignment:
            continue
        group = [cost.name, *partners.get(cost.name, [])]
        label = labels[cost.name] + "".join(f" (with {labels[p]}, tied to it)" for p in group[1:])
        while current < len(slots) and not unplaced:
            trial = dict(assignment)
            trial.update({name: slots[current].id for name in group})
            trial_estimates = estimate(trial, costs, slots)
            step = _step(group, label, slots[current].id, estimates, trial_estimates, limits, caps)
            steps.append(step)
            if step.placed:
                assignment, estimates = trial, trial_estimates
                break
            current += 1
        else:
            unplaced.extend(group)
    return Placement(assignment, estimate(assignment, costs, slots), unplaced, steps=steps)


def _terms(need: DeviceEstimate) -> str:
    """'weights 605.02 MiB, KV cache 80.00 MiB': the non-zero terms of what a step adds."""
    terms = (("weights", need.weights_bytes), ("KV cache", need.kv_cache_bytes),
             ("workspace", need.workspace_bytes), ("reserve", need.reserve_bytes))  # fmt: skip
    return ", ".join(f"{name} {format_bytes(n)}" for name, n in terms if n)


def explain_refusal(step: PlacementStep, slots: Sequence[Slot]) -> str:
    """Why a block did not stay on a device, e.g. 'layer 33 needs 685.02 MiB (weights 605.02 MiB, KV cache 80.00
    MiB); GPU 0 has 184.00 MiB left of 24.00 GiB'. A limit below the device's capacity is called its share (balanced
    placement); a weight cap is called one."""
    names = {s.id: s.name for s in slots}
    capacity = {s.id: s.capacity_bytes for s in slots}
    over = names.get(step.over, str(step.over))
    where = "" if step.over == step.device else f" on {names.get(step.device, step.device)}, which runs on {over},"
    if step.capped:
        return (
            f"{step.label}{where} needs {format_bytes(step.need_bytes)} of weights; {over} keeps at most "
            f"{format_bytes(step.limit_bytes or 0)} of weights so that offloaded blocks can run there, "
            f"{format_bytes(step.left_bytes or 0)} left"
        )
    limit = "unbounded" if step.limit_bytes is None else format_bytes(step.limit_bytes)
    if step.limit_bytes is not None and step.limit_bytes != capacity.get(step.over):
        limit = f"its share of {limit}"
    left = "unbounded" if step.left_bytes is None else format_bytes(step.left_bytes)
    need = f"{format_bytes(step.need_bytes)} ({_terms(step.need)})"
    return f"{step.label}{where} needs {need}; {over} has {left} left of {limit}"


def explain_steps(placement: Placement, slots: Sequence[Slot]) -> list[str]:
    """One line per block that moved on to the next device: why, and where to (the fit log of `oneke-plan -v`)."""
    names = {s.id: s.name for s in slots}
    order = [s.id for s in slots]
    lines = []
    for step in placement.steps:
        if step.placed:
            continue
        index = order.index(step.device) + 1
        then = f"moving to {names[order[index]]}" if index < len(order) else "no device is left"
        lines.append(f"{explain_refusal(step, slots)}; {then}")
    return lines


def _describe(placement: Placement, costs: Sequence[BlockCost], slots: Sequence[Slot]) -> list[str]:
    lines = []
    for slot in slots:
        names = [c.name for c in costs if placement.assignment.get(c.name) == slot.id]
        if not names:
            continue
        est = placement.estimates[slot.id]
        cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
        lines.append(
            f"{slot.name}: {len(names)} blocks ({names[0]} .. {names[-1]}), {format_bytes(est.total_bytes)} of {cap}"
        )
    return lines


def place(costs: Sequence[BlockCost], slots: Sequence[Slot], strategy: str = "fill") -> Placement:
    """Choose a placement. `fill`: GPUs in order, then CPU, then disk. `balanced`: the smallest equal share of every
    GPU's memory that holds the whole model on GPUs, so layers spread in proportion to each card's memory."""
    limits: Mapping[DeviceId, int | None] = {s.id: s.capacity_bytes for s in slots}
    log = []
    gpus = [s for s in slots if s.is_gpu]
    if strategy == "balanced" and len(gpus) > 1:
        gpu_only = list(gpus)
        full = fill(costs, gpu_only, {s.id: s.capacity_bytes for s in gpu_only})
        if full.fits:
            low, high = 0.0, 1.0
            for _ in range(40):
                mid = (low + high) / 2
                trial = fill(costs, gpu_only, {s.id: int((s.capacity_bytes or 0) * mid) for s in gpu_only})
                low, high = (low, mid) if trial.fits else (mid, high)
            share = {s.id: int((s.capacity_bytes or 0) * high) for s in gpu_only}
            placement = fill(costs, gpu_only, share)
            log.append(f"balanced: every GPU filled to at most {high:.1%} of its memory")
            placement.log = log + explain_steps(placement, slots) + _describe(placement, costs, slots)
            return placement
        log.append("balanced: the model does not fit on the GPUs alone, so GPUs are filled in order before offload")
    placement = fill(costs, slots, limits)
    main_id = main_device(placement.assignment, slots)
    main = next((s for s in slots if s.id == main_id), None)
    if not placement.fits and main is not None and any(s.id in OFFLOAD_DEVICES and s.id != main.id for s in slots):
        # Offloaded blocks run on the main device (the first GPU holding blocks, else the CPU), so their KV cache
        # and staging copy need room there: keep one block fewer on it at a time until the offloaded rest fits.
        uncapped = placement
        kept = [c for c in costs if placement.assignment.get(c.name) == main.id]
        cap = sum(c.weights_bytes for c in kept)
        while kept and not placement.fits:
            cap -= kept.pop().weights_bytes
            placement = fill(costs, slots, limits, {main.id: cap})
        if placement.fits:
            on_main = [list(p.assignment.values()).count(main.id) for p in (uncapped, placement)]
            fewer = on_main[0] - on_main[1]
            log.append(
                f"{main.name}: keeps {fewer} block{'s' if fewer > 1 else ''} fewer than filling in order gives it (at "
                f"most {format_bytes(cap)} of weights): offloaded blocks run there, and their KV cache and staging "
                "copy need the room"
            )
        else:
            placement = uncapped  # keeping fewer blocks did not help: report the plain fill
    placement.log = log + explain_steps(placement, slots) + _describe(placement, costs, slots)
    return placement
