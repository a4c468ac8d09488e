"""The planned workspace and KV cache against the peak a real prefill allocates, for long prompts (issue 31).

Independent route: torch's profiler, which records every allocation and free of the CPU allocator while
transformers' `generate` runs the real model (kernels included), as bench/memory_accuracy.py measures it, here with
the cache on (the plan counts a layer's keys and values in the KV cache term, not in the workspace). The plan
comes from the model's forward on the meta device. A single prompt is not padded, so transformers builds no
attention mask (SDPA is told `is_causal`): the plan must not count one, or a long prompt's estimate is far above
its peak; a padded batch does get a mask, which the plan must count, and torch's SDPA converts it to the query's
dtype before any kernel runs. float32, so that no CPU's bf16 kernels decide.

One thing a CPU run allocates that no GPU kernel does, and the plan (which prices attention as GPUs run it) does
not count: the scratch torch's CPU flash-attention kernel allocates and frees inside its call (per thread, about
0.6 MB here: aten/src/ATen/native/cpu/FlashAttentionKernel.cpp). Those allocations are left out of the peak.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import build_tiny_llama

from oneke_plan.api.planner import Planner
from oneke_plan.plan.fit import Slot, estimate
from oneke_plan.plan.memory import NO_QUANTIZATION, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # wide enough that a layer's activations, not generate's small tensors, make the peak
    return build_tiny_llama(
        tmp_path_factory.mktemp("long"),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        dtype=torch.float32,
    )


def planned_bytes(directory: Path, batch: int, tokens: int) -> int:
    """Workspace and KV cache the plan counts for a prefill of `batch` x `tokens` and one new token."""
    planner = Planner(resolve_model(str(directory)))
    costs = planner.block_costs(PlanSettings(Workload(tokens, 1, batch), quant=NO_QUANTIZATION), "float32")
    cpu = estimate({c.name: "cpu" for c in costs}, costs, [Slot("cpu", "CPU", None, 0)])["cpu"]
    return cpu.workspace_bytes + cpu.kv_cache_bytes


def allocated_peak(model: object, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The most bytes the CPU allocator held at once beyond what it held when the prefill began."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(trace)
        events = json.loads(Path(trace).read_text())["traceEvents"]
    finally:
        os.unlink(trace)
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), key=lambda e: e["ts"]
    )
    kernels = [
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("ph") == "X" and e.get("name") == "aten::_scaled_dot_product_flash_attention_for_cpu"
    ]

    def inside(ts: float) -> tuple[float, float] | None:
        return next((span for span in kernels if span[0] <= ts <= span[1]), None)

    scratch = set()  # indexes of the events of allocations a CPU attention kernel makes and frees within its call
    for i, event in enumerate(memory):
        span = inside(event["ts"])
        if span is not None and event["args"]["Bytes"] > 0:
            address = event["args"]["Addr"]
            free = next((j for j in range(i + 1, len(memory)) if memory[j]["args"]["Addr"] == address), None)
            if free is not None and memory[free]["ts"] <= span[1]:
                scratch.update((i, free))
    total = peak = 0
    for i, event in enumerate(memory):
        if i not in scratch:
            total += event["args"]["Bytes"]
            peak = max(peak, total)
    return peak


@pytest.mark.parametrize("batch, tokens", [(1, 1024), (1, 3072), (3, 2048)])
def test_planned_memory_covers_the_real_prefill_peak(long_dir: Path, batch: int, tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    from oneke_plan.measure.compat import dtype_kw

    model = AutoModelForCausalLM.from_pretrained(long_dir, **dtype_kw(torch.float32)).eval()
    # left-padded as oneke-run pads a batch: the rows are 1, 2/3 and 1/3 of the longest
    lengths = [tokens * (batch - row) // batch for row in range(batch)]
    ids = torch.zeros((batch, tokens), dtype=torch.long)
    mask = torch.zeros((batch, tokens), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, tokens - length :] = torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(row))
        mask[row, tokens - length :] = 1
    measured = allocated_peak(model, ids, mask)
    planned = planned_bytes(long_dir, batch, tokens)
    assert planned >= measured, (planned, measured)
    if batch == 1:
        # a batch x tokens x tokens mask counted here would be 1 MiB at 1,024 tokens and 9 MiB at 3,072
        assert planned <= measured * 1.02, (planned, measured)
