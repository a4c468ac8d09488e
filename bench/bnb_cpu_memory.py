"""bitsandbytes on the CPU: what a process holds after loading a real model with 8/4-bit, and over a prefill.

Each measurement runs in a fresh process (tools/allocated_peak.measured, as the tests measure: the peak RSS of a
child forked from a big process would count the parent's pages). The child plans for this CPU with the planner,
writes a profile, loads with oneke_plan.load.loader.load_model (what oneke-run does), and reports:
- rss_load: VmRSS right after load_model returns;
- tensors: bytes of the distinct storages the model holds (bench/common.py model_tensors/storage_bytes);
- rss_prefill / peak: VmRSS after, and VmHWM (the process's peak RSS) over one forward of a batch of prompts;
- plan: the planner's CPU estimate for that workload (weights, workspace, total less reserve).
`imports` measures the process that only imports torch/transformers/bitsandbytes and oneke_plan's loader: the
floor every other row stands on.

Run: python bench/bnb_cpu_memory.py MODEL_DIR [--batch 12 --tokens 450] [--trim]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def rss_parts() -> dict[str, int]:
    """Anonymous and file-backed resident bytes (a mapped safetensors file counts as file-backed)."""
    return {k: status_kib(k) * 1024 for k in ("RssAnon", "RssFile")}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    import torch
    from common import model_tensors, quiet_libraries, storage_bytes

    quiet_libraries()
    from oneke_plan.api.planner import Planner
    from oneke_plan.load.loader import load_model
    from oneke_plan.plan.inventory import Inventory
    from oneke_plan.plan.memory import GiB, Quantization, Workload
    from oneke_plan.plan.model_source import resolve_model
    from oneke_plan.plan.plans import PlanSettings

    out: dict[str, object] = {"rss_imports": status_kib("VmRSS") * 1024}
    if args.mode == "imports":
        out["peak"] = status_kib("VmHWM") * 1024
        print("RESULT " + json.dumps(out), file=sys.stderr)
        return
    source = resolve_model(args.model)
    planner = Planner(source)
    settings = PlanSettings(Workload(args.tokens, 1, args.batch), Quantization(args.mode), dtype=args.dtype)
    inventory = Inventory((), 16 * GiB)
    plan = planner.plan(inventory, settings)
    out["plan"] = plan.placement.estimates["cpu"].to_data()
    profile = planner.profile(plan, inventory)
    del planner, plan
    import gc

    gc.collect()
    out["rss_planned"] = status_kib("VmRSS") * 1024
    out["peak_planned"] = status_kib("VmHWM") * 1024
    model = load_model(profile, source)
    out["rss_load"] = status_kib("VmRSS") * 1024
    out["peak_load"] = status_kib("VmHWM") * 1024
    out["tensors"] = storage_bytes(model_tensors(model))
    out["parts_load"] = rss_parts()
    if args.trim:
        from oneke_plan.load.loader import release_freed_heap

        release_freed_heap()
        out["rss_trimmed"] = status_kib("VmRSS") * 1024
        out["parts_trimmed"] = rss_parts()
    if args.batch:
        ids = torch.randint(3, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
        if args.profile:
            from allocated_peak import profiler_peak
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            out["allocated_peak"] = profiler_peak(prof)
        else:
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        out["rss_prefill"] = status_kib("VmRSS") * 1024
        out["peak"] = status_kib("VmHWM") * 1024
        out["tensors_after"] = storage_bytes(model_tensors(model))
        out["parts_prefill"] = rss_parts()
    out["linear"] = type(model.model.layers[0].mlp.up_proj).__name__
    print("RESULT " + json.dumps(out), file=sys.stderr)


def run_one(model: str, mode: str, dtype: str, batch: int, tokens: int, trim: bool, env: dict[str, str],
            extra: tuple[str, ...] = ()) -> dict:
    from allocated_peak import measured

    cmd = [sys.executable, __file__, model, "--child", "--mode", mode, "--dtype", dtype, "--batch", str(batch),
           "--tokens", str(tokens), *extra] + (["--trim"] if trim else [])
    done = measured(cmd, env=env)
    lines = [x for x in done.stderr.splitlines() if x.startswith("RESULT ")]
    if done.code or not lines:
        raise SystemExit(f"{mode} {dtype}: exit {done.code}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["maxrss"] = done.peak_bytes
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--mode", default="none")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=450)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after loading (glibc)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's allocated peak over the prefill")
    parser.add_argument("--modes", default="none,8bit,4bit")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    from common import machine_line  # puts tools/ on the path too

    print(machine_line())
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    base = run_one(args.model, "imports", "float32", 0, 0, False, env)
    mib = 1024 * 1024
    print(f"imports only: peak {base['maxrss'] / mib:,.0f} MiB")
    print("mode  dtype     trim  rss_load  tensors  rss_prefill  peak(VmHWM)  maxrss  plan_weights  plan_workspace  "
          "plan_total-reserve  peak-imports  linear")
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            extra = ("--profile",) if args.profile else ()
            r = run_one(args.model, mode, dtype, args.batch, args.tokens, args.trim, env, extra)
            plan = r.get("plan", {})
            planned = plan.get("total_bytes", 0) - plan.get("reserve_bytes", 0)
            print(f"{mode:5} {dtype:9} {str(args.trim):5} {r['rss_load'] / mib:8,.0f} {r['tensors'] / mib:8,.0f} "
                  f"{r.get('rss_prefill', 0) / mib:12,.0f} {r.get('peak', 0) / mib:12,.0f} {r['maxrss'] / mib:7,.0f} "
                  f"{plan.get('weights_bytes', 0) / mib:13,.0f} {plan.get('workspace_bytes', 0) / mib:15,.0f} "
                  f"{planned / mib:19,.0f} {(r['maxrss'] - base['maxrss']) / mib:13,.0f}  {r['linear']}"
                  + (f"  trimmed {r['rss_trimmed'] / mib:,.0f}" if "rss_trimmed" in r else "")
                  + (f"  allocated peak {r['allocated_peak'] / mib:,.0f}" if "allocated_peak" in r else ""), flush=True)
            print("  " + json.dumps(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
