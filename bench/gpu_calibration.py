"""GPU calibration probe: oneke-plan's estimate for one card against what the card holds (not yet run on a GPU).

On GPU 0 it plans a random bf16 LLaMA (--shape, built by tools/tiny_checkpoint.py) or --model for the card with
oneke-plan's planner (api.plan, solving for the batch size: B*), loads it as oneke-run does (api.load), and runs
oneke-run's decoder on prompts of max_input_tokens random ids, every answer max_new_tokens long, to measure
- the largest batch that fits: from B*, doubling while batches run, then bisecting (to 2%) once one runs out of
  memory as oneke-run's runner tells it;
- per run, each term of the planner's estimate for that batch against the bytes the card held for it: the loaded
  weights, the most KV cache the decoder held, torch's peak allocation beyond those (workspace), and the
  allocator's reserved-but-unallocated peak plus the CUDA context (reserve; the context is the driver's bytes in
  use minus torch's reserved, so another process on GPU 0 would count here). They add up to the peak, max reserved
  + context; reserve_needed_bytes is the reserve under which the estimate would equal it.
--card SIZE emulates a smaller card; --cpu-smoke runs the same code on the CPU with a tiny model (CI), what only a GPU
has null with its reason under "unavailable". OUT/gpu-calibration.json is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import ROOT, machine_line, quiet_libraries

sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the GPU machine has no pip access)

FORMAT = "oneke-plan-gpu-calibration/2"
DATA_NAME = "gpu-calibration.json"
UNBOUNDED = "1024TiB"  # a device larger than any workload here: its plan prices a batch whether it fits or not
NO_GPU = "no CUDA device (--cpu-smoke): torch's allocator, the driver's view and out of memory exist on a GPU only"
GPU_FIELDS = ("allocated_before", "max_allocated", "max_reserved", "driver_used", "context_bytes", "out_of_memory")
# build_tiny_llama's arguments: Mistral-7B's and TinyLlama-1.1B's sizes (GQA), and a tiny GQA model for --cpu-smoke
SHAPES: dict[str, dict[str, int]] = {
    "7b-gqa": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192),
    "tiny-gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
}


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, slack: float = 0.02) -> tuple[int, int | None]:
    """The largest batch in 1..limit that fits, assuming a batch fits when any larger one does: from the planner's
    `start`, doubling while batches fit, then bisecting until the gap is at most `slack` of what fits (or 1).
    Returns (largest that fit, 0 if none; smallest that did not, None if every one tried up to `limit` fit)."""
    fit, failed = 0, limit + 1
    batch = min(max(start, 1), limit)
    while failed - fit > max(1, int(fit * slack)):
        if fits(batch):
            fit = batch
        else:
            failed = batch
        batch = min(2 * fit, limit) if failed > limit else (fit + failed) // 2
    return fit, (failed if failed <= limit else None)


def against_estimate(estimate: dict[str, int], weights: int, measured: dict[str, Any]) -> dict[str, Any]:
    """Each estimate term beside the bytes the run held for it (None where only a GPU can tell), the peak
    (max reserved + context) against the estimate's total, and the reserve that would make them equal."""
    kv = measured["kv_cache_bytes"]
    held: dict[str, int | None] = {"weights_bytes": weights, "kv_cache_bytes": kv,
                                   "workspace_bytes": None, "reserve_bytes": None}
    peak = needed = None
    if measured["max_reserved"] is not None:
        held["workspace_bytes"] = measured["max_allocated"] - weights - kv
        held["reserve_bytes"] = measured["max_reserved"] - measured["max_allocated"] + measured["context_bytes"]
        peak = measured["max_reserved"] + measured["context_bytes"]
        needed = peak - (estimate["used_bytes"] - estimate["reserve_bytes"])
    terms = {term: {"estimate": estimate[term], "measured": held[term]} for term in held}
    return {"terms": terms, "estimate_bytes": estimate["used_bytes"], "peak_bytes": peak,
            "reserve_needed_bytes": needed}


