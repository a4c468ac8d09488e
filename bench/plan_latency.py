"""Cold-process latency of oneke-plan vs the floor: a process that only imports what planning must import.

Timed (each a fresh process, median of --repeats runs, interleaved so drift hits all alike):
  floor       python -c "import torch, accelerate, transformers.models.llama.modeling_llama"
  oneke       oneke-plan oneke --gpu 24GiB --gpu 12GiB -o FILE
  70B         oneke-plan DIR --gpu 80GiB --gpu 80GiB -o FILE        (DIR holds Llama-2-70B's config.json)
  70B no-fit  oneke-plan DIR --gpu 24GiB --gpu 12GiB                 (exit 3: does not fit, alternatives computed)
Then where the time goes: per phase inside one cold process, and the slowest imports from python -X importtime.
Goal: planning stays within 1.5x of its cold time before memory terms were measured from the model's forward
(1.09x-1.15x the floor then), i.e. <= 1.64x the floor.

Run: python bench/plan_latency.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PUBLIC_CONFIGS, machine_line, table

FLOOR = "import torch, accelerate, transformers.models.llama.modeling_llama"

PHASES = r"""
import sys, time, json
t = {}
s = time.perf_counter()
import torch, accelerate, transformers.models.llama.modeling_llama
t['import torch+accelerate+llama modeling'] = time.perf_counter() - s; s = time.perf_counter()
from oneke_plan.plan.inventory import build_inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.api.planner import Planner
from oneke_plan.plan.plans import PlanSettings
t['import oneke_plan'] = time.perf_counter() - s; s = time.perf_counter()
planner = Planner(resolve_model(sys.argv[1]))
t['read the config (AutoConfig)'] = time.perf_counter() - s; s = time.perf_counter()
model, layout = planner.build('bfloat16')
t['build the meta model, read its blocks'] = time.perf_counter() - s; s = time.perf_counter()
planner.measurer('bfloat16').block_memory(4, 512, 1024)  # fits the laws the plan below uses
t['measure (forwards on the meta device, laws)'] = time.perf_counter() - s; s = time.perf_counter()
inventory = build_inventory(sys.argv[2:], None, None, None)
plan = planner.plan(inventory, PlanSettings(Workload(512, 512, 4), Quantization('none')))
t['plan (pricing + placement)'] = time.perf_counter() - s; s = time.perf_counter()
profile = planner.profile(plan, inventory)
t['device_map + profile'] = time.perf_counter() - s; s = time.perf_counter()
profile.to_yaml()
t['to_yaml'] = time.perf_counter() - s
print(json.dumps(t))
"""


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return elapsed


WATCHED_IMPORTS = ("torch", "transformers", "accelerate", "transformers.models.llama.modeling_llama", "safetensors",
                   "yaml", "oneke_plan", "oneke_plan.api.planner", "oneke_plan.cli.plan")


def import_top(cmd_args: list[str]) -> list[tuple[str, float]]:
    """Cumulative import seconds of the modules that matter, from python -X importtime (nested ones included in
    their parents: torch is imported by transformers, so transformers' figure contains torch's)."""
    code = "import sys; from oneke_plan.cli.plan import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *cmd_args], capture_output=True, text=True)
    totals: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        try:
            cumulative = int(parts[1].strip())
        except ValueError:
            continue
        name = parts[2].strip()
        if name in WATCHED_IMPORTS:
            totals[name] = max(totals.get(name, 0.0), cumulative / 1e6)
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine_line()}\n")
    plan_exe = str(Path(sys.executable).parent / "oneke-plan")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-2-70b"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(PUBLIC_CONFIGS["llama-2-70b"]))
        out = str(Path(tmp) / "p.yaml")
        cases = {
            "floor (import torch, accelerate, llama modeling)": ([sys.executable, "-c", FLOOR], (0,)),
            "oneke-plan oneke --gpu 24GiB --gpu 12GiB": (
                [plan_exe, "oneke", "--gpu", "24GiB", "--gpu", "12GiB", "-o", out], (0,)),
            "oneke-plan <70B dir> --gpu 80GiB --gpu 80GiB": (
                [plan_exe, str(model_dir), "--gpu", "80GiB", "--gpu", "80GiB", "-o", out], (0,)),
            "oneke-plan <70B dir> --gpu 24GiB --gpu 12GiB (exit 3)": (
                [plan_exe, str(model_dir), "--gpu", "24GiB", "--gpu", "12GiB"], (3,)),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for cmd, ok in cases.values():  # warm the page cache once
            timed(cmd, ok)
        for _ in range(args.repeats):
            for k, (cmd, ok) in cases.items():
                times[k].append(timed(cmd, ok))
        floor = statistics.median(times[next(iter(cases))])
        rows = [[k, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}",
                 f"{statistics.median(v) / floor:.2f}x"] for k, v in times.items()]
        print(table(["process", "median s", "min s", "max s", "vs floor"], rows))

        print("\nwhere the time goes in one cold process (seconds):")
        breakdown_rows = []
        for label, argv in (("oneke", ["oneke", "24GiB", "12GiB"]), ("70B", [str(model_dir), "80GiB", "80GiB"])):
            result = subprocess.run([sys.executable, "-c", PHASES, *argv], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            phases = json.loads(result.stdout.strip().splitlines()[-1])
            for phase, secs in phases.items():
                breakdown_rows.append([label, phase, f"{secs:.3f}"])
        print(table(["model", "phase", "s"], breakdown_rows))

        print("\nimports of a cold oneke-plan oneke run (python -X importtime, cumulative s, nested in parents):")
        imports = import_top(["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "-o", out])
        print(table(["module", "s"], [[m, f"{s:.3f}"] for m, s in imports]))

    print()
    for k in list(cases)[1:]:
        # The goal: within 1.5x of the cold time before memory was measured, which was 1.09-1.15x the floor on
        # this machine (docs/benchmarks.md): 1.5 x 1.09 = 1.64x the floor.
        print(f"ratio: {k} / floor = {statistics.median(times[k]) / floor:.2f}x (goal <= 1.64x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
