"""What oneke-plan says about a plan, in words: the --verbose log lines of pricing and placing, the adapter's notes
(which the profile keeps), the does-not-fit message with what would fit, and why --solve stopped where it did.

The numbers come from the planner's steps as data; only the sentences are made here, so that a message can be
reworded without touching how anything is computed (tests and the generated docs pin them byte for byte).
"""

from __future__ import annotations

from collections.abc import Sequence

from oneke_plan.core.sizes import flag_size_at_least, format_bytes
from oneke_plan.measure.adapter import Adapter
from oneke_plan.plan.fit import AdapterBytes, BlockCost, Slot, explain_refusal
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import Workload, merges_on_load
from oneke_plan.plan.plans import Plan, offload_slowdown_text, peaks_text
from oneke_plan.plan.solve import Alternative


def adapter_notes(adapter: Adapter, measured: AdapterBytes, quant_mode: str) -> list[str]:
    """What the plan does with the adapter and what it counts (the profile's notes keep these lines)."""
    resident, scratch = measured.resident_bytes, measured.merge_scratch_bytes
    head = (
        f"adapter: LoRA r={adapter.r}, {len(adapter.modules)} layers, {format_bytes(adapter.file_tensor_bytes)} "
        f"of tensors in {adapter.directory.name}/adapter_model.safetensors, {format_bytes(sum(resident.values()))} "
        "as peft loads them (its default autocast keeps 16-bit LoRA weights in float32)"
    )
    if merges_on_load(quant_mode):
        return [
            f"{head}; merged into the weights on load (peft merge_and_unload), so the weights are the base "
            "model's size and inference runs as without it; the adapter's tensors and the largest merge "
            f"transient ({format_bytes(max(scratch.values(), default=0))}) are counted as load-time memory on "
            "the devices of the layers they wrap"
        ]
    return [
        f"{head}; kept unmerged ({quant_mode}: merging into quantized weights would requantize them, "
        "losing precision): its tensors are counted with the weights of the layers they wrap, and the LoRA "
        "forward's intermediates are measured with the model's forward on the meta device"
    ]


def card_memory_lines(inventory: Inventory) -> list[str]:
    """For each GPU named by a catalog card (--gpu 'H100', an inventory's name), which of the catalog's figures its
    memory is: torch's total capacity, nvidia-smi's total or the nominal size. None for a size the user gave."""
    return [f"GPU {g.index} ({g.name}): {g.memory_source}" for g in inventory.gpus if g.memory_source]


def pricing_lines(costs: Sequence[BlockCost], slots: Sequence[Slot], workload: Workload) -> list[str]:
    """A decoder layer's price, and what each device may use: the log lines before placement's own."""
    lines = []
    layer = next((c for c in costs if c.kind == "layer"), None)
    if layer is not None:
        lines.append(
            f"per decoder layer: weights {format_bytes(layer.weights_bytes)}, KV cache "
            f"{format_bytes(layer.kv_cache_bytes)} ({workload.batch_size} x "
            f"{workload.sequence_tokens} tokens), "
            f"prefill activations {format_bytes(layer.activation_bytes)}"
        )
    for slot in slots:
        cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
        lines.append(f"{slot.name}: {cap} usable, of which reserve {format_bytes(slot.reserve_bytes)}")
    return lines


def alternative_line(found: Alternative, workload: Workload, inventory: Inventory) -> str:
    """One line of "what would fit", e.g. '--quantize 4bit: fits (GPU 0 11.65 GiB of 12.00 GiB)'; an offload's
    slowdown is the speed prediction's on `inventory`'s devices."""
    if found.change == "quantize":
        assert found.plan is not None
        return f"--quantize {found.value}: fits ({peaks_text(found.plan)})"
    if found.change == "max_input_tokens":
        return f"--max-input-tokens {found.value} (with batch {workload.batch_size}): fits"
    if found.change == "batch_size":
        return f"--batch-size {found.value}: fits"
    assert found.plan is not None
    slowdown = offload_slowdown_text(found.plan, inventory)
    if found.change == "cpu_offload":
        return (
            f"CPU offload: --cpu-memory {flag_size_at_least(int(found.value))} "
            f"(weights cross PCIe at every step: {slowdown})"
        )
    return f"disk offload: --offload-dir DIR ({slowdown})"


def does_not_fit_message(plan: Plan, alternatives: Sequence[Alternative], inventory: Inventory) -> str:
    """Which blocks were left over and by how much, why the first of them did not fit, what each device holds,
    and what would fit instead."""
    placement = plan.placement
    left = [c for c in plan.costs if c.name in placement.unplaced]
    left_bytes = sum(c.weights_bytes + max(c.kv_cache_bytes, c.prefill_state_bytes) for c in left)
    lines = [
        f"does not fit: {len(left)} blocks ({left[0].name} .. {left[-1].name}) are left over, "
        f"{format_bytes(left_bytes)} of weights and KV cache, after every device was filled:"
    ]
    refusal = placement.first_refusal()
    if refusal is not None:
        lines.append(f"  first block that did not fit: {explain_refusal(refusal, plan.slots)}")
    for slot in plan.slots:
        est = placement.estimates.get(slot.id)
        used = est.total_bytes if est else 0
        cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
        lines.append(f"  {slot.name}: {format_bytes(used)} of {cap} planned")
    options = [alternative_line(found, plan.settings.workload, inventory) for found in alternatives]
    lines.append("what would fit:" if options else "nothing tried fits; add GPUs or memory")
    lines += [f"  {line}" for line in options]
    return "\n".join(lines)


def why_not_more(what: str, value: int, more: Plan | None) -> str:
    """Why --solve stopped at `value`: what the plan for one more (`more`) could not place, or, with no such plan,
    the bound it hit."""
    flag = f"--{what.replace('_', '-')}"
    if more is None:
        return f"solve: {flag} {value}, the most this model's positions (or the search) allow"
    refusal = more.placement.first_refusal()
    why = explain_refusal(refusal, more.slots) if refusal is not None else "it does not fit"
    return f"solve: {flag} {value} fits; at {value + 1}, {why}"


def long_document_line(workload: Workload) -> str:
    """What the plan's max_input_tokens means for long texts: the window oneke-run --split-long cuts them into."""
    limit = workload.max_input_tokens
    return (
        f"long documents: a prompt of up to {limit:,} tokens (template, instruction, schema and text together) runs "
        f"whole; with oneke-run --split-long a longer text is cut into windows that each fit in {limit:,} "
        "(README: Long documents)"
    )
