"""Common GPUs by name: memory as the driver reports it, CUDA compute capability, and the two vendor figures the
speed prediction uses (speed.py): memory bandwidth and dense 16-bit tensor throughput.

Memory is `nvidia-smi`'s total (`memory.total`, MiB) as published nvidia-smi outputs show it for the card, each row
naming the page it was read from (`memory_source`). Where cards of one name show different totals (an RTX 3090 shows
24,576 MiB on some drivers and 24,265 MiB on others; ECC on a data-center card hides part of it) the smaller is
kept where both are cited. Where no nvidia-smi output was found the row keeps the nominal size (N GiB = N x 1024
MiB) and says so.

A process cannot allocate all of nvidia-smi's total: CUDA never exposes the driver's own reservation (`nvidia-smi
-q` lists it as "Reserved"). torch's OOM message prints what CUDA exposes ("GPU 0 has a total capacity of 79.22
GiB", torch.cuda.mem_get_info's total); where a published one is known for the card (`torch_gib`, `torch_source`)
the plan budgets that figure (never above nvidia-smi's total: the message rounds to hundredths), else nvidia-smi's
total. `memory_basis` says which, in the plan's log. The CUDA context and the rest of the runtime come out of it
as the planner's reserve (docs/memory-model.md, "The GPU reserve").

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

from oneke_plan.core.sizes import GiB, MiB, format_bytes

GB_PER_S = 10**9
TFLOPS = 10**12
NOMINAL = "nominal"  # how a memory_source without a published nvidia-smi total begins


@dataclass(frozen=True)
class CardSpec:
    name: str
    smi_mib: int  # nvidia-smi's memory.total (MiB); the nominal N x 1024 where memory_source says "nominal"
    compute_capability: tuple[int, int]
    bandwidth_bytes_per_second: int | None = None  # vendor peak memory bandwidth
    flops_per_second: int | None = None  # vendor dense FP16/BF16 tensor peak, FP32 accumulate
    source: str = ""  # the documents the two speed figures come from
    memory_source: str = ""  # the page showing nvidia-smi's total for this card, or "nominal ..."
    torch_centigib: int | None = None  # torch's "total capacity" in hundredths of a GiB, as its OOM message prints it
    torch_source: str = ""  # the page showing that message for this card

    @property
    def smi_bytes(self) -> int:
        return self.smi_mib * MiB

    @property
    def torch_bytes(self) -> int | None:
        """torch's total capacity for the card in bytes (the printed GiB figure, rounded down to a byte)."""
        return None if self.torch_centigib is None else self.torch_centigib * GiB // 100

    @property
    def uses_torch_figure(self) -> bool:
        return self.torch_bytes is not None and self.torch_bytes <= self.smi_bytes

    @property
    def total_bytes(self) -> int:
        """The memory a plan for this card budgets: torch's total capacity where known (what a process can
        allocate into), capped at nvidia-smi's total; else nvidia-smi's total."""
        return self.torch_bytes if self.uses_torch_figure else self.smi_bytes  # type: ignore[return-value]

    @property
    def nominal(self) -> bool:
        return self.memory_source.startswith(NOMINAL)

    @property
    def memory_basis(self) -> str:
        """Which figure the plan budgets and why, in one short line."""
        size = format_bytes(self.total_bytes)
        smi = "nominal size" if self.nominal else f"nvidia-smi total {self.smi_mib:,} MiB"
        if self.uses_torch_figure:
            return f"{size}, torch's total capacity for the card (below its {smi}; catalog)"
        if self.torch_bytes is not None:
            return f"{size}, the card's {smi} (torch's printed capacity is not below it; catalog)"
        return f"{size}, the card's {smi} (torch's capacity not in the catalog)"


def _card(
    name: str,
    memory: tuple[int, str],
    cc: tuple[int, int],
    gb_per_s: float | None = None,
    tflops: float | None = None,
    source: str = "",
    torch: tuple[int, str] | None = None,
) -> CardSpec:
    return CardSpec(
        name,
        memory[0],
        cc,
        None if gb_per_s is None else int(gb_per_s * GB_PER_S),
        None if tflops is None else int(tflops * TFLOPS),
        source,
        memory[1],
        None if torch is None else torch[0],
        "" if torch is None else torch[1],
    )


