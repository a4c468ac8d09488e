"""Placement behaviour of the Planner: capacities, tied weights, GQA, offload, does-not-fit, balanced, solving,
dtype choice, agreement with accelerate, and the headline claim against accelerate's own placement."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oneke_plan.errors import DoesNotFit
from oneke_plan.fit import device_owner, estimate
from oneke_plan.inventory import build_inventory
from oneke_plan.memory import Quantization, Workload
from oneke_plan.model_source import resolve_model
from oneke_plan.planner import Planner, PlanSettings
from oneke_plan.sizes import GiB, parse_size

DEFAULT = PlanSettings(Workload(512, 512, 4))


@pytest.fixture(scope="module", autouse=True)
def _quiet_accelerate():
    # accelerate logs "Device N is not available" when a device_map names GPUs this machine lacks.
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def oneke() -> Planner:
    return Planner(resolve_model("oneke"))


def gpus(*specs: str, cpu: str = "0", offload_dir: str | None = None):
    return build_inventory(list(specs), cpu_memory=cpu, offload_dir=offload_dir)


def _assignment_from_device_map(planner: Planner, device_map: dict) -> dict:
    return {b.name: device_owner(b.name, device_map) for b in planner.layout.blocks}


# -- capacities ---------------------------------------------------------------------------------------------------
FITTING = [
    (("24GiB", "12GiB"), DEFAULT),
    (("24GiB", "12GiB"), replace(DEFAULT, strategy="balanced")),
    (("24GiB", "24GiB"), DEFAULT),
    (("16GiB",), replace(DEFAULT, quant=Quantization("8bit"), workload=Workload(512, 512, 1))),
    (("12GiB",), replace(DEFAULT, quant=Quantization("4bit"), workload=Workload(512, 512, 2))),
    (("12GiB",), replace(DEFAULT, quant=Quantization("4bit", "fp4", False), workload=Workload(256, 256, 1))),
    (("24GiB", "12GiB", "8GiB"), replace(DEFAULT, workload=Workload(1024, 512, 8))),
    (("RTX 3090", "RTX 3060"), replace(DEFAULT, workload=Workload(1024, 1024, 2), eager_attention=True)),
]


@pytest.mark.parametrize("specs, settings", FITTING, ids=lambda v: "+".join(v) if isinstance(v, tuple) else None)
def test_every_device_estimate_within_capacity(oneke: Planner, specs, settings: PlanSettings) -> None:
    inventory = gpus(*specs)
    plan = oneke.plan(inventory, settings)
    assert plan.fits, plan.log
    capacity = {g.index: g.total_bytes for g in inventory.gpus}
    assert set(plan.placement.estimates) <= set(capacity)
    for device, est in plan.placement.estimates.items():
        assert est.total_bytes <= capacity[device], (device, est.total_bytes, capacity[device])
        assert est.reserve_bytes == settings.reserve_bytes
    # every block placed exactly once, and the weights add up to the whole model
    assert set(plan.placement.assignment) == {b.name for b in oneke.layout.blocks}
    assert sum(e.weights_bytes for e in plan.placement.estimates.values()) == sum(c.weights_bytes for c in plan.costs)
    # the profile carries the same numbers
    profile = oneke.profile(plan, inventory)
    for device, est in plan.placement.estimates.items():
        assert profile.estimate[device]["total_bytes"] == est.total_bytes <= capacity[device]


# -- tied weights -------------------------------------------------------------------------------------------------
def test_tied_tiny_model_keeps_lm_head_with_embeddings(tiny_tied_dir: Path) -> None:
    planner = Planner(resolve_model(str(tiny_tied_dir)))
    lm_head = next(b for b in planner.layout.blocks if b.kind == "lm_head")
    assert lm_head.tied_to == "model.embed_tokens"
    inventory = gpus("200KiB", "200KiB", "1MiB")
    plan = planner.plan(inventory, PlanSettings(Workload(8, 8, 1), reserve_bytes=0))
    device_map = planner.device_map(plan)
    assert len(set(device_map.values())) >= 2  # the model is really split
    assert device_owner("lm_head", device_map) == device_owner("model.embed_tokens", device_map)
    # lm_head comes last in model order, so without the tie it would not be on the first device
    assert device_owner("model.norm", device_map) != device_owner("model.embed_tokens", device_map)


def test_tied_oneke_config_keeps_lm_head_with_embeddings(oneke: Planner, tmp_path: Path) -> None:
    config = dict(oneke.source.config, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tied = Planner(resolve_model(str(tmp_path)))
    assert tied.layout.parameter_count == oneke.layout.parameter_count - 55_296 * 5_120
    inventory = gpus("24GiB", "12GiB")
    untied_map = oneke.device_map(oneke.plan(inventory, DEFAULT))
    tied_map = tied.device_map(tied.plan(inventory, DEFAULT))
    assert device_owner("lm_head", untied_map) == 1 != device_owner("model.embed_tokens", untied_map)
    assert device_owner("lm_head", tied_map) == device_owner("model.embed_tokens", tied_map) == 0
    assert device_owner("model.layers.39", tied_map) == 1


# -- GQA ----------------------------------------------------------------------------------------------------------
def test_gqa_plans_less_kv_than_mha(tiny_model_dir: Path, tiny_gqa_dir: Path) -> None:
    inventory = gpus("2GiB")
    settings = PlanSettings(Workload(100, 50, 3))
    mha = Planner(resolve_model(str(tiny_model_dir))).plan(inventory, settings)
    gqa = Planner(resolve_model(str(tiny_gqa_dir))).plan(inventory, settings)
    mha_kv = sum(e.kv_cache_bytes for e in mha.placement.estimates.values())
    gqa_kv = sum(e.kv_cache_bytes for e in gqa.placement.estimates.values())
    assert mha.fits and gqa.fits
    assert 0 < gqa_kv < mha_kv
    assert gqa_kv * 2 == mha_kv  # 2 KV heads instead of 4
    # and the k/v projections shrink with it, so the GQA model's weights are smaller too
    assert gqa.placement.estimates[0].weights_bytes < mha.placement.estimates[0].weights_bytes


# -- CPU and disk offload -----------------------------------------------------------------------------------------
def test_cpu_and_disk_offload(oneke: Planner, tmp_path: Path) -> None:
    inventory = gpus("8GiB", cpu="8GiB", offload_dir=str(tmp_path / "offload"))
    plan = oneke.plan(inventory, DEFAULT)
    assert plan.fits
    profile = oneke.profile(plan, inventory)
    devices = set(profile.device_map.values())
    assert {0, "cpu", "disk"} <= devices
    assert profile.offload_dir == str(tmp_path / "offload")
    est = plan.placement.estimates
    # offloaded layers run on GPU 0, so every layer's KV cache is charged there and none to cpu/disk
    per_layer_kv = next(c.kv_cache_bytes for c in plan.costs if c.kind == "layer")
    assert est[0].kv_cache_bytes == per_layer_kv * oneke.layout.num_layers
    assert est["cpu"].kv_cache_bytes == est["disk"].kv_cache_bytes == 0
    assert est[0].total_bytes <= 8 * GiB
    assert est["cpu"].total_bytes <= 8 * GiB
    # GPU 0 also holds a staging copy of the largest offloaded block in its workspace
    largest_offloaded = max(c.weights_bytes for c in plan.costs if plan.placement.assignment[c.name] != 0)
    assert est[0].workspace_bytes >= largest_offloaded


# -- does not fit -------------------------------------------------------------------------------------------------
def test_does_not_fit_lists_devices_and_suggests_what_fits(oneke: Planner) -> None:
    inventory = gpus("10GiB", "6GiB")
    plan = oneke.plan(inventory, DEFAULT)
    assert not plan.fits
    with pytest.raises(DoesNotFit) as info:
        oneke.profile(plan, inventory)
    message = str(info.value)
    assert message.startswith("does not fit")
    assert "GPU 0: " in message and "of 10.00 GiB" in message
    assert "GPU 1: " in message and "of 6.00 GiB" in message
    for mode in ("8bit", "4bit"):
        fits = oneke.plan(inventory, replace(DEFAULT, quant=Quantization(mode))).fits
        assert (f"--quantize {mode}: fits" in message) == fits, mode
    assert oneke.plan(inventory, replace(DEFAULT, quant=Quantization("4bit"))).fits  # so 4-bit must be suggested
    assert "--quantize 4bit: fits" in message


def test_does_not_fit_suggests_context_that_really_fits(oneke: Planner) -> None:
    inventory = gpus("24GiB", "12GiB")
    settings = replace(DEFAULT, workload=Workload(3000, 512, 8))
    plan = oneke.plan(inventory, settings)
    assert not plan.fits
    message = oneke.does_not_fit_message(plan, inventory)
    line = next(x for x in message.splitlines() if "--max-input-tokens" in x)
    suggested = int(line.split("--max-input-tokens")[1].split()[0])
    assert oneke.plan(
        inventory, replace(settings, workload=replace(settings.workload, max_input_tokens=suggested))
    ).fits


# -- balanced -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("specs", [("24GiB", "12GiB"), ("24GiB", "12GiB", "8GiB"), ("16GiB", "16GiB")])
def test_balanced_spreads_by_memory(oneke: Planner, specs) -> None:
    inventory = gpus(*specs)
    settings = replace(DEFAULT, strategy="balanced")
    plan = oneke.plan(inventory, settings)
    assert plan.fits
    capacity = {g.index: g.total_bytes for g in inventory.gpus}
    used = {d: e.total_bytes / capacity[d] for d, e in plan.placement.estimates.items()}
    assert set(used) == set(capacity)  # every GPU gets layers
    layer = next(c for c in plan.costs if c.kind == "layer")
    one_layer = max((layer.weights_bytes + layer.kv_cache_bytes) / cap for cap in capacity.values())
    assert max(used.values()) - min(used.values()) <= one_layer, used
    # and it is more even than filling in order
    filled = oneke.plan(inventory, DEFAULT).placement.estimates
    fill_used = [filled[d].total_bytes / capacity[d] if d in filled else 0.0 for d in capacity]
    assert max(used.values()) - min(used.values()) < max(fill_used) - min(fill_used)


# -- solving ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "what, specs, settings",
    [
        ("max_input_tokens", ("24GiB", "12GiB"), DEFAULT),
        ("max_input_tokens", ("12GiB",), replace(DEFAULT, quant=Quantization("4bit"))),
        ("batch_size", ("24GiB", "12GiB"), DEFAULT),
        ("batch_size", ("24GiB", "24GiB"), replace(DEFAULT, workload=Workload(1024, 512, 1))),
    ],
)
def test_largest_is_the_boundary(oneke: Planner, what: str, specs, settings: PlanSettings) -> None:
    inventory = gpus(*specs)
    best = oneke.largest(inventory, settings, what)
    assert best >= 1

    def fits(value: int) -> bool:
        return oneke.plan(inventory, replace(settings, workload=replace(settings.workload, **{what: value}))).fits

    assert fits(best)
    assert not fits(best + 1)


def test_largest_is_zero_when_nothing_fits(oneke: Planner) -> None:
    inventory = gpus("8GiB")
    assert oneke.largest(inventory, DEFAULT, "max_input_tokens") == 0
    assert not oneke.plan(inventory, replace(DEFAULT, workload=Workload(1, 512, 4))).fits


# -- dtype --------------------------------------------------------------------------------------------------------
def test_bf16_falls_back_to_fp16_with_warning_on_turing(oneke: Planner) -> None:
    inventory = gpus("Tesla T4")
    assert inventory.gpus[0].compute_capability == (7, 5)
    settings = replace(DEFAULT, quant=Quantization("4bit"), workload=Workload(512, 512, 1))
    plan = oneke.plan(inventory, settings)
    assert plan.dtype == "float16"
    warning = [line for line in plan.log if line.startswith("warning")]
    assert warning and "Tesla T4" in warning[0] and "bf16" in warning[0]
    assert oneke.profile(plan, inventory).notes == warning
    # an Ampere card keeps bf16, without a warning
    ampere = oneke.plan(gpus("RTX 3090"), settings)
    assert ampere.dtype == "bfloat16"
    assert not [line for line in ampere.log if line.startswith("warning")]


# -- accelerate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "specs, settings, offload",
    [
        (("24GiB", "12GiB"), DEFAULT, False),
        (("24GiB", "12GiB"), replace(DEFAULT, strategy="balanced"), False),
        (("24GiB", "12GiB", "8GiB"), DEFAULT, False),
        (("12GiB",), replace(DEFAULT, quant=Quantization("4bit")), False),
        (("8GiB",), DEFAULT, True),
    ],
)
def test_device_map_agrees_with_placement(oneke: Planner, tmp_path: Path, specs, settings, offload: bool) -> None:
    inventory = gpus(*specs, cpu="8GiB" if offload else "0", offload_dir=str(tmp_path) if offload else None)
    plan = oneke.plan(inventory, settings)
    assert plan.fits
    device_map = oneke.device_map(plan)
    assert _assignment_from_device_map(oneke, device_map) == plan.placement.assignment
    # every module key names a real module of LlamaForCausalLM
    modules = dict(oneke.model.named_modules())
    assert all(key in modules for key in device_map)


def test_accelerate_alone_overfills_gpu0_where_the_plan_fits(oneke: Planner) -> None:
    """The headline claim: accelerate's infer_auto_device_map with the cards' full sizes as max_memory counts
    weights only; add the KV cache, workspace and reserve the workload needs, and GPU 0 overflows. The plan
    for the same machine fits."""
    from accelerate import infer_auto_device_map

    inventory = gpus("24GiB", "12GiB")
    plan = oneke.plan(inventory, DEFAULT)
    assert plan.fits
    accelerate_map = infer_auto_device_map(
        oneke.model,
        max_memory={0: parse_size("24GiB"), 1: parse_size("12GiB")},
        no_split_module_classes=list(oneke.layout.no_split_module_classes),
        dtype=torch.bfloat16,
    )
    assignment = _assignment_from_device_map(oneke, accelerate_map)
    theirs = estimate(assignment, plan.costs, plan.slots)
    ours = plan.placement.estimates
    assert theirs[0].total_bytes > 24 * GiB, theirs[0]
    assert ours[0].total_bytes <= 24 * GiB
    assert ours[1].total_bytes <= 12 * GiB
    # accelerate puts more layers on GPU 0 than the plan does
    layers_on_0 = [b for b, d in assignment.items() if d == 0 and b.startswith("model.layers.")]
    planned_on_0 = [b for b, d in plan.placement.assignment.items() if d == 0 and b.startswith("model.layers.")]
    assert len(layers_on_0) > len(planned_on_0)


def test_quantized_plan_prices_offloaded_blocks_unquantized() -> None:
    """transformers keeps bitsandbytes models' CPU-offloaded modules in the compute dtype when GPUs are present."""
    from oneke_plan.fit import block_weights_bytes
    from oneke_plan.inventory import Gpu, Inventory
    from oneke_plan.memory import Quantization, Workload
    from oneke_plan.model_source import resolve_model
    from oneke_plan.planner import Planner, PlanSettings

    planner = Planner(resolve_model("oneke"))
    settings = PlanSettings(Workload(256, 256, 1), quant=Quantization("4bit"))
    gpu = Gpu(0, "GPU 0", 6 * 2**30, 6 * 2**30, (8, 6))
    plan = planner.plan(Inventory((gpu,), 64 * 2**30), settings)
    assert plan.fits
    blocks = {b.name: b for b in planner.layout.blocks}
    on_cpu = [n for n, d in plan.placement.assignment.items() if d == "cpu"]
    on_gpu = [n for n, d in plan.placement.assignment.items() if d == 0]
    assert on_cpu and on_gpu
    assert plan.placement.estimates["cpu"].weights_bytes == sum(block_weights_bytes(blocks[n]) for n in on_cpu)
    assert plan.placement.estimates[0].weights_bytes == sum(
        block_weights_bytes(blocks[n], settings.quant, planner.quantizable("bfloat16")) for n in on_gpu
    )
    # Without a GPU the whole model sits on the CPU and bitsandbytes quantizes it there.
    cpu_only = planner.plan(Inventory((), 64 * 2**30), settings)
    assert cpu_only.placement.estimates["cpu"].weights_bytes == sum(
        block_weights_bytes(b, settings.quant, planner.quantizable("bfloat16")) for b in planner.layout.blocks
    )


