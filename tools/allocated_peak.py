"""Real memory peaks on the CPU, for the checks of the memory model (tests/measure/test_workspace_peak.py,
bench/memory_accuracy.py): torch's profiler records every allocation and free of the CPU allocator, kernels
included, while a real model runs; these read its peak back, and make the left-padded batches oneke-run makes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The scratch torch's CPU flash-attention kernel allocates and frees within its call (per thread, qSplit x kvSplit
# float32 values and more: aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): a CPU kernel's own, which GPU
# kernels do not have and the plan, pricing attention as GPUs run it, does not count.
CPU_ATTENTION_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def profiler_peak(prof: Any, scratch_of: Sequence[str] = ()) -> int:
    """The most bytes the CPU allocator held at once beyond what it held when `prof` (a finished
    torch.profiler.profile(profile_memory=True)) began, read from its exported trace, whose [memory] events carry
    each allocation and free. Allocations that an op named in `scratch_of` makes and frees within its own call are
    left out."""
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
    calls = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e.get("name") in scratch_of]
    left_out: set[int] = set()
    for i, event in enumerate(memory):
        call = next((c for c in calls if c[0] <= event["ts"] <= c[1]), None)
        if call is None or event["args"]["Bytes"] <= 0:
            continue
        address = event["args"]["Addr"]
        free = next((j for j in range(i + 1, len(memory)) if memory[j]["args"]["Addr"] == address), None)
        if free is not None and memory[free]["ts"] <= call[1]:
            left_out.update((i, free))
    total = peak = 0
    for i, event in enumerate(memory):
        if i not in left_out:
            total += event["args"]["Bytes"]
            peak = max(peak, total)
    return peak


def left_padded_batch(batch: int, tokens: int, high: int) -> tuple[Any, Any]:
    """(input ids, attention mask) of `batch` prompts left-padded to `tokens`, as oneke-run pads a batch: the rows are
    1, (batch - 1) / batch, ... 1 / batch of the longest; token ids in [3, high), seeded per row."""
    import torch

    ids = torch.zeros((batch, tokens), dtype=torch.long)
    mask = torch.zeros((batch, tokens), dtype=torch.long)
    for row in range(batch):
        length = tokens * (batch - row) // batch
        ids[row, tokens - length :] = torch.randint(3, high, (length,), generator=torch.Generator().manual_seed(row))
        mask[row, tokens - length :] = 1
    return ids, mask
