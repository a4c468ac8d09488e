"""Load speed: oneke-run's loader vs transformers' from_pretrained vs reading the safetensors bytes (the limit).

One random LLaMA checkpoint (0.55B parameters, bf16, 1.1 GB; bench/common.py CHECKPOINTS), a CPU profile planned by
oneke-plan for it, and three ways to get its weights into memory, each timed in this process (page cache warm:
one untimed run of each first; median of --repeats):
  ours          oneke_plan.load.loader.load_model(profile, source)   (the checkpoint's names and shapes against the
                model built on meta, then from_pretrained with the profile's device_map)
  transformers  AutoModelForCausalLM.from_pretrained(dir, device_map=<the profile's device_map>, dtype=bfloat16)
  limit         safetensors.torch.load_file(<each weights file>)  (the same bytes into CPU tensors, no model)
After each load every weight is read once (a sum over each tensor), so a lazily memory-mapped tensor is paid for
too; that read is timed separately and also included in "load + read".

Run: python bench/load_speed.py [--repeats N] [--checkpoint 0.94B]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

from common import CHECKPOINTS, bench_checkpoint, machine_line, parameter_count, quiet_libraries, table


def touch(tensors) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for t in tensors:
            if t.device.type != "meta":
                t.float().sum() if t.dim() == 0 else t.view(-1)[:: max(1, 4096 // t.element_size())].float().sum()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", default="0.55B", choices=sorted(CHECKPOINTS))
    args = parser.parse_args()
    quiet_libraries()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from oneke_plan.api.planner import Planner
    from oneke_plan.load.loader import load_model
    from oneke_plan.plan.inventory import Inventory
    from oneke_plan.plan.memory import GiB, Quantization, Workload
    from oneke_plan.plan.model_source import resolve_model
    from oneke_plan.plan.plans import PlanSettings

    print(f"machine: {machine_line()}\n")
    path = bench_checkpoint(args.checkpoint)
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    source = resolve_model(str(path))
    planner = Planner(source)
    inventory = Inventory((), 16 * GiB)
    profile = planner.profile(
        planner.plan(inventory, PlanSettings(Workload(512, 64, 1), Quantization("none"), dtype="bfloat16")), inventory
    )
    print(f"checkpoint: {args.checkpoint} ({parameter_count(path) / 1e9:.2f}B parameters, {size / 1e9:.2f} GB in "
          f"{len(files)} file(s)); profile device_map: {profile.device_map}\n")

    def ours():
        model = load_model(profile, source)
        return [*model.parameters(), *model.buffers()]

    def transformers_load():
        model = AutoModelForCausalLM.from_pretrained(str(path), device_map=dict(profile.device_map),
                                                     dtype=torch.bfloat16)
        return [*model.parameters(), *model.buffers()]

    def limit():
        return [t for f in files for t in load_file(str(f)).values()]

    ways = {"ours (oneke_plan.load.loader.load_model)": ours, "transformers from_pretrained": transformers_load,
            "limit (safetensors load_file)": limit}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    for fn in ways.values():  # warm the page cache and lazy imports
        touch(fn())
        gc.collect()
    for _ in range(args.repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            tensors = fn()
            loaded = time.perf_counter() - start
            read = touch(tensors)
            results[name].append((loaded, read))
            del tensors
            gc.collect()
    limit_total = statistics.median(a + b for a, b in results["limit (safetensors load_file)"])
    rows = []
    for name, runs in results.items():
        load_s = statistics.median(a for a, _ in runs)
        read_s = statistics.median(b for _, b in runs)
        total = statistics.median(a + b for a, b in runs)
        rows.append([name, f"{load_s:.3f}", f"{read_s:.3f}", f"{total:.3f}", f"{size / total / 1e9:.2f}",
                     f"{total / limit_total:.2f}x"])
    print(table(["load", "load s", "read s", "load + read s", "GB/s", "vs limit"], rows))
    med = {k: statistics.median(a + b for a, b in v) for k, v in results.items()}
    keys = list(ways)
    print()
    print(f"ratio: ours / transformers = {med[keys[0]] / med[keys[1]]:.2f}x")
    print(f"ratio: ours / limit = {med[keys[0]] / med[keys[2]]:.2f}x")
    print(f"ratio: transformers / limit = {med[keys[1]] / med[keys[2]]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
