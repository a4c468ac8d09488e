"""The benchmarks' own routes, run small: no test ran them, and both once broke unseen when fit.block_costs
changed (a TypeError in every cell). Each is checked against another route, not against itself."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import storage_bytes_by_owner
from transformers import AutoModelForCausalLM

from oneke_plan.compat import dtype_kw
from oneke_plan.inventory import Gpu, Inventory
from oneke_plan.memory import Quantization, Workload
from oneke_plan.model_source import resolve_model
from oneke_plan.planner import Planner, PlanSettings
from oneke_plan.sizes import GiB

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(name: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_plan_quality_exhaustive_optimum_equals_the_planners_largest_context() -> None:
    """OneKE on 24 + 12 GiB, batch 4 with 512 new tokens: the benchmark's depth-first search over every contiguous
    split and the planner's fill-then-bisect reach the same largest context (1,856 tokens in docs/benchmarks.md)."""
    plan_quality = bench_module("plan_quality")
    planner = Planner(resolve_model("oneke"))
    workload = Workload(2048, 512, 4)
    settings = PlanSettings(workload=workload, reserve_bytes=plan_quality.RESERVE)
    inventory = Inventory(tuple(Gpu(i, f"GPU {i}", s * GiB, s * GiB, None) for i, s in enumerate((24, 12))), 0)
    ours = planner.largest(inventory, settings, "max_input_tokens")
    optimum = plan_quality.exact_largest_context(planner, "bfloat16", Quantization("none"), workload, (24, 12))
    assert ours == optimum > 0


def test_memory_accuracy_predicts_the_weights_transformers_loads(tiny_model_dir: Path) -> None:
    """memory_accuracy's prediction for the whole model on one device, in bf16, against the bytes of every
    distinct storage (parameters and buffers, persistent or not) of transformers' own load of the checkpoint."""
    memory_accuracy = bench_module("memory_accuracy")
    weights, kv, workspace = memory_accuracy.predicted(tiny_model_dir, "none", Workload(16, 4, 2))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), **dtype_kw(torch.bfloat16))
    assert weights == sum(storage_bytes_by_owner(model, [""]).values())  # parameters and buffers, each storage once
    assert kv > 0 and workspace > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
