"""Real memory peaks on the CPU, for the checks of the memory model and the benchmarks: a command's peak
resident memory (`measured`: tests/hostile.py, bench/bnb_cpu_memory.py), and torch's profiler, which records every
allocation and free of the CPU allocator, kernels included, while a real model runs (`profiler_peak`:
tests/measure/test_workspace_peak.py, bench/memory_accuracy.py), with the left-padded batches oneke-run makes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Measured:
    """How one command ended: its exit code (negative: killed by that signal), its stderr, and its peak resident
    memory in bytes."""

    code: int
    stderr: str
    peak_bytes: int


_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
"""


def measured(
    command: list[str | Path], env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> Measured:
    """Run `command` and read its peak resident memory, as the only child of a small fresh Python: Linux counts a
    child's memory from before its exec too, which for a child forked from this test process (gigabytes, late in a
    suite) would be this process's own. A command still running after `timeout` seconds is killed with its wrapper,
    and the test fails rather than hangs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, *map(str, command)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
    )  # fmt: skip
    killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    try:
        out, err = proc.communicate()
    finally:
        killer.cancel()
    assert proc.returncode == 0 and out.strip(), f"{command[0]} ran past {timeout} s, or its wrapper failed: {err!r}"
    code, kib = map(int, out.split())
    return Measured(code, err.decode("utf-8", "replace"), kib * 1024)  # KiB on Linux
