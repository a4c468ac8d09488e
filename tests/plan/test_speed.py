"""The speed prediction (oneke_plan/plan/speed.py) against hand arithmetic on OneKE's config and the profile's own
bytes: bytes read per decoding step over each card's bandwidth, prefill FLOPs over its throughput, PCIe for offloaded
weights, and "unknown" (never a number) where a rate is not known."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from oneke_plan import api
from oneke_plan.core.errors import DoesNotFit
from oneke_plan.core.sizes import GiB
from oneke_plan.plan.catalog import CARDS, find_card
from oneke_plan.plan.plans import PlanResult
from oneke_plan.plan.speed import (
    DISK_BYTES_PER_SECOND,
    PCIE_BYTES_PER_SECOND,
    DeviceRates,
    DeviceSpeed,
    offload_cost,
)

# OneKE (oneke_plan/data/oneke_config.json; /work/shared/oneke/README.md): LLaMA-2-13B, 55,296-token vocabulary.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, HEAD_DIM, VOCAB = 5120, 13824, 40, 40, 128, 55296
LAYER_PARAMETERS = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN  # q k v o, gate up down, 2 norms
EMBEDDING_BYTES = VOCAB * HIDDEN * 2  # bf16


def oneke(*gpus: str, **kwargs) -> PlanResult:  # type: ignore[no-untyped-def]
    return api.plan("oneke", list(gpus), cpu_memory=kwargs.pop("cpu_memory", 0), **kwargs)


def test_every_catalog_figure_has_a_source() -> None:
    for card in CARDS:
        if card.bandwidth_bytes_per_second or card.flops_per_second:
            assert card.source, card.name
        else:
            assert card.source == "", card.name  # no figure, nothing to cite


def test_decode_is_the_bytes_each_card_reads_over_its_bandwidth() -> None:
    """RTX 3090 + RTX 3060 (936 and 360 GB/s, vendor figures): GPU 0 holds the embedding table (a lookup, not
    read) and layers 0-31 (of 23.70 GiB: nvidia-smi's 24,265 MiB, catalog.py), GPU 1 the rest and the lm_head; each
    reads its weights and its KV cache per step."""
    result = oneke("RTX 3090", "RTX 3060", tflops=["1=25"])
    profile = result.profile
    est = profile.estimate
    read = {
        0: est[0].weights_bytes - EMBEDDING_BYTES + est[0].kv_cache_bytes,
        1: est[1].weights_bytes + est[1].kv_cache_bytes,
    }
    step = read[0] / 936e9 + read[1] / 360e9
    speed = profile.speed
    assert speed is not None
    assert speed["devices"][0]["decode_read_bytes"] == read[0]
    assert speed["devices"][1]["decode_read_bytes"] == read[1]
    assert speed["decode_step_seconds"] == pytest.approx(step, rel=1e-5)
    assert speed["decode_tokens_per_second"] == pytest.approx(4 / step, rel=1e-5)  # batch 4
    # prefill: 2 FLOPs a parameter a token, plus causal attention, for batch 4 x 512 tokens; lm_head on the last
    tokens = 4 * 512
    attention = 2 * HEADS * HEAD_DIM * 512 * 512 * 4
    layers_on_0 = 32
    flops0 = layers_on_0 * (2 * LAYER_PARAMETERS * tokens + attention)
    final_norm = 2 * HIDDEN * tokens  # model.norm's weights count as parameters too, per token (GPU 1)
    flops1 = (LAYERS - layers_on_0) * (2 * LAYER_PARAMETERS * tokens + attention) + final_norm + 2 * VOCAB * HIDDEN * 4
    assert speed["devices"][0]["prefill_flops"] == flops0
    assert speed["devices"][1]["prefill_flops"] == flops1
    prefill = flops0 / 71e12 + flops1 / 25e12  # both compute-bound at these sizes
    assert speed["prefill_seconds"] == pytest.approx(prefill, rel=1e-5)
    assert speed["records_per_hour"] == pytest.approx(3600 * 4 / (prefill + 512 * step), rel=1e-5)
    assert speed["unknown"] == []


def test_a_card_described_by_size_has_no_speed_and_says_why() -> None:
    speed = oneke("24GiB", "12GiB").profile.speed
    assert speed is not None
    for key in ("decode_tokens_per_second", "prefill_tokens_per_second", "records_per_hour"):
        assert speed[key] is None
    assert any("GPU 0" in line and "--bandwidth 0=GB/s" in line for line in speed["unknown"])
    assert any("GPU 1" in line and "--tflops 1=" in line for line in speed["unknown"])


def test_the_user_can_give_the_rates() -> None:
    """--bandwidth for every GPU and for one; the catalog's figure is overridden, the source says by what."""
    speed = oneke("RTX 3090", "12GiB", bandwidth=["500", "1=250"], tflops="100").profile.speed
    assert speed is not None
    assert speed["devices"][0]["bandwidth_bytes_per_second"] == 500 * 10**9
    assert speed["devices"][0]["bandwidth_source"] == "--bandwidth"
    assert speed["devices"][1]["bandwidth_bytes_per_second"] == 250 * 10**9
    assert speed["devices"][1]["bandwidth_source"] == "--bandwidth 1=..."
    assert speed["devices"][1]["flops_per_second"] == 100 * 10**12
    assert speed["decode_tokens_per_second"] is not None and speed["unknown"] == []


def test_cpu_offloaded_weights_cross_pcie_every_step() -> None:
    """OneKE on one RTX 4080 (16 GiB) with the rest in host memory: the CPU's weights are priced at the assumed
    PCIe rate, GPU 0 reads its own weights and every layer's KV cache (offloaded layers run there)."""
    profile = oneke("RTX 4080", cpu_memory="32GiB").profile
    est, speed = profile.estimate, profile.speed
    assert speed is not None and "cpu" in est
    cpu = speed["devices"]["cpu"]
    assert cpu["decode_read_bytes"] == est["cpu"].weights_bytes
    assert cpu["bandwidth_bytes_per_second"] == PCIE_BYTES_PER_SECOND and "PCIe" in cpu["bandwidth_source"]
    card = find_card("RTX 4080")
    assert card is not None and card.bandwidth_bytes_per_second
    gpu_read = est[0].weights_bytes - EMBEDDING_BYTES + est[0].kv_cache_bytes
    step = gpu_read / card.bandwidth_bytes_per_second + est["cpu"].weights_bytes / PCIE_BYTES_PER_SECOND
    assert speed["decode_step_seconds"] == pytest.approx(step, rel=1e-5)


def test_tied_embeddings_are_read_by_the_lm_head(tiny_model_dir: Path, tiny_tied_dir: Path) -> None:
    """On the CPU (bandwidth given): an untied model's decoding step skips the embedding table; a tied one reads
    it, as its lm_head. The embedding bytes by hand: vocab x hidden x 2 (bf16) from config.json."""
    import json

    for directory, tied in ((tiny_model_dir, False), (tiny_tied_dir, True)):
        config = json.loads((directory / "config.json").read_text())
        embedding = config["vocab_size"] * config["hidden_size"] * 2
        profile = api.plan(directory, cpu_memory="4GiB", max_input_tokens=16, max_new_tokens=4, batch_size=1,
                           bandwidth="cpu=10").profile  # fmt: skip
        est, speed = profile.estimate["cpu"], profile.speed
        assert speed is not None
        skipped = 0 if tied else embedding
        assert speed["devices"]["cpu"]["decode_read_bytes"] == est.weights_bytes - skipped + est.kv_cache_bytes
        assert speed["decode_step_seconds"] == pytest.approx(speed["devices"]["cpu"]["decode_read_bytes"] / 10e9)
        assert speed["prefill_tokens_per_second"] is None  # no --tflops cpu=: unknown
        assert any("--tflops cpu=" in line for line in speed["unknown"])


def test_replicas_add_up() -> None:
    """Two bf16 copies on four RTX 3090s, on 3 nodes: every copy's records per hour, times the nodes."""
    profile = api.plan("oneke", ["RTX 3090"] * 4, cpu_memory=0, replicas="auto", nodes=3).profile
    assert profile.speed is not None and len(profile.replicas) == 2
    each = [r.speed["records_per_hour"] for r in profile.replicas if r.speed]
    assert profile.speed["copies"] == 6
    assert profile.speed["records_per_hour"] == pytest.approx(3 * sum(each), rel=1e-5)


def test_disk_offload_slowdown_by_hand() -> None:
    """A GPU reading 10 GiB at 900 GB/s a step, 2 GiB read from disk and then across PCIe: the slowdown against all
    12 GiB read from the GPU's memory; unknown where the GPU's bandwidth is (the copy's time is still known)."""
    gpu, disk = 10 * GiB, 2 * GiB
    disk_rate = int(1 / (1 / DISK_BYTES_PER_SECOND + 1 / PCIE_BYTES_PER_SECOND))  # the prediction's one rate
    on_disk = DeviceSpeed("disk", disk, 0, 0, disk, DeviceRates(disk_rate), disk / disk_rate, None)
    step = gpu / 900e9 + disk / DISK_BYTES_PER_SECOND + disk / PCIE_BYTES_PER_SECOND
    known = DeviceSpeed(0, gpu, 0, 0, gpu, DeviceRates(900 * 10**9), gpu / 900e9, None)
    cost = offload_cost([known, on_disk], 0, gpu / 900e9 + disk / disk_rate)
    assert cost is not None and cost.slowdown == pytest.approx(step / ((gpu + disk) / 900e9), rel=1e-6)
    assert cost.bytes_by_device == {"disk": disk} and cost.unknown_devices == ()
    assert offload_cost([known], 0, gpu / 900e9) is None  # nothing offloaded
    unknown = DeviceSpeed(0, gpu, 0, 0, gpu, DeviceRates(), None, None)
    cost = offload_cost([unknown, on_disk], 0, None)
    assert cost is not None and cost.slowdown is None and cost.unknown_devices == (0,)
    assert cost.link_seconds == pytest.approx(disk / DISK_BYTES_PER_SECOND + disk / PCIE_BYTES_PER_SECOND, rel=1e-6)


def test_disk_offload_without_gpus_slowdown_by_hand() -> None:
    """No GPU: the CPU runs the model, reading 10 GiB from its memory at 20 GB/s a step and 2 GiB from disk (NVMe,
    no PCIe leg): the slowdown against all 12 GiB read from the CPU's memory. oneke-plan's "what would fit" line for
    a CPU-only machine says the same, and, without the CPU's bandwidth, which flag gives it (it once said "no
    slower")."""
    cpu, disk = 10 * GiB, 2 * GiB
    on_disk = DeviceSpeed("disk", disk, 0, 0, disk, DeviceRates(DISK_BYTES_PER_SECOND), disk / 3e9, None)
    host = DeviceSpeed("cpu", cpu, 0, 0, cpu, DeviceRates(20 * 10**9), cpu / 20e9, None)
    cost = offload_cost([host, on_disk], "cpu", cpu / 20e9 + disk / 3e9)
    assert cost is not None and cost.bytes_by_device == {"disk": disk}
    assert cost.slowdown == pytest.approx((cpu / 20e9 + disk / 3e9) / ((cpu + disk) / 20e9), rel=1e-6)
    with pytest.raises(DoesNotFit) as unknown:
        api.plan("oneke", cpu_memory="16GiB")
    assert "disk offload: --offload-dir DIR (slower by a factor not known without" in str(unknown.value)
    assert "--bandwidth cpu=GB/s" in str(unknown.value)
    with pytest.raises(DoesNotFit) as known:
        api.plan("oneke", cpu_memory="16GiB", bandwidth="cpu=20")
    assert re.search(r"disk offload: --offload-dir DIR \(about \d+x slower\)", str(known.value))
