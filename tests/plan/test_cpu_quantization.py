"""8/4-bit on the CPU: bitsandbytes quantizes there (a CPU-only plan), and the plan prices the CPU no lower than
without quantization, says so, and leaves every other device's terms as they are.

Held against real loads of SmolLM2-135M-Instruct through oneke-run's own loader (load_model with the planner's
profile): the tensors the quantized model holds are the plan's weights, and the CPU's weights plus workspace are at
least what the unquantized model holds plus the unquantized plan's workspace. The process's resident memory is
measured in bench/bnb_cpu_memory.py (docs/memory-model.md): it is above the quantized tensors by more than the
allocator lets anyone count, which is why the CPU is priced as unquantized.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_bnb_on_cpu, storage_bytes_by_owner

from oneke_plan.api.planner import Planner
from oneke_plan.load.loader import load_model
from oneke_plan.plan.fit import Slot, cpu_quantization_bytes, estimate
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import GiB, Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

pytestmark = pytest.mark.usefixtures("single_torch_thread")

WORKLOAD = Workload(max_input_tokens=450, max_new_tokens=8, batch_size=12)


def cpu_plan(planner: Planner, mode: str) -> Any:
    return planner.plan(Inventory((), 16 * GiB), PlanSettings(WORKLOAD, Quantization(mode), dtype="float32"))


def loaded_tensor_bytes(planner: Planner, plan: Any, model_dir: Path) -> int:
    """Bytes of every storage the model holds once oneke-run's loader has loaded it for `plan` (tied ones once,
    with bitsandbytes' quantization state)."""
    model = load_model(planner.profile(plan, Inventory((), 16 * GiB)), resolve_model(str(model_dir)))
    try:
        return sum(storage_bytes_by_owner(model, [""]).values())
    finally:
        del model
        gc.collect()


@needs_bnb_on_cpu
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_a_cpu_quantized_plan_prices_the_cpu_no_lower_than_the_unquantized_model_it_loads(
    smollm2_dir: Path, mode: str
) -> None:
    planner = Planner(resolve_model(str(smollm2_dir)))
    plain, quantized = cpu_plan(planner, "none"), cpu_plan(planner, mode)
    got = quantized.placement.estimates["cpu"]
    unquantized = plain.placement.estimates["cpu"]
    held_quantized = loaded_tensor_bytes(planner, quantized, smollm2_dir)
    held_plain = loaded_tensor_bytes(planner, plain, smollm2_dir)
    assert held_quantized < held_plain  # bitsandbytes did quantize on the CPU
    assert got.weights_bytes == held_quantized  # the weights term is what the model holds ...
    assert unquantized.weights_bytes == held_plain
    # ... and the CPU as a whole is priced no lower than the unquantized model: weights plus workspace cover the
    # unquantized load's tensors and the unquantized plan's workspace (the quantization scratch comes on top)
    assert got.weights_bytes + got.workspace_bytes >= held_plain + unquantized.workspace_bytes
    assert got.total_bytes >= unquantized.total_bytes
    assert got.workspace_bytes - unquantized.workspace_bytes == held_plain - held_quantized + max(
        c.quant_scratch_bytes for c in quantized.costs
    )
    assert any(f"--quantize {mode} on the CPU saves no memory" in line for line in quantized.log)
    assert not any("on the CPU saves no memory" in line for line in plain.log)


def test_only_blocks_bitsandbytes_quantizes_on_the_cpu_are_priced_up(smollm2_dir: Path) -> None:
    """GPU terms stay as they were: a block quantized on a GPU, or offloaded to the CPU beside GPUs (stored
    unquantized there already), adds nothing; only a CPU-only map adds the difference to the CPU's workspace."""
    planner = Planner(resolve_model(str(smollm2_dir)))
    costs = cpu_plan(planner, "8bit").costs
    names = [c.name for c in costs]
    gpu = Slot(0, "GPU 0", 8 * GiB, GiB)
    cpu = Slot("cpu", "CPU", 16 * GiB, 2 * GiB)
    on_gpu = estimate(dict.fromkeys(names, 0), costs, [gpu, cpu])[0]
    assert on_gpu.weights_bytes == sum(c.weights_bytes for c in costs)
    assert on_gpu.workspace_bytes == max(c.activation_bytes for c in costs) + sum(
        c.logits_bytes for c in costs
    ) + max(c.quant_scratch_bytes for c in costs)
    split = {name: 0 if i < 3 else "cpu" for i, name in enumerate(names)}
    mixed = estimate(split, costs, [gpu, cpu])
    assert mixed["cpu"].weights_bytes == sum(c.unquantized_weights_bytes for c in costs[3:])
    assert mixed["cpu"].workspace_bytes == 0  # offloaded blocks run on GPU 0
    alone = estimate(dict.fromkeys(names, "cpu"), costs, [cpu])["cpu"]
    extra = sum(cpu_quantization_bytes(c) for c in costs)
    assert extra == sum(c.unquantized_weights_bytes - c.weights_bytes for c in costs) > 0
    assert alone.weights_bytes + alone.workspace_bytes == on_gpu.weights_bytes + on_gpu.workspace_bytes + extra
