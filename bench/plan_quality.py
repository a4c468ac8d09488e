"""Plan quality: accelerate's own placement vs oneke-plan's, and our largest context vs the true optimum.

Grid: OneKE + 5 public configs (bench/common.py) x 6 GPU inventories x bf16/8-bit/4-bit x 3 workloads.
For each cell:
  (a) accelerate's placement, priced with our memory model (oneke_plan.plan.fit.estimate over our block costs):
      - sequential: accelerate.infer_auto_device_map(max_memory=card sizes) (= transformers device_map="sequential");
      - balanced: accelerate.utils.get_balanced_memory, then infer_auto_device_map (= transformers "auto").
      16-bit cells call accelerate directly. Quantized cells go through transformers' own copy of these functions
      (transformers.integrations.accelerate._get_device_map) with a real bitsandbytes HfQuantizer on a meta model
      whose Linears were replaced by bnb layers: that is what from_pretrained(device_map=..., quantization_config=...)
      does, so accelerate sees 1-byte (8-bit) or half-byte (4-bit) weights and 90% of each card.
      A placement that spills to "disk" is reported as offload; one whose GPU estimate (weights + KV + workspace +
      reserve) exceeds a card is OOM.
  (b) our plan (strategy fill, GPUs only, 1 GiB reserve per card): fits, and peak per device.
  (c) Planner.largest(max_input_tokens) vs an independent exact solver: a search over every contiguous split of
      the blocks over the GPUs in order (empty GPUs allowed; tied blocks follow their partner), each device priced
      with fit.estimate, bisected on the context length.

Run: python bench/plan_quality.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import replace

from common import PUBLIC_CONFIGS, GiB, machine_line, quiet_libraries, table

INVENTORIES: dict[str, tuple[int, ...]] = {
    "24": (24,),
    "24+24": (24, 24),
    "24+12": (24, 12),
    "24+12+8": (24, 12, 8),
    "16+8": (16, 8),
    "80+24": (80, 24),
}
QUANTS = ("none", "8bit", "4bit")
WORKLOADS = {  # name: (max_input_tokens, max_new_tokens, batch_size)
    "512+512 b1": (512, 512, 1),
    "2048+512 b4": (2048, 512, 4),
    "1024+512 b16": (1024, 512, 16),
}
RESERVE = 1 * GiB


def assignment_from_device_map(layout, device_map: dict) -> dict[str, object]:
    """accelerate's device_map (module name -> device) as our block assignment (block name -> device)."""
    from oneke_plan.plan.fit import device_owner

    assignment = {}
    for block in layout.blocks:
        devices = {device_owner(t.name, device_map) for t in block.tensors} or {device_owner(block.name, device_map)}
        if len(devices) > 1:  # never seen: accelerate keeps a no-split block whole
            raise RuntimeError(f"{block.name} split over {devices}")
        assignment[block.name] = devices.pop()
    return assignment


def gpu_slots(sizes: tuple[int, ...]):
    from oneke_plan.plan.fit import Slot

    return [Slot(i, f"GPU {i}", s * GiB, RESERVE) for i, s in enumerate(sizes)]


def price(assignment, costs, sizes):
    """(status, worst used/capacity over GPUs) of a placement under our memory model."""
    from oneke_plan.plan.fit import Slot, estimate

    slots = gpu_slots(sizes)
    offloaded = any(d in ("cpu", "disk") for d in assignment.values())
    if offloaded:
        slots = [*slots, Slot("disk", "disk", None, 0)]
    est = estimate(assignment, costs, slots)
    worst = max((est[s.id].total_bytes / s.capacity_bytes for s in slots if s.is_gpu and s.id in est), default=0.0)
    if offloaded:
        return ("offload+OOM" if worst > 1 else "offload"), worst
    return ("OOM" if worst > 1 else "fits"), worst


def exact_fits(costs, slots) -> bool:
    """Is there ANY contiguous split of the blocks over `slots` (in order, some possibly empty) that fits?

    Independent of fit.fill/place: a depth-first search over the end of each device's run. A run is priced with
    fit.estimate alone on its device. The only pruning: adding a block to a device never lowers its estimate
    (sums and maxima of non-negative terms), so once a run does not fit, longer runs from the same start are skipped.
    Memoised on (start, device), which removes repeated sub-searches but no split.
    """
    from oneke_plan.plan.fit import estimate

    seq = [c for c in costs if not c.tied_to]
    partners: dict[str, list] = {}
    for c in costs:
        if c.tied_to:
            partners.setdefault(c.tied_to, []).append(c)
    n, k = len(seq), len(slots)

    @functools.cache
    def run_fits(a: int, b: int, i: int) -> bool:
        if a == b:
            return True
        members = [m for c in seq[a:b] for m in (c, *partners.get(c.name, []))]
        est = estimate({m.name: slots[i].id for m in members}, members, [slots[i]])
        return all(e.total_bytes <= slots[i].capacity_bytes for e in est.values())

    @functools.cache
    def search(start: int, i: int) -> bool:
        if i == k - 1:
            return run_fits(start, n, i)
        for end in range(start, n + 1):
            if not run_fits(start, end, i):
                break
            if search(end, i + 1):
                return True
        return False

    return search(0, 0)