def _smi(mib: int, source: str) -> tuple[int, str]:
    """nvidia-smi's total for the card and the page it was read from."""
    return mib, source


def _nominal(gib: int) -> tuple[int, str]:
    """No published nvidia-smi output found: the nominal size."""
    return gib * 1024, f"{NOMINAL} {gib} GiB (no nvidia-smi output found)"


def _torch(gib_hundredths: int, source: str) -> tuple[int, str]:
    """torch's "total capacity" (GiB x 100, as its OOM message prints it) and the page it was read from."""
    return gib_hundredths, source


GH = "https://github.com/"
MODAL = (
    "https://thundergolfer.com/blog/nvidia-gpu-memory-capacity (nvidia-smi totals of Modal's GPUs; also "
    + GH
    + "modal-labs/modal-client/pull/2797)"
)

# GeForce tensor rates: the whitepapers list FP16 tensor TFLOPS "with FP16 accumulate" and, at half that rate on
# GeForce cards, "with FP32 accumulate"; the latter is the one given. Pascal (GTX 1080 Ti, P40) has no tensor cores
# and runs FP16 at a small fraction of FP32: no figure is given.
CARDS: tuple[CardSpec, ...] = (
    _card("GTX 1080 Ti", _nominal(11), (6, 1), 484, None, "NVIDIA GeForce GTX 1080 Ti specifications"),
    _card("Tesla P40", _nominal(24), (6, 1), 346, None, "NVIDIA Tesla P40 datasheet"),
    _card("Tesla P100", _nominal(16), (6, 0), 732, 18.7, "NVIDIA Tesla P100 PCIe datasheet (FP16, no tensor cores)"),
    _card(
        "Tesla V100 16GB",
        _nominal(16),
        (7, 0),
        900,
        112,
        "NVIDIA Tesla V100 datasheet (PCIe; SXM2: 125 TFLOPS)",
        torch=_torch(1578, GH + "kchengiva/Shift-GCN/issues/34 (16G V100: 15.78 GiB total capacity)"),
    ),
    _card(
        "Tesla V100",
        _smi(
            32768,
            GH + "Wan-Video/Wan2.1/issues/5 (Tesla V100-SXM2, 32768MiB); other outputs show 32510MiB (no URL at hand)",
        ),
        (7, 0),
        900,
        112,
        "NVIDIA Tesla V100 datasheet (PCIe; SXM2: 125 TFLOPS)",
        torch=_torch(3174, GH + "liucongg/ChatGLM-Finetuning/issues/73 (V100 32GB: 31.74 GiB total capacity)"),
    ),
    _card(
        "Tesla T4",
        _smi(15360, MODAL + "; with ECC on T4s show 15109MiB (no URL at hand), below torch's figure either way"),
        (7, 5),
        320,
        65,
        "NVIDIA T4 datasheet",
        torch=_torch(
            1456,
            GH
            + "Zheng-Chong/CatVTON/issues/133 (Tesla T4 on GCP: 14.56 GiB; a Colab T4 shows 14.74 GiB, "
            + GH
            + "zai-org/CogVideo/issues/741)",
        ),
    ),
    _card("RTX 2080 Ti", _nominal(11), (7, 5), 616, None, "NVIDIA GeForce RTX 2080 Ti specifications"),
    _card("TITAN RTX", _nominal(24), (7, 5), 672, None, "NVIDIA TITAN RTX specifications"),
    _card("RTX 3060", _nominal(12), (8, 6), 360, None, "NVIDIA GeForce RTX 3060 specifications"),
    _card(
        "RTX 3070",
        _nominal(8),
        (8, 6),
        448,
        None,
        "NVIDIA GeForce RTX 3070 specifications",
        torch=_torch(778, GH + "akshitac8/OW-DETR/issues/46 (RTX 3070: 7.78 GiB total capacity)"),
    ),
    _card(
        "RTX 3080",
        _nominal(10),
        (8, 6),
        760,
        None,
        "NVIDIA GeForce RTX 3080 specifications",
        torch=_torch(978, GH + "zai-org/CogVideo/issues/34 (RTX 3080: 9.78 GiB total capacity)"),
    ),
    _card("RTX 3080 12GB", _nominal(12), (8, 6), 912, None, "NVIDIA GeForce RTX 3080 specifications"),
    _card("RTX 3080 Ti", _nominal(12), (8, 6), 912, None, "NVIDIA GeForce RTX 3080 Ti specifications"),
    _card(
        "RTX 3090",
        _smi(
            24265,
            GH + "NVIDIA/k8s-device-plugin/issues/263 (nvidia-smi -q, FB Memory Usage Total 24265 MiB); other "
            "drivers show 24576MiB, " + GH + "noonghunna/club-3090/issues/1128: the smaller is kept",
        ),
        (8, 6),
        936,
        71,
        "NVIDIA GeForce RTX 3090 specifications; NVIDIA Ampere GA102 whitepaper",
        torch=_torch(2370, GH + "GaoLii/DSP/issues/10 (two 3090s: 23.70 GiB total capacity)"),
    ),
    _card(
        "RTX 3090 Ti",
        _smi(24564, GH + "noonghunna/club-3090/issues/353 (rig report: RTX 3090 Ti, 24564 MiB)"),
        (8, 6),
        1008,
        None,
        "NVIDIA GeForce RTX 3090 Ti specifications",
    ),
    _card(
        "RTX A4000",
        _nominal(16),
        (8, 6),
        448,
        None,
        "NVIDIA RTX A4000 datasheet",
        torch=_torch(1561, GH + "DengKaiCQ/VGGT-Long/issues/6 (RTX A4000: a total capacity of 15.61 GiB)"),
    ),
    _card("RTX A5000", _nominal(24), (8, 6), 768, None, "NVIDIA RTX A5000 datasheet"),
    _card("RTX A6000", _nominal(48), (8, 6), 768, 154.8, "NVIDIA RTX A6000 datasheet (309.7 TFLOPS with sparsity)"),
    _card(
        "A10",
        _smi(23028, MODAL + "; NVML total 24146608128 bytes: " + GH + "mayooot/detect-gpu/issues/3"),
        (8, 6),
        600,
        125,
        "NVIDIA A10 datasheet",
    ),
    _card(  # an AWS part: NVIDIA publishes no datasheet for it
        "A10G", _smi(23028, GH + "NVIDIA/DCGM/issues/232 (NVIDIA A10G, 23028MiB)"), (8, 6)
    ),
    _card("A30", _nominal(24), (8, 0), 933, 165, "NVIDIA A30 datasheet"),
    _card("A40", _nominal(48), (8, 6), 696, 149.7, "NVIDIA A40 datasheet"),
    _card(
        "A100 40GB",
        _smi(
            40960,
            GH + "bottlerocket-os/bottlerocket-core-kit/pull/834 (A100-SXM4-40GB, 40960MiB); " + MODAL + "; other "
            "outputs show 40536MiB (no URL at hand)",
        ),
        (8, 0),
        1555,
        312,
        "NVIDIA A100 datasheet",
        torch=_torch(
            3939,
            GH + "bottlerocket-os/bottlerocket/pull/3873 (deviceQuery on an A100-SXM4-40GB: 42,298,834,944 bytes of "
            "global memory, what CUDA exposes and torch reports: 39.39 GiB)",
        ),
    ),
    _card(
        "A100",
        _smi(81920, GH + "NVIDIA/mig-parted/issues/31 (A100-SXM4-80GB, 81920MiB); " + MODAL),
        (8, 0),
        1935,
        312,
        "NVIDIA A100 datasheet (80GB PCIe; SXM: 2,039 GB/s)",
        torch=_torch(7925, GH + "levihsu/OOTDiffusion/issues/235 (A100: 79.25 GiB total capacity)"),
    ),
    _card(
        "A800",
        _smi(
            81920,
            GH
            + "vllm-project/vllm/issues/41519 (A800 80GB PCIe, 81920MiB); "
            + GH
            + "dexmal/dexbotic/issues/41 (A800-SXM4-80GB, 81920MiB)",
        ),
        (8, 0),
        1935,
        312,
        "NVIDIA A800 datasheet (80GB PCIe; SXM: 2,039 GB/s)",
    ),
    _card("RTX 4060 Ti", _nominal(8), (8, 9), 288, None, "NVIDIA GeForce RTX 4060 Ti specifications"),
    _card("RTX 4060 Ti 16GB", _nominal(16), (8, 9), 288, None, "NVIDIA GeForce RTX 4060 Ti specifications"),
    _card("RTX 4070", _nominal(12), (8, 9), 504, None, "NVIDIA GeForce RTX 4070 specifications"),
    _card("RTX 4070 Ti", _nominal(12), (8, 9), 504, None, "NVIDIA GeForce RTX 4070 Ti specifications"),
    _card("RTX 4080", _nominal(16), (8, 9), 716.8, None, "NVIDIA GeForce RTX 4080 specifications"),
    _card(
        "RTX 4090",
        _smi(24564, GH + "RLinf/RLinf/issues/255 (NVIDIA GeForce RTX 4090, 24564MiB)"),
        (8, 9),
        1008,
        165.2,
        "NVIDIA GeForce RTX 4090 specifications; NVIDIA Ada Lovelace whitepaper",
        torch=_torch(
            2364,
            GH
            + "3DTopia/Phidias-Diffusion/issues/8 (4090: 23.64 GiB; another shows 23.68 GiB, "
            + GH
            + "zai-org/CogVideo/issues/36: the smaller is kept)",
        ),
    ),
    _card("RTX 6000 Ada", _nominal(48), (8, 9), 960, None, "NVIDIA RTX 6000 Ada Generation datasheet"),
    _card("L4", _smi(23034, MODAL), (8, 9), 300, 121, "NVIDIA L4 datasheet (242 TFLOPS with sparsity)"),
    _card("L40", _nominal(48), (8, 9), 864, 181, "NVIDIA L40 datasheet (362 TFLOPS with sparsity)"),
    _card(
        "L40S",
        _smi(46068, GH + "akash-network/provider-configs/pull/99 (nvidia-smi --query-gpu memory.total 46068 MiB)"),
        (8, 9),
        864,
        362,
        "NVIDIA L40S datasheet (733 TFLOPS with sparsity)",
    ),
    _card(
        "RTX 5090",
        _smi(32607, GH + "noonghunna/club-3090/issues/1261 (NVIDIA GeForce RTX 5090, 32607MiB)"),
        (12, 0),
        1792,
        None,
        "NVIDIA GeForce RTX 5090 specifications",
        torch=_torch(3137, GH + "Wan-Video/Wan2.1/issues/465 (5090: 31.37 GiB total capacity)"),
    ),
    _card(
        "H100",
        _smi(81559, GH + "NVIDIA/nccl/issues/1264 (NVIDIA H100 80GB HBM3, 81559MiB); " + MODAL),
        (9, 0),
        2000,
        756,
        "NVIDIA H100 datasheet (PCIe; SXM: 3,350 GB/s, 989 TFLOPS)",
        torch=_torch(
            7922,
            GH + "vllm-project/vllm/pull/10511 (vLLM logs total_gpu_memory 79.22GiB on an H100: "
            "torch.cuda.mem_get_info's total, what torch's OOM message prints as its total capacity)",
        ),
    ),
    _card("H800", _nominal(80), (9, 0), 2000, 756, "NVIDIA H800 datasheet (PCIe)"),
    _card("H200", _smi(143771, MODAL), (9, 0), 4800, 835, "NVIDIA H200 datasheet (NVL; SXM: 989 TFLOPS)"),
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
