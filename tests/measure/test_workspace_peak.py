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

from pathlib import Path

import pytest
import torch
from allocated_peak import CPU_ATTENTION_KERNELS, left_padded_batch, profiler_peak
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
    """The most bytes the CPU allocator held at once during a prefill, beyond what it held when it began."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return profiler_peak(prof, scratch_of=CPU_ATTENTION_KERNELS)


@pytest.mark.parametrize("batch, tokens", [(1, 1024), (1, 3072), (3, 2048)])
def test_planned_memory_covers_the_real_prefill_peak(long_dir: Path, batch: int, tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    from oneke_plan.measure.compat import dtype_kw

    model = AutoModelForCausalLM.from_pretrained(long_dir, **dtype_kw(torch.float32)).eval()
    ids, mask = left_padded_batch(batch, tokens, high=200)  # rows of 1, 2/3 and 1/3 of the longest
    measured = allocated_peak(model, ids, mask)
    planned = planned_bytes(long_dir, batch, tokens)
    assert planned >= measured, (planned, measured)
    if batch == 1:
        # a batch x tokens x tokens mask counted here would be 1 MiB at 1,024 tokens and 9 MiB at 3,072
        assert planned <= measured * 1.02, (planned, measured)