def exact_largest_context(planner, dtype, quant, workload, sizes) -> int:
    """The largest max_input_tokens some contiguous split places, blocks priced as the planner prices them."""
    from oneke_plan.plan.plans import PlanSettings
    from oneke_plan.plan.solve import bisect_largest

    slots = gpu_slots(sizes)
    high = (planner.layout.max_position_embeddings or 1 << 20) - workload.max_new_tokens

    def fits(ctx: int) -> bool:
        settings = PlanSettings(replace(workload, max_input_tokens=ctx), quant=quant)
        return exact_fits(planner.block_costs(settings, dtype), slots)

    return bisect_largest(fits, high)


def accelerate_maps(planner, quant_mode: str, dtype: str, sizes: tuple[int, ...]) -> dict[str, dict]:
    """{'sequential': device_map, 'balanced': device_map} as accelerate / transformers would build them."""
    import torch

    torch_dtype = getattr(torch, dtype)
    max_memory = {i: s * GiB for i, s in enumerate(sizes)}
    no_split = list(planner.layout.no_split_module_classes)
    if quant_mode == "none":
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        model = planner.model
        kw = dict(no_split_module_classes=no_split, dtype=torch_dtype)
        seq = infer_auto_device_map(model, max_memory=dict(max_memory), **kw)
        balanced_memory = get_balanced_memory(model, max_memory=dict(max_memory), **kw)
        bal = infer_auto_device_map(model, max_memory=balanced_memory, **kw)
        return {"sequential": dict(seq), "balanced": dict(bal)}
    # transformers.integrations.accelerate._get_device_map, step by step, without its final validate_environment
    # (which raises when bitsandbytes modules land on disk: we report that as offload instead).
    from transformers.integrations.accelerate import get_balanced_memory as tf_balanced
    from transformers.integrations.accelerate import get_max_memory as tf_max_memory
    from transformers.integrations.accelerate import infer_auto_device_map as tf_infer

    model, quantizer = quantized_meta_model(planner.config, quant_mode, dtype)
    no_split = list(model._no_split_modules)
    budgets = {
        "sequential": tf_max_memory(dict(max_memory)),
        "balanced": tf_balanced(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                hf_quantizer=quantizer, low_zero=False),
    }
    return {
        k: dict(tf_infer(model, max_memory=quantizer.adjust_max_memory(v), no_split_module_classes=no_split,
                         hf_quantizer=quantizer))
        for k, v in budgets.items()
    }


_QUANTIZED: dict[tuple[int, str, str], tuple] = {}


def quantized_meta_model(config, quant_mode: str, dtype: str):
    """A meta model with bitsandbytes Linears, and its HfQuantizer (kept for the last model only)."""
    key = (id(config), quant_mode, dtype)
    if key not in _QUANTIZED:
        _QUANTIZED.clear()
        _QUANTIZED[key] = _build_quantized(config, quant_mode, dtype)
    return _QUANTIZED[key]