def test_offloaded_blocks_run_on_the_first_gpu_that_holds_blocks() -> None:
    """accelerate's main device is the first GPU in the device_map; a GPU too small to hold anything is not it."""
    from oneke_plan.inventory import Gpu, Inventory
    from oneke_plan.memory import Workload
    from oneke_plan.model_source import resolve_model
    from oneke_plan.planner import Planner, PlanSettings

    planner = Planner(resolve_model("oneke"))
    tiny = Gpu(0, "GPU 0", 900 * 2**20, 900 * 2**20, (8, 6))
    big = Gpu(1, "GPU 1", 24 * GiB, 24 * GiB, (8, 6))
    plan = planner.plan(Inventory((tiny, big), 64 * GiB), PlanSettings(Workload(512, 512, 4)))
    assert plan.fits
    assert 0 not in plan.placement.assignment.values() and "cpu" in plan.placement.assignment.values()
    offloaded_kv = sum(c.kv_cache_bytes for c in plan.costs if plan.placement.assignment[c.name] == "cpu")
    on_gpu_kv = sum(c.kv_cache_bytes for c in plan.costs if plan.placement.assignment[c.name] == 1)
    assert plan.placement.estimates[1].kv_cache_bytes == offloaded_kv + on_gpu_kv
    assert 0 not in plan.placement.estimates
