"""Common GPUs by name: memory as the driver reports it (bytes), CUDA compute capability, and the two vendor
figures the speed prediction uses (speed.py): memory bandwidth and dense 16-bit tensor throughput.

Memory is the nominal size in GiB as `nvidia-smi` shows it (a "24 GB" RTX 3090 reports 24576 MiB); the usable
part is smaller by the CUDA context, which the planner counts separately as its runtime reserve.

Bandwidth is the vendor's peak memory bandwidth in decimal GB/s (10^9 bytes/s); throughput is the vendor's dense
(no structured sparsity) FP16/BF16 tensor-core peak with FP32 accumulation (what PyTorch's matmuls use), in TFLOPS
(10^12 FLOP/s). Each figure is from the document named in `source` (NVIDIA's datasheet or product page for the
card, or its architecture whitepaper for GeForce tensor rates). Where a card comes in a PCIe and an SXM/NVL
variant under one name, the lower figure (the PCIe card's) is used, so the prediction does not flatter. None
means no vendor figure is known here (never a guess): the speed prediction then says "unknown", unless the user
passes one (`--bandwidth`, `--tflops`).
"""

from __future__ import annotations

from dataclasses import dataclass

from oneke_plan.core.sizes import GiB

GB_PER_S = 10**9
TFLOPS = 10**12


@dataclass(frozen=True)
class CardSpec:
    name: str
    total_bytes: int
    compute_capability: tuple[int, int]
    bandwidth_bytes_per_second: int | None = None  # vendor peak memory bandwidth
    flops_per_second: int | None = None  # vendor dense FP16/BF16 tensor peak, FP32 accumulate
    source: str = ""  # the documents the two figures come from


def _card(
    name: str,
    gib: float,
    cc: tuple[int, int],
    gb_per_s: float | None = None,
    tflops: float | None = None,
    source: str = "",
) -> CardSpec:
    return CardSpec(
        name,
        int(gib * GiB),
        cc,
        None if gb_per_s is None else int(gb_per_s * GB_PER_S),
        None if tflops is None else int(tflops * TFLOPS),
        source,
    )