class Card:
    """GPU 0 as torch's caching allocator and the driver see it; on the CPU every reading is None, never a guess."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.total, self.info = cuda, None, None
        if cuda:
            props = torch.cuda.get_device_properties(0)
            self.total = int(torch.cuda.mem_get_info(0)[1])
            self.info = {"name": props.name, "total_bytes": self.total, "cuda": torch.version.cuda,
                         "compute_capability": f"{props.major}.{props.minor}",
                         "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "(unset)")}

    def context(self) -> int | None:
        """This process's bytes on GPU 0 outside torch's allocator (CUDA context, kernels, cuBLAS handles)."""
        import torch

        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info(0)
        return int(total - free) - int(torch.cuda.memory_reserved(0))

    def cap(self, card_bytes: int) -> None:
        """Let the allocator reserve at most the card's bytes minus the context, as on a card of that size."""
        import torch

        if self.cuda and self.total:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (card_bytes - (self.context() or 0)) / self.total), 0)

    def measure(self, work: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """work()'s result (None if it ran out of memory, as oneke-run's runner tells it) and the GPU's readings."""
        import gc

        import torch

        from oneke_plan.extract.runner import is_out_of_memory

        if not self.cuda:
            return work(), dict.fromkeys(GPU_FIELDS)
        result, oom = None, False
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)
        before = int(torch.cuda.memory_allocated(0))
        try:
            result = work()
            torch.cuda.synchronize(0)
        except Exception as exc:  # noqa: BLE001 - out of memory is a result here; anything else goes on up
            if not is_out_of_memory(exc):
                raise
            oom = True
        free, total = torch.cuda.mem_get_info(0)
        return result, {"allocated_before": before, "max_allocated": int(torch.cuda.max_memory_allocated(0)),
                        "max_reserved": int(torch.cuda.max_memory_reserved(0)), "driver_used": int(total - free),
                        "context_bytes": self.context(), "out_of_memory": oom}


def plan_row(model: Path, machine: dict[str, Any], args: argparse.Namespace, batch: int, report: Any,
             solve: bool = False) -> Any:
    """oneke-plan's plan (api.plan) of `batch` prompts on `machine`, and its first device's row of the JSON summary
    (docs/profile-format.md: the four terms and used_bytes)."""
    from oneke_plan import api

    result = api.plan(str(model), **machine, max_input_tokens=args.max_input_tokens, quantize=args.quantize,
                      max_new_tokens=args.max_new_tokens, batch_size=batch, reserve=args.reserve, report=report,
                      solve="batch_size" if solve else None)
    summary = api.plan_document(result)["summary"]
    return result, {**summary["devices"][0], "batch_size": summary["workload"]["batch_size"]}


def decode(model: Any, tokenizer: Any, args: argparse.Namespace, batch: int) -> tuple[int, int]:
    """oneke-run's decoder over `batch` random prompts of max_input_tokens ids, every answer max_new_tokens long:
    (new tokens, the most KV cache bytes it held)."""
    import torch

    from oneke_plan.extract.generation import GreedyGenerator

    generator = GreedyGenerator(model, tokenizer, args.max_new_tokens, prefix_reuse=False)
    generator.eos = []  # random weights: no answer may end early, so every run holds the cache the plan counts
    seed = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, len(tokenizer), (batch, args.max_input_tokens), generator=seed)
    answers = generator.generate(prompts.tolist())
    return sum(len(answer) for answer in answers), generator.stats.peak_cache_bytes