def _build_quantized(config, quant_mode: str, dtype: str):
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    from oneke_plan.measure.layout import build_meta_model

    torch_dtype = getattr(torch, dtype)
    if quant_mode == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype)
    quantizer = AutoHfQuantizer.from_config(bnb)
    model = build_meta_model(config, dtype)
    quantizer.preprocess_model(model, dtype=torch_dtype, device_map="auto")
    return model, quantizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="OneKE and Llama-2-70B only")
    args = parser.parse_args()
    quiet_libraries()
    from oneke_plan.api.planner import Planner
    from oneke_plan.plan.inventory import Gpu, Inventory
    from oneke_plan.plan.memory import Quantization, Workload
    from oneke_plan.plan.model_source import ModelSource, resolve_model
    from oneke_plan.plan.plans import PlanSettings

    print(f"machine: {machine_line()}\n")
    sources = {"oneke": resolve_model("oneke")}
    for name, cfg in PUBLIC_CONFIGS.items():
        sources[name] = ModelSource(name, "builtin", None, cfg)
    if args.quick:
        sources = {k: v for k, v in sources.items() if k in ("oneke", "llama-2-70b")}

    rows = []
    records = []
    t0 = time.perf_counter()
    for model_name, source in sources.items():
        planner = Planner(source)
        for inv_name, sizes in INVENTORIES.items():
            gpus = tuple(Gpu(i, f"GPU {i}", s * GiB, s * GiB, None) for i, s in enumerate(sizes))
            inventory = Inventory(gpus, cpu_bytes=0)
            for quant_mode in QUANTS:
                quant = Quantization(quant_mode)
                maps = None
                for wl_name, (n_in, n_new, batch) in WORKLOADS.items():
                    workload = Workload(n_in, n_new, batch)
                    settings = PlanSettings(workload=workload, quant=quant, reserve_bytes=RESERVE)
                    plan = planner.plan(inventory, settings)
                    if maps is None:
                        maps = accelerate_maps(planner, quant_mode, plan.dtype, sizes)
                        assignments = {k: assignment_from_device_map(planner.layout, v) for k, v in maps.items()}
                    acc = {k: price(a, plan.costs, sizes) for k, a in assignments.items()}
                    peaks = "/".join(
                        f"{plan.placement.estimates[g.index].total_bytes / GiB:.1f}"
                        if g.index in plan.placement.estimates
                        else "0"
                        for g in gpus
                    )
                    ours = planner.largest(inventory, settings, "max_input_tokens")
                    best = exact_largest_context(planner, plan.dtype, quant, workload, sizes)
                    ratio = 1.0 if best == 0 and ours == 0 else (ours / best if best else float("inf"))
                    rec = {
                        "model": model_name,
                        "gpus": inv_name,
                        "quant": quant_mode,
                        "workload": wl_name,
                        "seq": acc["sequential"][0],
                        "bal": acc["balanced"][0],
                        "ours": "fits" if plan.fits else "no",
                        "ours_ctx": ours,
                        "best_ctx": best,
                        "ratio": ratio,
                    }
                    records.append(rec)
                    rows.append(
                        [
                            model_name,
                            inv_name,
                            quant_mode,
                            wl_name,
                            f"{acc['sequential'][0]} {acc['sequential'][1]:.0%}",
                            f"{acc['balanced'][0]} {acc['balanced'][1]:.0%}",
                            rec["ours"],
                            peaks if plan.fits else "-",
                            ours,
                            best,
                            f"{ratio:.1%}",
                        ]
                    )
        done = time.perf_counter() - t0
        params = planner.layout.parameter_count / 1e9
        print(f"  {model_name}: {params:.2f}B params done ({done:.0f} s)", file=sys.stderr)

    header = ["model", "GPUs GiB", "quant", "workload", "acc sequential (worst GPU)", "acc balanced (worst GPU)",
              "ours", "our peak GiB/GPU", "our max ctx", "optimum ctx", "ours/opt"]
    print(table(header, rows, right=(8, 9, 10)))
    print()
    total = len(records)

    def count(pred) -> int:
        return sum(1 for r in records if pred(r))

    summary = []
    for key, label in (("seq", "accelerate sequential"), ("bal", "accelerate balanced")):
        oom_we_fit = count(lambda r, k=key: "OOM" in r[k] and r["ours"] == "fits")
        off_we_fit = count(lambda r, k=key: r[k] == "offload" and r["ours"] == "fits")
        acc_fits = count(lambda r, k=key: r[k] == "fits")
        acc_fits_we_not = count(lambda r, k=key: r[k] == "fits" and r["ours"] != "fits")
        summary.append([label, acc_fits, oom_we_fit, f"{oom_we_fit / total:.1%}", off_we_fit, acc_fits_we_not])
    print(table(["placement", "fits", "OOM, ours fits", "share of cells", "offloads, ours fits on GPUs",
                 "fits, ours does not"], summary))
    ratios = [r["ratio"] for r in records]
    below = [r for r in records if r["ratio"] < 0.98]
    print()
    print(f"cells: {total}; our plan fits in {count(lambda r: r['ours'] == 'fits')}")
    for key, label in (("seq", "sequential"), ("bal", "balanced")):
        n = count(lambda r, k=key: "OOM" in r[k] and r["ours"] == "fits")
        print(f"ratio: accelerate {label} OOMs where we fit: {n}/{total} = {n / total:.1%}")
    print(f"ratio: our largest context / exact optimum: min {min(ratios):.1%}, "
          f"mean {sum(ratios) / total:.1%}; cells below 98%: {len(below)} (goal: 0)")
    for r in below:
        where = f"{r['model']} {r['gpus']} {r['quant']} {r['workload']}"
        print(f"  below goal: {where}: {r['ours_ctx']} vs {r['best_ctx']}")
    print(f"(took {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