# GeForce tensor rates: the whitepapers list FP16 tensor TFLOPS "with FP16 accumulate" and, at half that rate on
# GeForce cards, "with FP32 accumulate"; the latter is the one given. Pascal (GTX 1080 Ti, P40) has no tensor cores
# and runs FP16 at a small fraction of FP32: no figure is given.
CARDS: tuple[CardSpec, ...] = (
    _card("GTX 1080 Ti", 11, (6, 1), 484, None, "NVIDIA GeForce GTX 1080 Ti specifications"),
    _card("Tesla P40", 24, (6, 1), 346, None, "NVIDIA Tesla P40 datasheet"),
    _card("Tesla P100", 16, (6, 0), 732, 18.7, "NVIDIA Tesla P100 PCIe datasheet (FP16, no tensor cores)"),
    _card("Tesla V100 16GB", 16, (7, 0), 900, 112, "NVIDIA Tesla V100 datasheet (PCIe; SXM2: 125 TFLOPS)"),
    _card("Tesla V100", 32, (7, 0), 900, 112, "NVIDIA Tesla V100 datasheet (PCIe; SXM2: 125 TFLOPS)"),
    _card("Tesla T4", 15, (7, 5), 320, 65, "NVIDIA T4 datasheet"),
    _card("RTX 2080 Ti", 11, (7, 5), 616, None, "NVIDIA GeForce RTX 2080 Ti specifications"),
    _card("TITAN RTX", 24, (7, 5), 672, None, "NVIDIA TITAN RTX specifications"),
    _card("RTX 3060", 12, (8, 6), 360, None, "NVIDIA GeForce RTX 3060 specifications"),
    _card("RTX 3070", 8, (8, 6), 448, None, "NVIDIA GeForce RTX 3070 specifications"),
    _card("RTX 3080", 10, (8, 6), 760, None, "NVIDIA GeForce RTX 3080 specifications"),
    _card("RTX 3080 12GB", 12, (8, 6), 912, None, "NVIDIA GeForce RTX 3080 specifications"),
    _card("RTX 3080 Ti", 12, (8, 6), 912, None, "NVIDIA GeForce RTX 3080 Ti specifications"),
    _card("RTX 3090", 24, (8, 6), 936, 71, "NVIDIA GeForce RTX 3090 specifications; NVIDIA Ampere GA102 whitepaper"),
    _card("RTX 3090 Ti", 24, (8, 6), 1008, None, "NVIDIA GeForce RTX 3090 Ti specifications"),
    _card("RTX A4000", 16, (8, 6), 448, None, "NVIDIA RTX A4000 datasheet"),
    _card("RTX A5000", 24, (8, 6), 768, None, "NVIDIA RTX A5000 datasheet"),
    _card("RTX A6000", 48, (8, 6), 768, 154.8, "NVIDIA RTX A6000 datasheet (309.7 TFLOPS with sparsity)"),
    _card("A10", 24, (8, 6), 600, 125, "NVIDIA A10 datasheet"),
    _card("A10G", 24, (8, 6)),  # an AWS part: NVIDIA publishes no datasheet for it
    _card("A30", 24, (8, 0), 933, 165, "NVIDIA A30 datasheet"),
    _card("A40", 48, (8, 6), 696, 149.7, "NVIDIA A40 datasheet"),
    _card("A100 40GB", 40, (8, 0), 1555, 312, "NVIDIA A100 datasheet"),
    _card("A100", 80, (8, 0), 1935, 312, "NVIDIA A100 datasheet (80GB PCIe; SXM: 2,039 GB/s)"),
    _card("A800", 80, (8, 0), 1935, 312, "NVIDIA A800 datasheet (80GB PCIe; SXM: 2,039 GB/s)"),
    _card("RTX 4060 Ti", 8, (8, 9), 288, None, "NVIDIA GeForce RTX 4060 Ti specifications"),
    _card("RTX 4060 Ti 16GB", 16, (8, 9), 288, None, "NVIDIA GeForce RTX 4060 Ti specifications"),
    _card("RTX 4070", 12, (8, 9), 504, None, "NVIDIA GeForce RTX 4070 specifications"),
    _card("RTX 4070 Ti", 12, (8, 9), 504, None, "NVIDIA GeForce RTX 4070 Ti specifications"),
    _card("RTX 4080", 16, (8, 9), 716.8, None, "NVIDIA GeForce RTX 4080 specifications"),
    _card(
        "RTX 4090", 24, (8, 9), 1008, 165.2, "NVIDIA GeForce RTX 4090 specifications; NVIDIA Ada Lovelace whitepaper"
    ),
    _card("RTX 6000 Ada", 48, (8, 9), 960, None, "NVIDIA RTX 6000 Ada Generation datasheet"),
    _card("L4", 24, (8, 9), 300, 121, "NVIDIA L4 datasheet (242 TFLOPS with sparsity)"),
    _card("L40", 48, (8, 9), 864, 181, "NVIDIA L40 datasheet (362 TFLOPS with sparsity)"),
    _card("L40S", 48, (8, 9), 864, 362, "NVIDIA L40S datasheet (733 TFLOPS with sparsity)"),
    _card("RTX 5090", 32, (12, 0), 1792, None, "NVIDIA GeForce RTX 5090 specifications"),
    _card("H100", 80, (9, 0), 2000, 756, "NVIDIA H100 datasheet (PCIe; SXM: 3,350 GB/s, 989 TFLOPS)"),
    _card("H800", 80, (9, 0), 2000, 756, "NVIDIA H800 datasheet (PCIe)"),
    _card("H200", 141, (9, 0), 4800, 835, "NVIDIA H200 datasheet (NVL; SXM: 989 TFLOPS)"),
)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum()).removeprefix("nvidia").removeprefix("geforce")


_BY_KEY = {_key(card.name): card for card in CARDS}


def find_card(name: str) -> CardSpec | None:
    """The card called `name`, ignoring case, spaces and an 'NVIDIA'/'GeForce' prefix; None if unknown."""
    key = _key(name)
    return _BY_KEY.get(key) or _BY_KEY.get(key.removeprefix("geforce"))


def card_names() -> list[str]:
    return [card.name for card in CARDS]