def probe(args: argparse.Namespace, model_dir: Path, card: Card, data: dict[str, Any], save: Callable[[], None]
          ) -> None:
    """Plan for the card, load, find the largest batch that fits, each run recorded against its estimate."""
    from oneke_plan import api

    class Findings(api.Report):
        loaded: dict[Any, int] = {}

        def note(self, text: str) -> None:
            data["notes"] += [text] if text not in data["notes"] else []

        def weights_loaded(self, profile: Any, loaded_bytes: dict[Any, int]) -> None:
            self.loaded = loaded_bytes

    report, card_bytes = Findings(), args.card or card.total
    on_card = {"gpus": [f"{card_bytes}B"], "cpu_memory": 0} if card.cuda else {"cpu_memory": card_bytes}
    unbounded = {"gpus": [UNBOUNDED], "cpu_memory": 0} if card.cuda else {"cpu_memory": UNBOUNDED}
    result, row = plan_row(model_dir, on_card, args, 1, report, solve=True)
    planned = row.pop("batch_size")
    data["plan"] = {"card_bytes": card_bytes, "batch_size": planned, "device": row}
    # force: a context larger than the reserve is a finding here, not a reason to stop (its note is kept)
    model, tokenizer = api.load(result.profile, str(model_dir), force=True, report=report)
    weights = sum(report.loaded.values())
    data["load"] = {"planned_weights_bytes": row["weights_bytes"], "loaded_weights_bytes": weights,
                    "context_bytes": card.context()}
    card.cap(card_bytes)

    def fits(batch: int) -> bool:
        start = time.perf_counter()
        done, gpu = card.measure(lambda: decode(model, tokenizer, args, batch))
        measured = {**gpu, "new_tokens": done and done[0], "kv_cache_bytes": done and done[1],
                    "seconds": round(time.perf_counter() - start, 3)}
        estimate = plan_row(model_dir, unbounded, args, batch, report)[1]
        record = {"batch": batch, "measured": measured, **(
            against_estimate(estimate, weights, measured) if done else {"estimate_bytes": estimate["used_bytes"]})}
        data["runs"].append(record)
        save()
        print(f"batch {batch}: {'out of memory' if done is None else 'ran'} in {measured['seconds']} s, peak "
              f"{record.get('peak_bytes')} B, estimate {record.get('estimate_bytes')} B", file=sys.stderr)
        return done is not None

    fit, failed = largest_fitting(fits, planned, args.max_batch)
    needs = [r["reserve_needed_bytes"] for r in data["runs"] if r.get("reserve_needed_bytes") is not None]
    data["largest_batch"] = {"planned": planned, "measured": fit, "first_refused": failed,
                             "searched_up_to": args.max_batch}
    data["reserve_needed_bytes"] = max(needs) if needs else None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="an existing folder for gpu-calibration.json")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny shape on the CPU; GPU-only figures null")
    p.add_argument("--shape", choices=SHAPES, help="random checkpoint to build (default 1b; --cpu-smoke tiny-gqa)")
    p.add_argument("--model", type=Path, help="a checkpoint folder instead of --shape")
    p.add_argument("--quantize", default="none", choices=("none", "8bit", "4bit"))
    p.add_argument("--max-input-tokens", type=int, help="prompt tokens (default 480; --cpu-smoke 60)")
    p.add_argument("--max-new-tokens", type=int, help="answer tokens (default 32; --cpu-smoke 4)")
    p.add_argument("--card", help="emulate a card of this size, e.g. 24GiB (--cpu-smoke: host bytes, default 3MiB)")
    p.add_argument("--reserve", help="oneke-plan's --reserve (--cpu-smoke default: cpu=1MiB)")
    p.add_argument("--max-batch", type=int, help="no batch above this is run (default 4096; --cpu-smoke 16)")
    p.add_argument("--workdir", type=Path, help="where the checkpoint is built (default: the temp folder)")
    args = p.parse_args(argv)
    for name, gpu, cpu in (("max_input_tokens", 480, 60), ("max_new_tokens", 32, 4), ("max_batch", 4096, 16),
                           ("shape", "1b", "tiny-gqa"), ("reserve", None, "cpu=1MiB"), ("card", None, "3MiB")):
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.cpu_smoke else gpu)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine: plan, load and decode there
    quiet_libraries()
    import torch
    from tiny_checkpoint import build_tiny_llama

    from oneke_plan.core.errors import OnekePlanError
    from oneke_plan.core.sizes import SizeError, parse_size
    from oneke_plan.io.files import write_atomic

    target = args.out / DATA_NAME
    try:
        if not args.cpu_smoke and not torch.cuda.is_available():
            raise OnekePlanError("no CUDA device here: run on a GPU, or pass --cpu-smoke")
        if not args.out.is_dir():
            raise OnekePlanError(f"--out {args.out}: not an existing folder; create it first")
        if target.exists() and (target.is_symlink() or FORMAT not in target.read_text(errors="replace")[:200]):
            raise OnekePlanError(f"{target}: exists and was not written by this script; choose another --out")
        args.card = parse_size(args.card) if args.card else None
        if args.cpu_smoke:
            torch.set_num_threads(1)  # tiny matrices lose to threads on a busy CPU
        card = Card(not args.cpu_smoke)
        data = header(args, card, sys.argv[1:] if argv is None else argv)
        written = [os.lstat(target) if target.exists() else None]

        def save() -> None:
            write_atomic(target, [(json.dumps(data, indent=1) + "\n").encode()], expected=written[0])
            written[0] = os.lstat(target)

        save()
        with tempfile.TemporaryDirectory(prefix="gpu-calibration-", dir=args.workdir) as work:
            model_dir = args.model or build_tiny_llama(Path(work) / args.shape, **SHAPES[args.shape])
            probe(args, model_dir, card, data, save)
        data["status"] = "complete"
        save()
    except (OnekePlanError, SizeError) as exc:  # bad input, a plan or load refused, an unwritable file: one line
        print(f"gpu_calibration: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {target}: largest batch {data['largest_batch']}", file=sys.stderr)
    return 0


def header(args: argparse.Namespace, card: Card, argv: list[str]) -> dict[str, Any]:
    """The data file before any run: what runs where, and what this device cannot measure."""
    return {
        "format": FORMAT, "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "status": "running",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/gpu_calibration.py", *argv]), "machine": machine_line(),
        "gpu": card.info, "unavailable": {} if card.cuda else dict.fromkeys(GPU_FIELDS, NO_GPU),
        "model": {"path": str(args.model), "quantize": args.quantize} if args.model else
                 {"shape": args.shape, "dims": SHAPES[args.shape], "quantize": args.quantize},
        "workload": {"max_input_tokens": args.max_input_tokens, "max_new_tokens": args.max_new_tokens},
        "notes": [], "runs": [],
    }


if __name__ == "__main__":
    sys.exit(main())
