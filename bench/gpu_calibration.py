"""GPU calibration (issue 16): oneke-plan's estimates against what a real CUDA device holds, card by emulated card.

On the CUDA device it finds (GPU 0), for each shape (OneKE's real config, a 7B GQA shape, a 1B shape), each
quantization (bf16, bitsandbytes 8-bit and 4-bit), each emulated card (24, 16, 12 GiB: the allocator capped with
`torch.cuda.set_per_process_memory_fraction` at the card's size minus this process's CUDA context) and each context
(input + new tokens):

1. plan with oneke-plan (`Planner`) for the emulated card: the largest batch that fits (B*), and B* + 1, the
   smallest batch it refuses;
2. run both workloads with transformers' own batched `generate` on the model loaded by oneke-run's loader
   (`oneke_plan.load.loader.load_model`; random weights built on the device, no hub): B prompts of exactly the planned
   input length (one left-padded by a token, so the attention mask holds padding as the plan assumes), exactly
   the planned new tokens (min_new_tokens, and a zero lm_head row for EOS so that it is never the argmax);
3. record per device the planned weights / KV cache / workspace / reserve against the measured
   `max_memory_allocated`, `max_memory_reserved`, the driver's view (`mem_get_info` before and after) and the CUDA
   context (driver bytes in use minus the allocator's reserved bytes, minus what other processes held before this
   one started, read with NVML where it is installed), the KV cache `generate` returned (bytes of its storages),
   and tokens/s;
4. tightness: B* must run without an out-of-memory error (torch's `num_ooms` counter) and B* + 1 must run out of
   memory or come within 5% of the card;
5. once per shape and quantization, oneke-run itself (`oneke_plan.cli.run.main`, in-process) with the profile
   planned for the largest card that fits, on prompts of exactly the planned length: its peaks and tokens/s,
   beside plain `generate`'s and transformers' `generate_batch`'s (continuous batching, where this transformers
   has it) on the same workload and GPU;
6. a profile split over two emulated cards (default: OneKE bf16 on 24 + 12 GiB): each device's modules in turn on
   the GPU, the rest computing on the CPU (accelerate's `dispatch_model` with main_device="cpu"), each device's
   estimate against its measured peak.

Everything goes to OUT/gpu-calibration.json (rewritten after every record, so a run stopped at any point keeps
what it measured) and OUT/gpu-calibration.md (the summary table). `--time-budget` stops starting new work once
that many seconds have passed; what was not reached is listed as skipped.

`--cpu-smoke` runs the same code paths on the CPU with tiny shapes in well under a minute (CI runs it,
tests/project/test_gpu_calibration.py): every CPU-measurable number (loaded weights, KV cache bytes, tokens) is
recorded; every GPU-only number is null, with the reason under "unavailable". Nothing is estimated in its place.

`--derive-defaults DATA.json` reads a GPU run's data file and prints the per-GPU reserve that would make every
estimate cover its measured peak (per card size as well), the margin that leaves, and the workspace measured
against planned; it changes no file. A data file without GPU measurements is refused (exit 2).

Run on a GPU:  python bench/gpu_calibration.py --out OUT [--time-budget 360] [--shapes oneke,1b,7b-gqa] ...
Run on CPU:    python bench/gpu_calibration.py --cpu-smoke --out OUT
Derive:        python bench/gpu_calibration.py --derive-defaults OUT/gpu-calibration.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    GiB,
    MiB,
    cache_tensors,
    machine_line,
    model_tensors,
    quiet_libraries,
    storage_bytes_by_device,
    table,
)

sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the GPU machine has no pip access)

FORMAT = "oneke-plan-gpu-calibration/1"
DATA_NAME = "gpu-calibration.json"
TABLE_NAME = "gpu-calibration.md"
SPLIT_NEW_TOKENS = 8  # the split computes the other devices' layers on the CPU: its decoding steps are slow there
TIGHT_FRACTION = 0.95  # a refused workload must run out of memory or reach 95% of the card (issue 16: "within 5%")
EXIT_BAD_INPUT = 2

# LLaMA-layout shapes (dims only; tiny_checkpoint.llama_config_dict writes the config). OneKE's are read from
# oneke_plan/data/oneke_config.json. max_position_embeddings leaves room for the largest context of the grid.
SHAPES: dict[str, dict[str, int]] = {
    # Mistral-7B-v0.1's sizes (GQA, 8 KV heads) in the LLaMA layout, without its sliding window.
    "7b-gqa": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192),
    # TinyLlama-1.1B's sizes (GQA, 4 KV heads).
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192),
    # --cpu-smoke: the test suite's tiny LLaMA (tools/tiny_checkpoint.py's defaults), MHA and GQA.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048),
    "tiny-gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
}
ONEKE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "max_position_embeddings")

# Measured fields that only a CUDA device has. On the CPU they are null, and "unavailable" says why.
GPU_FIELDS = ("cap_bytes", "allocated_before", "max_memory_allocated", "max_memory_reserved", "driver_used_before",
              "driver_used_after", "context_bytes", "num_ooms", "out_of_memory", "peak_bytes")
LOAD_GPU_FIELDS = ("load_max_memory_allocated", "load_max_memory_reserved", "load_peak_bytes", "allocated_after_load")
NO_GPU = ("no CUDA device (--cpu-smoke): torch's CUDA caching allocator, the driver's view and out-of-memory errors "
          "exist on a GPU only; nothing is estimated in their place")

FITS = "largest batch that fits"
REFUSED = "smallest batch refused"
CAPPED = "largest batch of the grid (the plan allows more)"
EXTRA = "a batch of --batches"
HEADLINE = "oneke-run, largest batch that fits"
SPLIT = "split: this device's modules on the GPU"
FIT_ROLES = (FITS, CAPPED, EXTRA, HEADLINE, SPLIT)


# -- settings ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Card:
    """An emulated GPU: its label ('24GiB') and its memory in bytes (what the driver would report as total)."""

    label: str
    total_bytes: int


@dataclass(frozen=True)
class SplitSpec:
    """A profile planned over several emulated cards, each device's modules run in turn on the real GPU."""

    shape: str
    quant: str
    cards: tuple[Card, ...]
    context: int  # positions per sequence: input + new tokens
    batch: int


@dataclass(frozen=True)
class Grid:
    shapes: tuple[str, ...]
    quants: tuple[str, ...]
    cards: tuple[Card, ...]
    contexts: tuple[int, ...]  # input + new tokens
    new_tokens: int
    batches: tuple[int, ...]  # fixed batches run besides B* and B* + 1 (where the plan fits them)
    max_batch: int  # the tightness pair is not run above this batch
    reserve_bytes: int  # per-GPU reserve the plans use
    split: SplitSpec | None
    oneke_run: bool
    generate_batch: str | None  # None: run it; else why not
    time_budget_s: float
    seed: int = 0


def parse_cards(text: str) -> tuple[Card, ...]:
    """'24GiB,16GiB' -> Cards; sizes as oneke-plan's --gpu reads them (GiB binary, GB decimal)."""
    from oneke_plan.core.sizes import parse_size

    return tuple(Card(part.strip(), parse_size(part.strip())) for part in text.split(",") if part.strip())


