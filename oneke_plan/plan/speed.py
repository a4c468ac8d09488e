"""The speed prediction: pure arithmetic on a placement's bytes and FLOPs over each device's rates (no torch).

Decoding one token for every row of the batch reads, from each device's memory, the weights stored there and the
KV cache of the layers run there; it is bound by memory bandwidth, so a device's share of a step is

    decode_seconds = max(read_bytes / bandwidth, decode_flops / throughput)

(the second term only where the throughput is known; at batch sizes a plan holds it is the smaller). The KV cache
is read at the planned context (every prompt at max_input_tokens plus max_new_tokens): the slowest step. The input
embeddings are a lookup (B rows are read, not the table), unless they are tied to the lm_head. Weights offloaded to
the CPU cross PCIe at every step (accelerate copies them to the GPU), disk-offloaded ones are read from disk first.
accelerate runs the devices one after another (a pipeline without overlap), so the step is the sum over devices.

Prefill runs B x L prompt tokens through the model in one forward, bound by compute:

    prefill_seconds = max(prefill_flops / throughput, read_bytes / bandwidth)

with prefill_flops = 2 x (parameters of the layers) per token, the attention scores and their weighted sum
(2 x B x L^2 x heads x head_dim per layer: causal, so half of the 4 B L^2 d of full attention), and the lm_head on the
last position of each prompt. A batch takes prefill_seconds + max_new_tokens x decode_step_seconds, which gives the
records (prompts at the planned lengths) per hour.

A plan that offloads weights to the CPU or disk also says how much slower it decodes than with every weight on a
GPU (OffloadCost): the same step, with the offloaded bytes read from the main GPU's memory instead of crossing PCIe
(the GPU that runs them; the roofline recomputed there). It is the one speed model of the package: the offload
warning and the planner's "what would fit" lines state these figures.

Rates are vendor peaks (catalog.py) or what the user measured and passed; where one is not known the figure it
sets is None, with the reason in `unknown`: never a silent number. Peaks are upper bounds: real kernels reach part
of them, so predicted speeds are upper bounds too (docs/memory-model.md, "Speed"; calibration on this machine's CPU:
bench/speed_prediction.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from oneke_plan.plan.blocks import BlockInfo, ModelLayout
from oneke_plan.plan.catalog import find_card
from oneke_plan.plan.fit import (
    OFFLOAD_DEVICES,
    DeviceEstimate,
    DeviceId,
    Slot,
    block_weights_bytes,
    execution_device,
    main_device,
)
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import Workload

# The links offloaded weights cross. Assumed, not measured here (no GPU has been lent to this project): PCIe 4.0 x16
# moves 32 GB/s in theory and about 25 GB/s in practice; a fast NVMe SSD reads about 3 GB/s.
PCIE_BYTES_PER_SECOND = 25 * 10**9
DISK_BYTES_PER_SECOND = 3 * 10**9
PCIE_SOURCE = "assumed: PCIe 4.0 x16, 25 GB/s in practice of its 32 GB/s (PCI-SIG PCIe 4.0 specification)"
DISK_SOURCE = "assumed: an NVMe SSD reading 3 GB/s, then PCIe"


@dataclass(frozen=True)
class DeviceRates:
    """What a device does per second: memory bandwidth (bytes/s) and dense matmul throughput (FLOP/s); None where
    unknown, with where each known figure comes from and, for an unknown one, what to do."""

    bandwidth_bytes_per_second: int | None = None
    flops_per_second: int | None = None
    bandwidth_source: str = ""
    flops_source: str = ""
    missing_hint: str = ""  # e.g. "name the card (--gpu 'RTX 3060') or pass --bandwidth 1=GB/s"


@dataclass(frozen=True)
class DeviceSpeed:
    """One device's share of a decoding step and of the prefill. For `cpu`/`disk` holding offloaded weights of a
    plan with GPUs, the bytes are those crossing PCIe (the rates: the link's)."""

    device: DeviceId
    decode_read_bytes: int  # per decoding step: weights read + KV cache read
    decode_flops: int
    prefill_flops: int
    prefill_read_bytes: int
    rates: DeviceRates
    decode_seconds: float | None
    prefill_seconds: float | None


@dataclass(frozen=True)
class OffloadCost:
    """What offloaded weights cost a decoding step, in seconds: `link_seconds`, theirs alone (crossing PCIe, read
    from disk first; on a machine without GPUs, read from disk into the CPU); `step_seconds`, the predicted step;
    `on_gpu_seconds`, the same step with those bytes read from the memory of the device that runs the model (the
    main GPU, or the CPU). The last two are None where that device's bandwidth is not known (`unknown_devices`);
    `figures` names each bandwidth used and where it comes from."""

    bytes_by_device: dict[DeviceId, int]  # offloaded bytes read per step: "cpu" (beside GPUs), "disk"
    link_seconds: float
    step_seconds: float | None
    on_gpu_seconds: float | None
    figures: tuple[str, ...]
    unknown_devices: tuple[DeviceId, ...] = ()

    @property
    def slowdown(self) -> float | None:
        """How many times slower a decoding step is than with every weight on a GPU; None where not known."""
        if self.step_seconds is None or not self.on_gpu_seconds:
            return None
        return self.step_seconds / self.on_gpu_seconds


@dataclass(frozen=True)
class SpeedPrediction:
    devices: tuple[DeviceSpeed, ...]
    batch_size: int
    prompt_tokens: int  # per batch: B x max_input_tokens
    new_tokens: int  # per prompt: max_new_tokens
    decode_step_seconds: float | None
    prefill_seconds: float | None
    unknown: tuple[str, ...] = field(default=())  # why a figure is None
    offload: OffloadCost | None = None  # with GPUs, when weights are offloaded to the CPU or disk

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens generated per second, every row of the batch together, at the planned context."""
        return self.batch_size / self.decode_step_seconds if self.decode_step_seconds else None

    @property
    def prefill_tokens_per_second(self) -> float | None:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else None

    @property
    def records_per_hour(self) -> float | None:
        """Prompts at the planned lengths answered per hour, batch after batch (one model copy)."""
        if self.decode_step_seconds is None or self.prefill_seconds is None:
            return None
        return 3600 * self.batch_size / (self.prefill_seconds + self.new_tokens * self.decode_step_seconds)

    def to_dict(self) -> dict[str, Any]:
        """The profile's `speed` key (docs/profile-format.md)."""
        return {
            "decode_tokens_per_second": _round(self.decode_tokens_per_second),
            "decode_step_seconds": _round(self.decode_step_seconds),
            "prefill_tokens_per_second": _round(self.prefill_tokens_per_second),
            "prefill_seconds": _round(self.prefill_seconds),
            "records_per_hour": _round(self.records_per_hour),
            "unknown": list(self.unknown),
            "devices": {
                d.device: {
                    "decode_read_bytes": d.decode_read_bytes,
                    "decode_flops": d.decode_flops,
                    "prefill_read_bytes": d.prefill_read_bytes,
                    "prefill_flops": d.prefill_flops,
                    "bandwidth_bytes_per_second": d.rates.bandwidth_bytes_per_second,
                    "bandwidth_source": d.rates.bandwidth_source or None,
                    "flops_per_second": d.rates.flops_per_second,
                    "flops_source": d.rates.flops_source or None,
                    "decode_seconds": _round(d.decode_seconds),
                    "prefill_seconds": _round(d.prefill_seconds),
                }
                for d in self.devices
            },
        }


def _round(value: float | None) -> float | None:
    """Six significant digits: what the arithmetic knows, and stable text in profiles."""
    return None if value is None else float(f"{value:.6g}")


def _matmul_parameters(block: BlockInfo) -> int:
    """Elements of the block's float parameters: each is one multiply-add per token in a forward."""
    return sum(t.numel for t in block.tensors if t.is_float and not t.is_buffer)


def predict(
    layout: ModelLayout,
    assignment: Mapping[str, DeviceId],
    estimates: Mapping[DeviceId, DeviceEstimate],
    slots: Sequence[Slot],
    workload: Workload,
    rates: Mapping[DeviceId, DeviceRates],
) -> SpeedPrediction:
    """Decode and prefill times of a placement (module docstring), device by device."""
    main = main_device(dict(assignment), slots)
    has_gpus = any(s.is_gpu for s in slots)
    b, length = workload.batch_size, workload.max_input_tokens
    context = workload.sequence_tokens
    tied_embeddings = any(blk.tied_to == layout.input_embeddings for blk in layout.blocks if blk.tied_to)
    shape = layout.attention
    per_token_attention = 0 if shape is None else 2 * shape.num_attention_heads * shape.head_dim  # flops per key
    decode_flops: dict[DeviceId, int] = {}
    prefill_flops: dict[DeviceId, int] = {}
    unread: dict[DeviceId, int] = {}  # stored bytes a decoding step does not read (the embedding table)
    for block in layout.blocks:
        if block.name not in assignment:
            continue
        home = assignment[block.name]
        run = execution_device(home, main)
        if block.name == layout.input_embeddings:
            if not tied_embeddings:
                unread[home] = unread.get(home, 0) + block_weights_bytes(block)
            continue  # a lookup, no matmul (the tied lm_head's matmul is counted with the lm_head)
        if block.kind == "lm_head":
            params = layout.output_embeddings_numel or _matmul_parameters(block)
            decode_flops[run] = decode_flops.get(run, 0) + 2 * params * b
            prefill_flops[run] = prefill_flops.get(run, 0) + 2 * params * b  # last position of each prompt
            continue
        params = _matmul_parameters(block)
        attention_decode = per_token_attention * context * b if block.kind == "layer" else 0
        attention_prefill = per_token_attention * length * length * b if block.kind == "layer" else 0
        decode_flops[run] = decode_flops.get(run, 0) + 2 * params * b + attention_decode
        prefill_flops[run] = prefill_flops.get(run, 0) + 2 * params * b * length + attention_prefill
    devices = []
    unknown: list[str] = []
    for slot in slots:
        est = estimates.get(slot.id)
        if est is None:
            continue
        weights_read = max(est.weights_bytes - unread.get(slot.id, 0), 0)
        link = slot.id in OFFLOAD_DEVICES and has_gpus  # its weights cross PCIe to the GPU that runs them
        if slot.id == "disk":
            # read from disk, then (with GPUs) across PCIe: one rate for both legs in series
            seconds_per_byte = 1 / DISK_BYTES_PER_SECOND + (1 / PCIE_BYTES_PER_SECOND if has_gpus else 0)
            device_rates = DeviceRates(int(1 / seconds_per_byte), None, DISK_SOURCE + (" (PCIe)" if has_gpus else ""))
        elif link:
            device_rates = DeviceRates(PCIE_BYTES_PER_SECOND, None, PCIE_SOURCE)
        else:
            device_rates = rates.get(slot.id, DeviceRates())
        computes = not link and slot.id != "disk"
        read = weights_read + (est.kv_cache_bytes if computes else 0)
        flops_decode = decode_flops.get(slot.id, 0) if computes else 0
        flops_prefill = prefill_flops.get(slot.id, 0) if computes else 0
        decode_s = _seconds(read, flops_decode, device_rates, bound="bandwidth")
        prefill_s = _seconds(weights_read, flops_prefill, device_rates, bound="flops" if computes else "bandwidth")
        missing = []
        if decode_s is None and (read or flops_decode):
            missing.append(("memory bandwidth", "decode", f"--bandwidth {slot.id}=GB/s"))
        if prefill_s is None and (flops_prefill or weights_read):
            missing.append(("matmul throughput", "prefill", f"--tflops {slot.id}=TFLOPS"))
        if missing:
            rates_text, speeds, flags = (" and ".join(parts) for parts in zip(*missing, strict=True))
            unknown.append(f"{slot.name}: {rates_text} not known, so no {speeds} speed: {device_rates.missing_hint} "
                           f"{' '.join(f for _, _, f in missing)}")  # fmt: skip
        devices.append(
            DeviceSpeed(
                slot.id, read, flops_decode, flops_prefill, weights_read, device_rates, decode_s, prefill_s
            )
        )
    decode_times = [d.decode_seconds for d in devices]
    prefill_times = [d.prefill_seconds for d in devices]
    decode_step = None if None in decode_times else sum(t for t in decode_times if t is not None)
    return SpeedPrediction(
        tuple(devices),
        b,
        b * length,
        workload.max_new_tokens,
        decode_step,
        None if None in prefill_times else sum(t for t in prefill_times if t is not None),
        tuple(unknown),
        offload_cost(devices, main, decode_step),
    )


def offload_cost(devices: Sequence[DeviceSpeed], main: DeviceId, step: float | None) -> OffloadCost | None:
    """The offloaded weights' share of a decoding step, and the step without them (OffloadCost): None unless the
    device that runs the model (`main`: a GPU, or the CPU on a machine without one) reads weights held elsewhere
    (the CPU beside GPUs, or disk). `step`: the predicted decoding step."""
    if main == "disk":
        return None
    offloaded = {
        d.device: d for d in devices if d.device in OFFLOAD_DEVICES and d.device != main and d.decode_read_bytes
    }
    if not offloaded:
        return None
    computing = [d for d in devices if d.device not in offloaded and d.device != "disk"]
    host = next((d for d in computing if d.device == main), None)
    if host is None:  # the CPU runs blocks it holds none of (every weight on disk): no step of its own to compare
        return None
    link_seconds = sum(d.decode_seconds or 0.0 for d in offloaded.values())
    figures = [_bandwidth_text(d, main) for d in computing if d.rates.bandwidth_bytes_per_second]
    figures += [_bandwidth_text(d, main) for d in offloaded.values()]
    unknown = tuple(d.device for d in computing if d.decode_seconds is None)
    on_gpu = None
    if step is not None:
        moved = sum(d.decode_read_bytes for d in offloaded.values())
        # the main GPU reads the offloaded weights from its own memory: its roofline with those bytes added
        on_host = _seconds(host.decode_read_bytes + moved, host.decode_flops, host.rates, bound="bandwidth")
        assert on_host is not None and host.decode_seconds is not None
        on_gpu = step - link_seconds - host.decode_seconds + on_host
    return OffloadCost(
        {d.device: d.decode_read_bytes for d in offloaded.values()},
        link_seconds,
        step,
        on_gpu,
        tuple(figures),
        unknown,
    )


def _bandwidth_text(device: DeviceSpeed, main: DeviceId) -> str:
    """'GPU 0 716.8 GB/s, catalog', 'CPU -> GPU (PCIe) 25 GB/s, assumed': a figure used and where it comes from
    (the source's first words: the profile's speed.devices has it whole). `main`: the device that runs the model."""
    rate = device.rates.bandwidth_bytes_per_second
    assert rate is not None
    if main == "cpu":
        links = {"cpu": "CPU", "disk": "disk -> CPU (NVMe)"}
    else:
        links = {"cpu": "CPU -> GPU (PCIe)", "disk": "disk -> GPU (NVMe, then PCIe)"}
    label = links.get(str(device.device), f"GPU {device.device}")
    source = device.rates.bandwidth_source.split(" (")[0].split(":")[0]
    return f"{label} {rate / 1e9:.4g} GB/s, {source}"


def _seconds(read_bytes: int, flops: int, rates: DeviceRates, bound: str) -> float | None:
    """The roofline: the longer of reading the bytes and computing the FLOPs. The `bound` rate must be known (else
    None); the other counts only where it is."""
    bandwidth, throughput = rates.bandwidth_bytes_per_second, rates.flops_per_second
    if not read_bytes and not flops:
        return 0.0
    if (bound == "bandwidth" and not bandwidth) or (bound == "flops" and not throughput):
        return None
    terms = [read_bytes / bandwidth if bandwidth else 0.0, flops / throughput if throughput else 0.0]
    return max(terms)


def rates_of(inventory: Inventory) -> dict[DeviceId, DeviceRates]:
    """Each device's rates as the machine gives them: a GPU's from the catalog, an inventory file or the command
    line; the CPU's only from the command line (nothing here guesses a host's bandwidth)."""
    rates: dict[DeviceId, DeviceRates] = {
        g.index: DeviceRates(
            g.bandwidth_bytes_per_second,
            g.flops_per_second,
            g.bandwidth_source,
            g.flops_source,
            f"the catalog has no vendor figure for the {g.name}: pass"
            if find_card(g.name)
            else "name the card (e.g. --gpu 'RTX 3090': the catalog's vendor figures) or pass",
        )
        for g in inventory.gpus
    }
    rates["cpu"] = DeviceRates(
        inventory.cpu_bandwidth_bytes_per_second,
        inventory.cpu_flops_per_second,
        "--bandwidth cpu=..." if inventory.cpu_bandwidth_bytes_per_second else "",
        "--tflops cpu=..." if inventory.cpu_flops_per_second else "",
        "pass what this machine measures (bench/speed_prediction.py):",
    )
    return rates


def combined(predictions: Sequence[SpeedPrediction], nodes: int) -> dict[str, Any]:
    """Several model copies (replicas on `nodes` nodes) answering side by side: their throughputs add up."""
    copies = len(predictions) * nodes

    def total(values: list[float | None]) -> float | None:
        return None if None in values else _round(nodes * sum(v for v in values if v is not None))

    return {
        "copies": copies,
        "decode_tokens_per_second": total([p.decode_tokens_per_second for p in predictions]),
        "prefill_tokens_per_second": total([p.prefill_tokens_per_second for p in predictions]),
        "records_per_hour": total([p.records_per_hour for p in predictions]),
        "unknown": sorted({line for p in predictions for line in p.unknown}),
    }