def parse_split(text: str | None, default: str) -> SplitSpec | None:
    """--split SHAPE:QUANT:CARD+CARD:CONTEXT:BATCH, or 'none'."""
    if text == "none":
        return None
    parts = (text or default).split(":")
    if len(parts) != 5:
        raise ValueError(f"--split {text!r}: write SHAPE:QUANT:CARD+CARD:CONTEXT:BATCH, e.g. {default}, or none")
    shape, quant, cards, context, batch = parts
    return SplitSpec(shape, quant, parse_cards(cards.replace("+", ",")), int(context), int(batch))


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def gpu_grid(args: argparse.Namespace) -> Grid:
    """The grid for a GPU run: the issue's shapes, quantizations and cards; flags narrow or widen it."""
    from oneke_plan.core.sizes import parse_size
    from oneke_plan.plan.memory import DEFAULT_GPU_RESERVE_BYTES

    new = args.new_tokens or 32
    split = parse_split(args.split, "oneke:none:24GiB+12GiB:512:1")
    return Grid(
        shapes=tuple((args.shapes or "oneke,1b,7b-gqa").split(",")),
        quants=tuple((args.quant or "none,8bit,4bit").split(",")),
        cards=parse_cards(args.cards or "24GiB,16GiB,12GiB"),
        contexts=parse_ints(args.contexts or "512,4096"),
        new_tokens=new,
        batches=parse_ints(args.batches or ""),
        max_batch=args.max_batch or 1024,
        reserve_bytes=parse_size(args.reserve) if args.reserve else DEFAULT_GPU_RESERVE_BYTES,
        split=split,
        oneke_run=not args.no_oneke_run,
        generate_batch="--no-generate-batch was given" if args.no_generate_batch else None,
        time_budget_s=args.time_budget if args.time_budget is not None else 540.0,
    )


def smoke_grid(args: argparse.Namespace) -> Grid:
    """--cpu-smoke: tiny shapes and card sizes of a few MiB (with a 1 MiB reserve), so that the planner's largest
    batch lands between 1 and the grid's largest and every code path (tightness pair, oneke-run, split) runs."""
    from oneke_plan.core.sizes import parse_size

    cards = parse_cards(args.cards or "3MiB,2200KiB")
    shapes = tuple((args.shapes or "tiny-gqa").split(","))
    return Grid(
        shapes=shapes,
        quants=tuple((args.quant or "none,8bit,4bit").split(",")),
        cards=cards,
        contexts=parse_ints(args.contexts or "128"),
        new_tokens=args.new_tokens or 4,
        batches=parse_ints(args.batches or "1"),
        max_batch=args.max_batch or 16,
        reserve_bytes=parse_size(args.reserve or "1MiB"),
        split=parse_split(args.split, f"{shapes[0]}:none:1800KiB+3MiB:128:2"),
        oneke_run=not args.no_oneke_run,
        generate_batch=(
            "--no-generate-batch was given" if args.no_generate_batch else
            None if args.generate_batch else
            "not run by --cpu-smoke (its continuous-batching loop took 11-28 s on a 2-core CPU even for 2 prompts "
            "of 8 tokens); pass --generate-batch to run it"
        ),
        time_budget_s=args.time_budget if args.time_budget is not None else 600.0,
    )


# -- the record ----------------------------------------------------------------------------------------------------
class Recorder:
    """The data file and the summary table, rewritten (atomically, oneke_plan.io.files.write_atomic) after every record:
    a run stopped at any point keeps everything it measured. Replaces only what it found at the start (main checked
    that this script wrote it: foreign_file) or wrote itself; a file another program put there meanwhile is kept."""

    def __init__(self, out_dir: Path, header: dict[str, Any]):
        self.data_path = out_dir / DATA_NAME
        self.table_path = out_dir / TABLE_NAME
        self._stats = {path: _lstat(path) for path in (self.data_path, self.table_path)}  # what each write replaces
        self.data: dict[str, Any] = {"format": FORMAT, **header, "status": "running", "loads": [], "runs": [],
                                     "throughput": [], "split": [], "skipped": [], "errors": []}
        self.flush()

    def add(self, section: str, record: dict[str, Any]) -> dict[str, Any]:
        self.data[section].append(record)
        self.flush()
        return record

    def skip(self, what: str, why: str) -> None:
        print(f"  skipped {what}: {why}", file=sys.stderr)
        self.add("skipped", {"what": what, "why": why})

    def error(self, what: str, exc: BaseException) -> None:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        print(f"  ERROR in {what}: {type(exc).__name__}: {first}", file=sys.stderr)
        self.add("errors", {"what": what, "error": f"{type(exc).__name__}: {first}"[:2000]})

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.data["finished"] = _now()
        self.flush()

    def flush(self) -> None:
        from oneke_plan.io.files import write_atomic

        for path, text in ((self.data_path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n"),
                           (self.table_path, summary(self.data))):
            write_atomic(path, [text.encode("utf-8")], expected=self._stats[path])
            self._stats[path] = os.lstat(path)


def foreign_file(out_dir: Path) -> Path | None:
    """A file in `out_dir` with one of the names this script writes that this script did not write, if any."""
    for path in (out_dir / DATA_NAME, out_dir / TABLE_NAME):
        if path.exists() and not _written_here(path):
            return path
    return None


def _written_here(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        head = path.read_bytes()[:400]
    except OSError:
        return False
    return FORMAT.encode() in head or head.startswith(b"# GPU calibration")


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _bad_input(message: str) -> int:
    print(f"gpu_calibration: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


class Budget:
    """Wall-clock seconds since the start, against --time-budget (no new work once it is spent)."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def spent(self) -> bool:
        return time.perf_counter() - self.start > self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# -- the device ----------------------------------------------------------------------------------------------------
class Probe:
    """GPU 0's memory as torch's caching allocator and the driver see it, and the card cap. On the CPU every GPU
    figure is None: the probe never invents one."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        self.device: Any = torch.device("cuda", 0) if cuda else torch.device("cpu")
        self.nvml_at_start: int | None = None
        self.context_method = NO_GPU
        self.info: dict[str, Any] | None = None
        if not cuda:
            return
        self.nvml_at_start = _nvml_used_bytes()  # before this process makes its CUDA context
        self.total_bytes = int(torch.cuda.mem_get_info(0)[1])
        self._warm_up()
        self.context_method = (
            "NVML bytes in use now, minus before this process's CUDA context, minus torch's reserved bytes"
            if self.nvml_at_start is not None else
            "nvidia-ml-py not installed: mem_get_info's bytes in use minus torch's reserved bytes (assumes no other "
            "process uses GPU 0)"
        )
        props = torch.cuda.get_device_properties(0)
        self.compute_capability = (props.major, props.minor)
        self.info = {
            "name": props.name,
            "total_bytes": self.total_bytes,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "driver": _nvml_driver(),
            "nvml_used_bytes_before_context": self.nvml_at_start,
            "context_bytes_at_start": self.context_bytes(),
            "context_method": self.context_method,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "(unset: torch's default)",
        }

    def _warm_up(self) -> None:
        """Load what every run loads lazily (cuBLAS and its handle, SDPA kernels) so the context measured at start is
        close to the one runs see; what loads later still shows in each run's context_bytes."""
        import torch

        a = torch.randn(256, 256, device=self.device, dtype=torch.bfloat16)
        (a @ a).sum().item()
        q = torch.randn(1, 4, 64, 64, device=self.device, dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
        del a, q
        torch.cuda.synchronize()

    def driver_used_bytes(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(0)
        return int(total - free)

    def context_bytes(self) -> int | None:
        """What this process holds on GPU 0 outside torch's caching allocator (CUDA context, loaded kernels, cuBLAS
        handles): NVML's bytes in use minus those before this process's context (one API for both readings), else
        the driver's bytes in use (mem_get_info), minus torch's reserved bytes."""
        import torch

        if not self.cuda:
            return None
        now = _nvml_used_bytes() if self.nvml_at_start is not None else None
        used = now - self.nvml_at_start if now is not None and self.nvml_at_start is not None else None
        return (used if used is not None else self.driver_used_bytes()) - int(torch.cuda.memory_reserved(0))

    def set_card(self, card: Card | None) -> int | None:
        """Cap the allocator so that reserved bytes plus this process's context stay within the card: the cap (bytes
        the allocator may reserve), or None on the CPU. None uncaps."""
        import torch

        if not self.cuda:
            return None
        release_memory()
        if card is None:
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
            return None
        cap = card.total_bytes - int(self.context_bytes() or 0)
        torch.cuda.set_per_process_memory_fraction(max(cap, 0) / self.total_bytes, 0)
        return cap

    def begin(self) -> dict[str, Any]:
        import torch

        if not self.cuda:
            return {}
        release_memory()
        torch.cuda.reset_peak_memory_stats(0)
        return {
            "allocated_before": int(torch.cuda.memory_allocated(0)),
            "driver_used_before": self.driver_used_bytes(),
            "num_ooms": int(torch.cuda.memory_stats(0).get("num_ooms", 0)),
        }

    def end(self, before: dict[str, Any], cap: int | None, caught_oom: bool) -> dict[str, Any]:
        """The GPU fields of a run (all None on the CPU). peak_bytes = max reserved + context: the run's footprint
        as the driver would see it on a card of its own."""
        import torch

        if not self.cuda:
            return dict.fromkeys(GPU_FIELDS)
        torch.cuda.synchronize(0)
        ooms = int(torch.cuda.memory_stats(0).get("num_ooms", 0)) - before["num_ooms"]
        reserved = int(torch.cuda.max_memory_reserved(0))
        context = self.context_bytes()
        return {
            "cap_bytes": cap,
            "allocated_before": before["allocated_before"],
            "max_memory_allocated": int(torch.cuda.max_memory_allocated(0)),
            "max_memory_reserved": reserved,
            "driver_used_before": before["driver_used_before"],
            "driver_used_after": self.driver_used_bytes(),
            "context_bytes": context,
            "num_ooms": ooms,
            "out_of_memory": caught_oom or ooms > 0,
            "peak_bytes": reserved + int(context or 0),
        }

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(0)


def _nvml_used_bytes() -> int | None:
    """Bytes in use on GPU 0 as NVML reports them (needs no CUDA context); None without nvidia-ml-py."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # noqa: BLE001 - NVML present but unusable (a container without it): same as absent
        return None


def _nvml_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - only a label
        return None


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


# -- checkpoints ---------------------------------------------------------------------------------------------------
def shape_dims(shape: str) -> dict[str, int]:
    """The LLaMA dims of a shape: OneKE's from oneke-plan's built-in config (model_source), the others from SHAPES."""
    if shape == "oneke":
        from oneke_plan.plan.model_source import resolve_model

        config = resolve_model("oneke").config
        return {key: int(config[key]) for key in ONEKE_KEYS}
    if shape not in SHAPES:
        raise SystemExit(_bad_input(f"--shapes: unknown shape {shape!r}; known: oneke, {', '.join(SHAPES)}"))
    return dict(SHAPES[shape])


def build_checkpoint(shape: str, out: Path, device: Any, seed: int) -> Path:
    """A random bf16 LLaMA checkpoint of `shape` in `out`: tiny_checkpoint's config, tokenizer and checkpoint
    writer, weights drawn on `device` (a GPU draws 13B parameters in a second; there is no hub to fetch them).

    The lm_head row of EOS is zero, so EOS's logit is exactly 0 while the largest of the others is positive:
    greedy decoding never stops early, and every run generates exactly the tokens it was planned for.
    """
    import torch
    from tiny_checkpoint import (
        EOS_TOKEN,
        SPECIAL_TOKENS,
        build_tokenizer,
        llama_config_dict,
        llama_weight_shapes,
        write_checkpoint,
        write_config_files,
    )

    dims = shape_dims(shape)
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config_dict(**dims, tie_word_embeddings=False, dtype=torch.bfloat16)
    write_config_files(config, out)
    build_tokenizer(out, model_max_length=dims["max_position_embeddings"])
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, size in llama_weight_shapes(config):
        if name.endswith("norm.weight"):
            tensor = torch.ones(size, dtype=torch.bfloat16)
        else:
            drawn = torch.randn(size, generator=generator, device=device, dtype=torch.float32).mul_(0.02)
            if name == "lm_head.weight":
                drawn[SPECIAL_TOKENS.index(EOS_TOKEN)] = 0
            tensor = drawn.to(torch.bfloat16).cpu()
            del drawn
        state[name] = tensor
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_checkpoint(state, out, shards=max(1, min(len(state), math.ceil(total / (4 * 10**9)))))
    return out


# -- planning ------------------------------------------------------------------------------------------------------
def card_inventory(probe: Probe, *cards: Card) -> Any:
    """Emulated cards as GPUs 0, 1, ... (the real GPU's compute capability), no CPU memory."""
    from oneke_plan.plan.inventory import Gpu, Inventory

    cc = getattr(probe, "compute_capability", None)
    return Inventory(tuple(Gpu(i, f"{c.label} (emulated)", c.total_bytes, c.total_bytes, cc)
                           for i, c in enumerate(cards)), 0)


def unbounded_inventory(probe: Probe) -> Any:
    """One GPU larger than any workload here: its plan's GPU 0 estimate is what a workload needs, fits or not."""
    return card_inventory(probe, Card("unbounded", 1 << 50))


def cpu_inventory() -> Any:
    """The CPU alone, without a bound: plans whose profile loads the whole model into host memory."""
    from oneke_plan.plan.inventory import Inventory

    return Inventory((), 1 << 50)


def target_inventory(probe: Probe) -> Any:
    """The device the runs execute on: the real GPU 0 (its total), or the CPU (--cpu-smoke)."""
    return card_inventory(probe, Card("GPU 0", probe.total_bytes)) if probe.cuda else cpu_inventory()


def settings_for(grid: Grid, quant: str, context: int, batch: int) -> Any:
    from oneke_plan.plan.memory import Quantization, Workload
    from oneke_plan.plan.plans import PlanSettings

    workload = Workload(context - grid.new_tokens, grid.new_tokens, batch)
    return PlanSettings(workload, Quantization(quant), dtype="bfloat16", reserve_bytes=grid.reserve_bytes,
                        cpu_reserve_bytes=0)


def estimate_record(estimate: Any) -> dict[str, int]:
    return {key: int(getattr(estimate, key)) for key in
            ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes", "total_bytes")}


def needed(planner: Any, settings: Any, probe: Probe) -> dict[str, int]:
    """GPU 0's estimate for the workload on a card large enough for it: what the plan says the run needs."""
    plan = planner.plan(unbounded_inventory(probe), settings)
    return estimate_record(plan.placement.estimates[0])


@dataclass
class Cell:
    """One (card, context) of a shape and quantization: the planner's largest batch and the runs it asks for."""

    card: Card
    context: int
    largest_batch: int  # B*: 0 when even batch 1 is refused
    runs: list[tuple[int, str]] = field(default_factory=list)  # (batch, role)
    note: str = ""


def plan_cells(planner: Any, grid: Grid, quant: str, probe: Probe) -> list[Cell]:
    """For each card and context, B* (oneke-plan's bisection, `Planner.largest`) and the runs: B* and B* + 1 (the
    tightness pair), and the grid's fixed batches that fit. A cell whose weights alone exceed the card is not run."""
    cells = []
    limit = planner.layout.max_position_embeddings
    for card in grid.cards:
        for context in grid.contexts:
            if context <= grid.new_tokens or (limit and context > limit):
                cells.append(Cell(card, context, 0, note=f"context {context} is outside 1 + new tokens .. {limit}"))
                continue
            settings = settings_for(grid, quant, context, 1)
            best = planner.largest(card_inventory(probe, card), settings, "batch_size")
            cell = Cell(card, context, best)
            alone = needed(planner, settings, probe)
            if alone["weights_bytes"] + alone["reserve_bytes"] > card.total_bytes:
                cell.note = "the weights alone (with the reserve) exceed the card: nothing to run"
            elif best > grid.max_batch:
                cell.runs.append((grid.max_batch, CAPPED))
                cell.note = f"B* = {best} > --max-batch {grid.max_batch}: no tightness pair"
            else:
                if best >= 1:
                    cell.runs.append((best, FITS))
                cell.runs.append((best + 1, REFUSED))
            cell.runs += [(b, EXTRA) for b in grid.batches if b < min(best, grid.max_batch)]
            cells.append(cell)
    return cells


# -- loading and running -------------------------------------------------------------------------------------------
def load_shared(planner: Any, source: Any, grid: Grid, quant: str, probe: Probe) -> tuple[Any, dict[str, Any]]:
    """The model as oneke-run's loader puts it on the target device (one device, no offload), and its load
    record: planned weights against the bytes of the storages it holds, per device, and the load's GPU peaks."""
    from oneke_plan.load.loader import load_model

    probe.set_card(None)
    settings = settings_for(grid, quant, min(grid.contexts), 1)
    profile = planner.plan_profile(target_inventory(probe), settings).profile
    planned = sum(e.weights_bytes for e in profile.estimate.values())
    before = probe.begin()
    start = time.perf_counter()
    model = load_model(profile, source)
    probe.sync()
    seconds = time.perf_counter() - start
    loaded = storage_bytes_by_device(model_tensors(model))  # before any forward: bnb's 4-bit CPU repack changes it
    allocated = _allocated() if probe.cuda else None
    gpu = probe.end(before, None, False)
    record = {
        "planned_weights_bytes": planned,
        "measured_weights_bytes": {str(k): v for k, v in loaded.items()},
        "measured_weights_total": sum(loaded.values()),
        "load_seconds": round(seconds, 3),
        "load_max_memory_allocated": gpu["max_memory_allocated"],
        "load_max_memory_reserved": gpu["max_memory_reserved"],
        "load_peak_bytes": gpu["peak_bytes"],
        "allocated_after_load": allocated,
        "device_map": {k: str(v) for k, v in profile.device_map.items()},
    }
    return model, record


def _allocated() -> int:
    import torch

    return int(torch.cuda.memory_allocated(0))


def input_device(model: Any) -> Any:
    """Where input ids go: the embeddings' device (accelerate's hooks move them on from there)."""
    return model.get_input_embeddings().weight.device


def batch_inputs(batch: int, length: int, vocab: int, seed: int, pad: int) -> tuple[Any, Any]:
    """`batch` rows of `length` random token ids (special tokens excluded), the last of them left-padded by one
    token when batch > 1, so the attention mask holds padding as the plan assumes (transformers skips building a
    mask it can read as all ones)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[-1, 0] = pad
        mask[-1, 0] = 0
    return ids, mask


def run_generate(model: Any, settings: Any, probe: Probe, cap: int | None, vocab: int, seed: int,
                 cache_layers: set[int] | None = None) -> dict[str, Any]:
    """transformers' batched greedy generate of the workload: tokens, time, the KV cache it returned (the layers
    `cache_layers` indexes, default all), GPU peaks."""
    import torch
    from tiny_checkpoint import EOS_TOKEN, SPECIAL_TOKENS

    work = settings.workload
    ids, mask = batch_inputs(work.batch_size, work.max_input_tokens, vocab, seed, 0)
    ids, mask = ids.to(input_device(model)), mask.to(input_device(model))
    before = probe.begin()
    out, oom = None, False
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=work.max_new_tokens,
                                 min_new_tokens=work.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                                 eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN), return_dict_in_generate=True)
        probe.sync()
    except Exception as exc:  # noqa: BLE001 - out of memory is a result here; anything else goes on up
        if not is_out_of_memory(exc):
            raise
        oom = True
    seconds = time.perf_counter() - start
    measured: dict[str, Any] = {"seconds": round(seconds, 4), "new_tokens": None, "tokens_per_s": None,
                                "kv_cache_bytes": None, "kv_positions": None, "padded_rows": int(work.batch_size > 1)}
    if out is not None:
        new_tokens = work.batch_size * (out.sequences.shape[1] - ids.shape[1])
        tensors = cache_tensors(out.past_key_values, cache_layers)
        measured.update(new_tokens=int(new_tokens), tokens_per_s=round(new_tokens / seconds, 2),
                        kv_cache_bytes=sum(storage_bytes_by_device(tensors).values()),
                        kv_positions=int(tensors[0].shape[-2]) if tensors else None)
    measured.update(probe.end(before, cap, oom))
    del out, ids, mask
    release_memory()
    return measured


def run_generate_batch(model: Any, settings: Any, vocab: int, seed: int, probe: Probe) -> dict[str, Any]:
    """transformers' continuous batching (`generate_batch`) on the same prompts, uncapped (it sizes its paged cache
    from the free memory the driver reports, which the allocator cap does not change); the second of two calls is
    timed, the first warms it up."""
    from tiny_checkpoint import EOS_TOKEN, SPECIAL_TOKENS
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        import transformers

        return {"unavailable": f"transformers {transformers.__version__} has no generate_batch"}
    work = settings.workload
    ids, mask = batch_inputs(work.batch_size, work.max_input_tokens, vocab, seed, 0)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    config = GenerationConfig(max_new_tokens=work.max_new_tokens, min_new_tokens=work.max_new_tokens,
                              do_sample=False, eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN), pad_token_id=0)
    probe.set_card(None)
    try:
        model.generate_batch(prompts, generation_config=config, progress_bar=False)
        start = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False)
        probe.sync()
        seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - "where it runs": a failure is a result, said in one line
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        return {"unavailable": f"generate_batch failed here: {type(exc).__name__}: {first}"[:500]}
    finally:
        release_memory()
    tokens = sum(len(result.generated_tokens) for result in out.values())
    return {"new_tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 2)}


def converted_lines(tokenizer: Any, length: int, count: int) -> tuple[list[str], list[int]]:
    """`count` lines of DeepKE's converted format (its first NER line, the input text replaced) whose chat prompts
    are `length` tokens (BOS included), the last one a token shorter when count > 1 so the runner pads it; the
    lengths reached. Text is cut character by character from tiny_checkpoint's corpus, repeated."""
    from tiny_checkpoint import default_corpus

    from oneke_plan.formats.oneke import chat_prompt

    template = json.loads((ROOT / "examples" / "deepke" / "NER" / "test.json").read_text(encoding="utf-8")
                          .splitlines()[0])
    instruction = json.loads(template["instruction"])
    corpus = "".join(default_corpus())
    filler = corpus * (1 + 4 * length // max(1, len(corpus)))

    def build(chars: int) -> tuple[str, int]:
        text = json.dumps(dict(instruction, input=filler[:chars]), ensure_ascii=False)
        return text, len(tokenizer(chat_prompt(text), add_special_tokens=True)["input_ids"])

    def closest(target: int) -> tuple[str, int]:
        low, high = 0, len(filler)
        while low < high:  # the most characters whose prompt has at most `target` tokens
            mid = (low + high + 1) // 2
            low, high = (mid, high) if build(mid)[1] <= target else (low, mid - 1)
        return build(low)

    full = closest(length)
    short = closest(length - 1) if count > 1 else full
    prompts = [full] * (count - 1) + [short]
    lines = [json.dumps({"id": f"calibration-{i}", "instruction": text}, ensure_ascii=False)
             for i, (text, _) in enumerate(prompts)]
    return lines, [reached for _, reached in prompts]


SUMMARY = re.compile(r"(\d+) prompts answered .*?, (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)")


def run_oneke_run(source: Any, tokenizer: Any, profile: Any, probe: Probe, cap: int | None,
                  folder: Path) -> dict[str, Any]:
    """oneke-run itself, in-process (`oneke_plan.cli.run.main`), on prompts of exactly the profile's workload (sized
    with `tokenizer`, the model's): its exit code, the tokens and tokens/s its summary line reports, and the GPU
    peaks of the whole call (load included)."""
    from oneke_plan.cli.run import main as oneke_run

    work = profile.workload
    lines, lengths = converted_lines(tokenizer, work.max_input_tokens, work.batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "profile.yaml").write_text(profile.to_yaml(), encoding="utf-8")
    argv = ["--profile", str(folder / "profile.yaml"), "--model", str(source.directory), "--input",
            str(folder / "input.json"), "--output", str(folder / "output.jsonl"), "--no-progress", "--overwrite"]
    stderr = io.StringIO()
    before = probe.begin()
    start = time.perf_counter()
    with contextlib.redirect_stderr(stderr):
        code = oneke_run(argv)
    wall = time.perf_counter() - start
    release_memory()
    measured: dict[str, Any] = {"exit_code": code, "prompt_tokens": lengths, "wall_seconds": round(wall, 3),
                                "new_tokens": None, "seconds": None, "tokens_per_s": None}
    found = SUMMARY.search(stderr.getvalue())
    if found:
        measured.update(new_tokens=int(found.group(2)), seconds=float(found.group(3)),
                        tokens_per_s=float(found.group(4)))
    elif code == 0:
        measured["unavailable"] = "oneke-run's summary line was not found in its output: its format changed"
    if code != 0:
        measured["stderr_tail"] = stderr.getvalue()[-1500:]
    measured.update(probe.end(before, cap, False))
    return measured


# -- one shape and quantization ------------------------------------------------------------------------------------
def run_record(shape: str, quant: str, card: Card, context: int, batch: int, role: str, runner: str,
               settings: Any, plan: dict[str, int], fits: bool) -> dict[str, Any]:
    work = settings.workload
    return {
        "id": f"{shape}/{quant}/{card.label}/ctx{context}/b{batch}/{runner}",
        "shape": shape, "quant": quant, "card": card.label, "card_bytes": card.total_bytes, "context": context,
        "workload": {"max_input_tokens": work.max_input_tokens, "max_new_tokens": work.max_new_tokens,
                     "batch_size": work.batch_size},
        "role": role, "runner": runner, "plan_fits_card": fits, "plan": plan,
    }


def checks(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's checks on one run; None where a GPU figure they need is unavailable."""
    measured, plan = record["measured"], record["plan"]
    peak, oom = measured.get("peak_bytes"), measured.get("out_of_memory")
    result: dict[str, Any] = {}
    if record["role"] in FIT_ROLES:
        result["ran_without_oom"] = None if oom is None else not oom
        if peak and not oom:
            result["estimate_covers_peak"] = plan["total_bytes"] >= peak
            result["estimate_over_peak"] = round(plan["total_bytes"] / peak, 4)
    if record["role"] == REFUSED:
        result["ooms_or_within_5pct_of_card"] = (
            None if oom is None else bool(oom or (peak or 0) >= TIGHT_FRACTION * record["card_bytes"])
        )
    return result


def calibrate(planner: Any, source: Any, shape: str, quant: str, grid: Grid, probe: Probe, rec: Recorder,
              budget: Budget, folder: Path, tokenizer: Any) -> None:
    """Every cell of one shape and quantization on one loaded model, then oneke-run and the throughput line."""
    vocab = len(tokenizer)
    from oneke_plan.measure.compat import TRANSFORMERS_BNB_CPU, bnb_quantizes_on_cpu

    what = f"{shape}/{quant}"
    if quant != "none" and importlib.util.find_spec("bitsandbytes") is None:
        rec.skip(what, "bitsandbytes is not installed here (docs/benchmarks.md says how to bring it to a GPU machine)")
        return
    if quant != "none" and not probe.cuda and not bnb_quantizes_on_cpu():
        rec.skip(what, f"transformers < {TRANSFORMERS_BNB_CPU} quantizes with bitsandbytes on the CPU only with "
                       "Intel IPEX")
        return
    cells = plan_cells(planner, grid, quant, probe)
    for cell in cells:
        if not cell.runs:
            rec.skip(f"{what}/{cell.card.label}/ctx{cell.context}", cell.note or "nothing to run")
    if not any(cell.runs for cell in cells):
        return
    if budget.spent():
        rec.skip(what, "time budget spent before its load")
        return
    model, load = load_shared(planner, source, grid, quant, probe)
    rec.add("loads", {"shape": shape, "quant": quant, **load})
    runs: dict[tuple[str, int, int], dict[str, Any]] = {}
    try:
        warm = settings_for(grid, quant, min(grid.contexts), 1)
        run_generate(model, replace(warm, workload=replace(warm.workload, max_input_tokens=4, max_new_tokens=2)),
                     probe, None, vocab, grid.seed)
        for cell in cells:
            cap = probe.set_card(cell.card)
            for batch, role in cell.runs:
                label = f"{what}/{cell.card.label}/ctx{cell.context}/b{batch}"
                if budget.spent():
                    rec.skip(label, "time budget spent")
                    continue
                settings = settings_for(grid, quant, cell.context, batch)
                fits = planner.plan(card_inventory(probe, cell.card), settings).fits
                record = run_record(shape, quant, cell.card, cell.context, batch, role, "generate", settings,
                                    needed(planner, settings, probe), fits)
                record["largest_batch"] = cell.largest_batch
                try:
                    record["measured"] = run_generate(model, settings, probe, cap, vocab, grid.seed)
                except Exception as exc:  # noqa: BLE001 - one broken run must not lose the rest of the grid
                    rec.error(label, exc)
                    continue
                record["checks"] = checks(record)
                runs[(cell.card.label, cell.context, batch)] = rec.add("runs", record)
                _progress(record, budget)
        headline = _headline(cells)
        batch_line: dict[str, Any] = {"unavailable": grid.generate_batch} if grid.generate_batch else {}
        if headline is not None and not batch_line:
            if budget.spent():
                batch_line = {"unavailable": "time budget spent"}
            else:
                batch_line = run_generate_batch(model, settings_for(grid, quant, headline.context, headline.runs[0][0]),
                                                vocab, grid.seed, probe)
    finally:
        del model
        probe.set_card(None)
        release_memory()
    if headline is None:
        return
    batch = headline.runs[0][0]
    settings = settings_for(grid, quant, headline.context, batch)
    line: dict[str, Any] = {"shape": shape, "quant": quant, "card": headline.card.label, "context": headline.context,
                            "batch": batch, "gpu": probe.info["name"] if probe.info else None,
                            "generate": _rate(runs.get((headline.card.label, headline.context, batch))),
                            "generate_batch": batch_line, "oneke_run": None}
    if not grid.oneke_run:
        line["oneke_run"] = {"unavailable": "--no-oneke-run was given"}
    elif budget.spent():
        line["oneke_run"] = {"unavailable": "time budget spent"}
    else:
        inventory = card_inventory(probe, headline.card) if probe.cuda else target_inventory(probe)
        profile = planner.plan_profile(inventory, settings).profile
        record = run_record(shape, quant, headline.card, headline.context, batch, HEADLINE, "oneke-run", settings,
                            needed(planner, settings, probe), True)
        try:
            record["measured"] = run_oneke_run(source, tokenizer, profile, probe, probe.set_card(headline.card),
                                               folder / f"oneke-run-{shape}-{quant}")
            record["checks"] = checks(record)
            rec.add("runs", record)
            _progress(record, budget)
            line["oneke_run"] = _rate(record)
            failed = record["measured"]["exit_code"] != 0 or record["measured"].get("unavailable")
            if failed:  # oneke-run refused or broke: a bug to see, not a figure
                tail = (record["measured"].get("stderr_tail") or "").strip().splitlines()
                raise RuntimeError(record["measured"].get("unavailable") or f"exit {record['measured']['exit_code']}: "
                                   + (tail[-1] if tail else ""))
        except Exception as exc:  # noqa: BLE001 - keep the rest of the grid
            rec.error(f"{what} oneke-run", exc)
        finally:
            probe.set_card(None)
    line["ratios"] = _ratios(line)
    rec.add("throughput", line)


def _headline(cells: list[Cell]) -> Cell | None:
    """The workload oneke-run runs: the largest card's first context with a batch that fits."""
    fitting = [c for c in cells if c.runs and c.runs[0][1] in (FITS, CAPPED)]
    return max(fitting, key=lambda c: (c.card.total_bytes, -c.context), default=None)


def _rate(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    m = record["measured"]
    return {"new_tokens": m.get("new_tokens"), "seconds": m.get("seconds"), "tokens_per_s": m.get("tokens_per_s")}


def _ratios(line: dict[str, Any]) -> dict[str, float | None]:
    def rate(key: str) -> float | None:
        value = line.get(key) or {}
        return value.get("tokens_per_s")

    ours, plain, batch = rate("oneke_run"), rate("generate"), rate("generate_batch")
    return {
        "oneke_run_over_generate": round(ours / plain, 3) if ours and plain else None,
        "oneke_run_over_generate_batch": round(ours / batch, 3) if ours and batch else None,
    }


def _progress(record: dict[str, Any], budget: Budget) -> None:
    m = record["measured"]
    peak = f"peak {_gib(m['peak_bytes'])}" if m.get("peak_bytes") else "peak n/a (CPU)"
    plan = _gib(record["plan"]["total_bytes"])
    print(f"  [{budget.elapsed():5.0f} s] {record['id']} ({record['role']}): plan {plan}, {peak}, "
          f"oom {m.get('out_of_memory')}, {m.get('tokens_per_s')} tokens/s", file=sys.stderr)


# -- the split -----------------------------------------------------------------------------------------------------
def split_check(planner: Any, source: Any, spec: SplitSpec, grid: Grid, probe: Probe, rec: Recorder,
                vocab: int) -> None:
    """A profile planned over several emulated cards; each device's modules in turn on the target device, the
    rest on the CPU computing there (accelerate's dispatch_model with main_device="cpu"): each device's estimate
    against its measured weights and peak."""
    import torch
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    from oneke_plan.core.errors import DoesNotFit
    from oneke_plan.load.loader import load_model
    from oneke_plan.plan.fit import device_owner

    inventory = card_inventory(probe, *spec.cards)
    settings = settings_for(replace(grid, new_tokens=min(grid.new_tokens, SPLIT_NEW_TOKENS, spec.context - 1)),
                            spec.quant, spec.context, spec.batch)
    label = f"split {spec.shape}/{spec.quant}/{'+'.join(c.label for c in spec.cards)}"
    try:
        profile = planner.plan_profile(inventory, settings).profile
    except DoesNotFit as exc:
        rec.skip(label, f"oneke-plan refuses it: {str(exc).splitlines()[0]}")
        return
    devices = sorted({d for d in profile.device_map.values() if isinstance(d, int)})
    if len(devices) < 2:
        rec.skip(label, f"the plan puts everything on GPU {devices}: no split to check")
        return
    cpu_profile = planner.plan_profile(cpu_inventory(), settings).profile
    model = load_model(cpu_profile, source)
    names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]]
    layer_names = [b.name for b in planner.layout.blocks if b.kind == "layer"]  # cache layer i is decoder layer i
    try:
        for k in devices:
            device_map = {name: (0 if probe.cuda else "cpu") if dev == k else "cpu"
                          for name, dev in profile.device_map.items()}
            mine = {n for n in names if device_owner(n, profile.device_map) == k}
            # force_hooks: the CPU smoke's all-CPU map goes through the same hooks as the GPU's mixed one
            dispatch_model(model, device_map, main_device="cpu", force_hooks=True)
            tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if n in mine]
            by_device = storage_bytes_by_device(tensors)
            card = spec.cards[k]
            record = run_record(spec.shape, spec.quant, card, spec.context, spec.batch, SPLIT, "generate", settings,
                                estimate_record(profile.estimate[k]), True)
            record["id"] += f"/device{k}"
            record["device"] = k
            record["modules"] = sorted(name for name, dev in profile.device_map.items() if dev == k)
            try:
                cap = probe.set_card(card)
                layers = {i for i, name in enumerate(layer_names) if device_owner(name, profile.device_map) == k}
                record["measured"] = run_generate(model, settings, probe, cap, vocab, grid.seed, layers)
                record["measured"]["loaded_weights_bytes"] = sum(by_device.values())
                record["measured"]["loaded_weights_on_target"] = by_device.get(0 if probe.cuda else "cpu", 0)
                record["checks"] = checks(record)
                rec.add("split", record)
                print(f"  split device {k}: plan {_gib(record['plan']['total_bytes'])}, weights "
                      f"{record['measured']['loaded_weights_bytes']:,} B", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - the other device may still run
                rec.error(f"{label} device {k}", exc)
            finally:
                probe.set_card(None)
                remove_hook_from_module(model, recurse=True)
                model.to(torch.device("cpu"))
                release_memory()
    finally:
        del model
        release_memory()


# -- the summary ---------------------------------------------------------------------------------------------------
def _gib(value: Any) -> str:
    from oneke_plan.core.sizes import format_bytes

    return "n/a" if value is None else format_bytes(int(value))


def summary(data: dict[str, Any]) -> str:
    """The Markdown summary: machine, context, loads, runs (estimate vs peak), throughput, split, skipped, errors."""
    gpu = data.get("gpu")
    lines = [f"# GPU calibration ({data.get('mode')}, {data.get('status')})", "",
             f"- started {data.get('started')}, finished {data.get('finished', '-')}; command: `{data.get('command')}`",
             f"- machine: {data.get('machine')}"]
    if gpu:
        lines.append(f"- GPU 0: {gpu['name']} ({_gib(gpu['total_bytes'])}, cc {gpu['compute_capability']}, CUDA "
                     f"{gpu['cuda']}, driver {gpu['driver']}); CUDA context at start "
                     f"{_gib(gpu['context_bytes_at_start'])} ({gpu['context_method']}); allocator "
                     f"{gpu['PYTORCH_CUDA_ALLOC_CONF']}")
    else:
        lines.append(f"- no GPU: {NO_GPU}")
    lines += ["", "## Loads (planned weights vs the storages the loaded model holds)", "", "```"]
    lines.append(table(["shape", "quant", "planned B", "measured B", "diff", "load s", "load peak"],
                       [[x["shape"], x["quant"], f"{x['planned_weights_bytes']:,}", f"{x['measured_weights_total']:,}",
                         f"{x['measured_weights_total'] - x['planned_weights_bytes']:+,}", x["load_seconds"],
                         _gib(x["load_peak_bytes"])] for x in data["loads"]]))
    lines += ["```", "", "## Runs (peak = max reserved + CUDA context; estimate/peak >= 1: covered)", "",
              "```"]
    rows = []
    for r in [*data["runs"], *data["split"]]:
        m, c = r.get("measured", {}), r.get("checks", {})
        rows.append([r["id"], r["role"], _gib(r["plan"]["total_bytes"]), _gib(r["card_bytes"]),
                     _gib(m.get("max_memory_allocated")), _gib(m.get("peak_bytes")),
                     c.get("estimate_over_peak", "n/a"), "n/a" if m.get("out_of_memory") is None else
                     ("OOM" if m["out_of_memory"] else "no"), _check_cell(c), m.get("tokens_per_s", "n/a")])
    lines.append(table(["run", "role", "plan", "card", "max alloc", "peak", "est/peak", "OOM", "check", "tok/s"], rows,
                       right=range(2, 10)))
    lines += ["```", "", "## Throughput (tokens/s, same workload and GPU)", "", "```"]
    lines.append(table(["shape", "quant", "workload", "oneke-run", "generate", "generate_batch", "ours/generate",
                        "ours/generate_batch"],
                       [[t["shape"], t["quant"], f"{t['card']} ctx{t['context']} b{t['batch']}",
                         _tps(t.get("oneke_run")), _tps(t.get("generate")), _tps(t.get("generate_batch")),
                         t.get("ratios", {}).get("oneke_run_over_generate") or "n/a",
                         t.get("ratios", {}).get("oneke_run_over_generate_batch") or "n/a"]
                        for t in data["throughput"]]))
    lines += ["```", ""]
    if data["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['what']}: {s['why']}" for s in data["skipped"]] + [""]
    if data["errors"]:
        lines += ["## Errors", ""] + [f"- {e['what']}: {e['error']}" for e in data["errors"]] + [""]
    if data.get("unavailable"):
        lines += ["## Unavailable here", ""] + [f"- {k}: {v}" for k, v in data["unavailable"].items()] + [""]
    return "\n".join(lines)


def _tps(value: Any) -> str:
    if not value:
        return "n/a"
    if value.get("unavailable"):
        return "n/a (see the data file)"
    return str(value.get("tokens_per_s") or "n/a")


def _check_cell(c: dict[str, Any]) -> str:
    values = [v for k, v in c.items() if k != "estimate_over_peak"]
    if not values or all(v is None for v in values):
        return "n/a"
    return "pass" if all(v in (True, None) for v in values) else "FAIL"


# -- deriving defaults ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Derived:
    """What a GPU data file says the per-GPU reserve should be (bytes), and the margins it leaves."""

    reserve_bytes: int  # the smallest reserve (rounded up to a MiB) under which every estimate covers its peak
    per_card: dict[int, int]  # the same, per emulated card size (bytes -> bytes)
    runs: int
    over_peak_now: tuple[float, float]  # min, max estimate/peak with the reserve the runs were planned with
    over_peak_derived: tuple[float, float]  # the same with reserve_bytes
    workspace_ratio: tuple[float, float] | None  # min, max measured transient / planned workspace (generate runs)


def derive_defaults(data: dict[str, Any]) -> Derived:
    """The reserve that would make each run's estimate (weights + KV + workspace + reserve) at least its measured
    peak (max reserved + CUDA context), from the runs that fit their card and ran without running out of memory.

    needed reserve of a run = peak - (estimate - reserve). Raises ValueError when the data holds no GPU peak."""
    runs = [r for r in [*data.get("runs", []), *data.get("split", [])]
            if r.get("role") in FIT_ROLES and (r.get("measured") or {}).get("peak_bytes") is not None
            and not r["measured"].get("out_of_memory")]
    if not runs:
        raise ValueError(f"no GPU peak in it (mode {data.get('mode')!r}): run bench/gpu_calibration.py on a GPU first")
    needs = [(r["card_bytes"], r["measured"]["peak_bytes"] - (r["plan"]["total_bytes"] - r["plan"]["reserve_bytes"]))
             for r in runs]
    reserve = _round_up(max(n for _, n in needs), MiB)
    per_card: dict[int, int] = {}
    for card, need in needs:
        per_card[card] = max(per_card.get(card, 0), _round_up(need, MiB))
    now = [r["plan"]["total_bytes"] / r["measured"]["peak_bytes"] for r in runs]
    derived = [(r["plan"]["total_bytes"] - r["plan"]["reserve_bytes"] + reserve) / r["measured"]["peak_bytes"]
               for r in runs]
    transient = [(r["measured"]["max_memory_allocated"] - r["measured"]["allocated_before"]
                  - (r["measured"].get("kv_cache_bytes") or 0)) / r["plan"]["workspace_bytes"]
                 for r in runs if r.get("runner") == "generate" and r["plan"]["workspace_bytes"]
                 and r["measured"].get("max_memory_allocated") is not None]
    return Derived(reserve, per_card, len(runs), (min(now), max(now)), (min(derived), max(derived)),
                   (min(transient), max(transient)) if transient else None)


def _round_up(value: int, unit: int) -> int:
    return max(0, -(-value // unit) * unit)


def derive_main(path: Path) -> int:
    """--derive-defaults: print what the data file says DEFAULT_GPU_RESERVE_BYTES should be; change nothing."""
    from oneke_plan.core.errors import BadInput
    from oneke_plan.io.jsonfile import read_json_file

    try:  # oneke_plan's bounded reader: a huge, deeply nested or non-UTF-8 file is one line too
        data = read_json_file(path, "give the gpu-calibration.json a GPU run of this script wrote")
    except BadInput as exc:
        return _bad_input(str(exc))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return _bad_input(f"{path}: not a data file of this script (format {FORMAT!r} expected)")
    try:
        derived = derive_defaults(data)
    except ValueError as exc:
        return _bad_input(f"{path}: {exc}")
    gpu = data.get("gpu") or {}
    print(f"{path}: {derived.runs} runs that fit their card, measured on {gpu.get('name')} "
          f"({data.get('started')})")
    print(f"estimate / measured peak with the reserve they were planned with: {derived.over_peak_now[0]:.3f} .. "
          f"{derived.over_peak_now[1]:.3f}")
    print(f"reserve that covers every peak: {derived.reserve_bytes:,} bytes ({derived.reserve_bytes / GiB:.3f} GiB); "
          f"estimate / peak with it: {derived.over_peak_derived[0]:.3f} .. {derived.over_peak_derived[1]:.3f} "
          "(goal: 1.000 .. 1.050)")
    for card, need in sorted(derived.per_card.items()):
        print(f"  card {card / GiB:.2f} GiB: reserve needed {need:,} bytes ({need / GiB:.3f} GiB)")
    if derived.workspace_ratio:
        print(f"measured transient (max allocated - allocated before - KV cache) / planned workspace: "
              f"{derived.workspace_ratio[0]:.3f} .. {derived.workspace_ratio[1]:.3f}")
    print(f"to adopt it: oneke_plan/plan/memory.py DEFAULT_GPU_RESERVE_BYTES = {derived.reserve_bytes}  "
          f"# {path.name}, {gpu.get('name')}")
    if derived.over_peak_derived[1] > 1.05:
        print("note: some estimates stay more than 5% above their peak with this reserve: the workspace or KV terms, "
              "not the reserve, are high there (see the runs' est/peak in the summary)")
    return 0


# -- main ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults (GPU): --shapes oneke,1b,7b-gqa --quant none,8bit,4bit --cards "
                                       "24GiB,16GiB,12GiB --contexts 512,4096 --new-tokens 32 --time-budget 540")
    p.add_argument("--out", type=Path, help="folder for gpu-calibration.json and gpu-calibration.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; GPU-only figures recorded as null")
    p.add_argument("--derive-defaults", type=Path, metavar="DATA.json", help="print the reserve a GPU data file "
                   "supports, then exit")
    p.add_argument("--shapes", help="comma-separated: oneke, 7b-gqa, 1b (--cpu-smoke: tiny, tiny-gqa)")
    p.add_argument("--quant", help="comma-separated: none, 8bit, 4bit")
    p.add_argument("--cards", help="emulated cards, comma-separated sizes, e.g. 24GiB,16GiB,12GiB")
    p.add_argument("--contexts", help="positions per sequence (input + new tokens), comma-separated, e.g. 512,4096")
    p.add_argument("--new-tokens", type=int, help="new tokens per sequence (default 32; --cpu-smoke 4)")
    p.add_argument("--batches", help="fixed batches run besides the tightness pair where they fit, e.g. 1,4,16")
    p.add_argument("--max-batch", type=int, help="no tightness pair above this batch (default 1024; smoke 16)")
    p.add_argument("--reserve", help="per-GPU reserve the plans use (default: oneke-plan's)")
    p.add_argument("--split", help="SHAPE:QUANT:CARD+CARD:CONTEXT:BATCH (default oneke:none:24GiB+12GiB:512:1), "
                   "or 'none'")
    p.add_argument("--no-oneke-run", action="store_true", help="skip the oneke-run runs")
    p.add_argument("--no-generate-batch", action="store_true", help="skip transformers' generate_batch")
    p.add_argument("--generate-batch", action="store_true", help="--cpu-smoke: run generate_batch too")
    p.add_argument("--time-budget", type=float, help="seconds after which no new work starts (default 540)")
    p.add_argument("--workdir", type=Path, help="where checkpoints are built (default: the temp folder; OneKE's "
                   "takes 26.5 GB)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and oneke-run's files in --workdir")
    return p


def main(argv: list[str] | None = None) -> int:
    from oneke_plan.core.errors import BadInput

    args = build_parser().parse_args(argv)
    if args.derive_defaults:
        return derive_main(args.derive_defaults)
    if args.out is None:
        return _bad_input("--out FOLDER is needed (the data file and the table go there)")
    if not args.out.is_dir():
        return _bad_input(f"--out {args.out}: not an existing folder; create it first")
    foreign = foreign_file(args.out)
    if foreign is not None:
        return _bad_input(f"{foreign}: exists and was not written by this script; choose another --out")
    try:
        grid = smoke_grid(args) if args.cpu_smoke else gpu_grid(args)
    except ValueError as exc:  # a size, a number or --split's SHAPE:QUANT:CARD+CARD:CONTEXT:BATCH
        return _bad_input(f"{exc}; see --help")
    for shape in grid.shapes:
        shape_dims(shape)
    bad = [q for q in (*grid.quants, *([grid.split.quant] if grid.split else [])) if q not in ("none", "8bit", "4bit")]
    if bad or not grid.cards or not grid.contexts:
        return _bad_input(f"--quant {','.join(bad)}: use none, 8bit, 4bit" if bad else "--cards, --contexts: empty")
    quiet_libraries()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        return _bad_input("no CUDA device here: run on a GPU, or pass --cpu-smoke for the CPU smoke run")
    torch.manual_seed(grid.seed)
    if not cuda:
        torch.set_num_threads(1)  # tiny matmuls gain nothing from threads; on a busy 2-core machine they lose
    probe = Probe(cuda)
    header = {
        "mode": "gpu" if cuda else "cpu-smoke",
        "started": _now(),
        "command": " ".join(["python", "bench/gpu_calibration.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_line(),
        "gpu": probe.info,
        "unavailable": {} if cuda else dict.fromkeys((*GPU_FIELDS, *LOAD_GPU_FIELDS), NO_GPU),
        "settings": _settings_record(grid),
    }
    try:
        return record_grid(args, grid, probe, header)
    except BadInput as exc:  # the data file or the table could not be written (a full disk, a read-only folder)
        return _bad_input(str(exc))


def record_grid(args: argparse.Namespace, grid: Grid, probe: Probe, header: dict[str, Any]) -> int:
    """The grid's runs, recorded as they come; the work folder is removed (unless --keep) whatever happens."""
    rec = Recorder(args.out, header)
    budget = Budget(grid.time_budget_s)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-calibration-", dir=args.workdir))
    status = "complete"
    try:
        if grid.split is not None and grid.split.shape not in grid.shapes:
            rec.skip(f"split {grid.split.shape}", "its shape is not in --shapes")
        for shape in grid.shapes:
            run_shape(shape, grid, probe, rec, budget, workdir, args.keep)
        if any("time budget" in s["why"] for s in rec.data["skipped"]):
            status = f"stopped: --time-budget {grid.time_budget_s:.0f} s spent"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        try:
            rec.finish(status)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {rec.data_path} and {rec.table_path} ({budget.elapsed():.0f} s, {status}, "
          f"{len(rec.data['errors'])} errors)", file=sys.stderr)
    return 1 if rec.data["errors"] else 0


def run_shape(shape: str, grid: Grid, probe: Probe, rec: Recorder, budget: Budget, workdir: Path, keep: bool) -> None:
    """Build the shape's checkpoint, calibrate each quantization, run the split if it is this shape's."""
    from transformers import AutoTokenizer

    from oneke_plan.api.planner import Planner
    from oneke_plan.plan.model_source import resolve_model

    if budget.spent():
        rec.skip(shape, "time budget spent before its checkpoint was built")
        return
    start = time.perf_counter()
    folder = workdir / shape
    try:
        path = build_checkpoint(shape, folder, probe.device, grid.seed)
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the other shapes may still fit
        rec.error(f"{shape} checkpoint", exc)
        return
    print(f"{shape}: checkpoint built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    try:
        source = resolve_model(str(path))
        planner = Planner(source)
        tokenizer = AutoTokenizer.from_pretrained(str(path))  # once: every quantization's oneke-run sizes with it
        for quant in grid.quants:
            try:
                calibrate(planner, source, shape, quant, grid, probe, rec, budget, workdir, tokenizer)
            except Exception as exc:  # noqa: BLE001 - the next quantization may still run
                rec.error(f"{shape}/{quant}", exc)
                release_memory()
        if grid.split is not None and grid.split.shape == shape:
            if budget.spent():
                rec.skip(f"split {shape}", "time budget spent")
            else:
                try:
                    split_check(planner, source, grid.split, grid, probe, rec, len(tokenizer))
                except Exception as exc:  # noqa: BLE001
                    rec.error(f"split {shape}", exc)
                    release_memory()
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _settings_record(grid: Grid) -> dict[str, Any]:
    return {
        "shapes": {s: shape_dims(s) for s in grid.shapes},
        "quants": list(grid.quants),
        "cards": {c.label: c.total_bytes for c in grid.cards},
        "contexts": list(grid.contexts),
        "new_tokens": grid.new_tokens,
        "batches": list(grid.batches),
        "max_batch": grid.max_batch,
        "reserve_bytes": grid.reserve_bytes,
        "dtype": "bfloat16",
        "split": None if grid.split is None else {
            "shape": grid.split.shape, "quant": grid.split.quant, "cards": {c.label: c.total_bytes for c in
                                                                             grid.split.cards},
            "context": grid.split.context, "batch": grid.split.batch,
            "new_tokens": min(grid.new_tokens, SPLIT_NEW_TOKENS)},
        "oneke_run": grid.oneke_run,
        "generate_batch": grid.generate_batch or "run",
        "time_budget_s": grid.time_budget_s,
        "tight_fraction": TIGHT_FRACTION,
    }


if __name__ == "__main__":
    sys.exit(main())
