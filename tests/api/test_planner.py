"""Placement behaviour of the Planner: capacities, tied weights, GQA, offload, does-not-fit, balanced, solving,
dtype choice, agreement with accelerate, and the headline claim against accelerate's own placement."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import accelerate_device, transformers_meta_model

from oneke_plan.api.planner import Planner
from oneke_plan.core.errors import DoesNotFit
from oneke_plan.core.sizes import GiB, parse_size
from oneke_plan.plan.inventory import build_inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

DEFAULT = PlanSettings(Workload(512, 512, 4))

# OneKE by hand (/work/shared/oneke/README.md): K and V of 40 heads x 128 values, 2 bytes each in bf16, per position
# and layer (819,200 bytes a token for the 40 layers); a decoder layer's 317,194,240 Linear and 2 x 5,120 norm
# parameters in bf16.
ONEKE_KV_PER_POSITION_AND_LAYER = 2 * 40 * 128 * 2
ONEKE_LAYER_BF16_BYTES = (317_194_240 + 2 * 5_120) * 2


pytestmark = pytest.mark.usefixtures("quiet_accelerate")


@pytest.fixture(scope="module")
def oneke() -> Planner:
    return Planner(resolve_model("oneke"))


def gpus(*specs: str, cpu: str = "0", offload_dir: str | None = None):
    return build_inventory(list(specs), cpu_memory=cpu, offload_dir=offload_dir)


def _assignment_from_device_map(planner: Planner, device_map: dict) -> dict:
    return {b.name: accelerate_device(b.name, device_map) for b in planner.layout.blocks}


def _oneke_kv(settings: PlanSettings, layers: int) -> int:
    """The KV cache of `layers` OneKE layers for the workload, by hand: every position of every sequence."""
    w = settings.workload
    return ONEKE_KV_PER_POSITION_AND_LAYER * w.batch_size * (w.max_input_tokens + w.max_new_tokens) * layers


def _accelerate_weights(model, device_map: dict) -> dict:  # type: ignore[no-untyped-def]
    """Bytes per device of transformers' own meta model under `device_map`, sized by accelerate's
    compute_module_sizes (each key's module or tensor, at the dtype the model was built with)."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    out: dict = {}
    for key, device in device_map.items():
        out[device] = out.get(device, 0) + sizes[key]
    return out


def _layers_on(device_map: dict, device: object, layers: int = 40) -> int:
    return sum(1 for i in range(layers) if accelerate_device(f"model.layers.{i}", device_map) == device)


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
    """Each GPU's planned terms, checked by other routes than the planner's: the KV cache by hand for the layers the
    device_map puts there, unquantized weights as accelerate sizes transformers' own meta model under that map, the
    reserve as asked; and the total within the card."""
    inventory = gpus(*specs)
    plan = oneke.plan(inventory, settings)
    assert plan.fits, plan.log
    profile = oneke.profile(plan, inventory)
    capacity = {g.index: g.total_bytes for g in inventory.gpus}
    assert set(profile.estimate) <= set(capacity)
    weights = _accelerate_weights(transformers_meta_model(oneke.config, plan.dtype), profile.device_map)
    for device, est in profile.estimate.items():
        assert est.kv_cache_bytes == _oneke_kv(settings, _layers_on(profile.device_map, device))
        if settings.quant.mode == "none":
            assert est.weights_bytes == weights[device]
        assert est.reserve_bytes == settings.reserve_bytes
        assert est.total_bytes <= capacity[device], (device, est.total_bytes, capacity[device])
    assert sum(_layers_on(profile.device_map, d) for d in profile.estimate) == 40  # every layer somewhere


# -- tied weights -------------------------------------------------------------------------------------------------
def test_tied_tiny_model_keeps_lm_head_with_embeddings(tiny_tied_dir: Path) -> None:
    planner = Planner(resolve_model(str(tiny_tied_dir)))
    lm_head = next(b for b in planner.layout.blocks if b.kind == "lm_head")
    assert lm_head.tied_to == "model.embed_tokens"
    inventory = gpus("200KiB", "200KiB", "1MiB")
    plan = planner.plan(inventory, PlanSettings(Workload(8, 8, 1), reserve_bytes=0))
    device_map = planner.device_map(plan)
    assert len(set(device_map.values())) >= 2  # the model is really split
    assert accelerate_device("lm_head", device_map) == accelerate_device("model.embed_tokens", device_map)
    # lm_head comes last in model order, so without the tie it would not be on the first device
    assert accelerate_device("model.norm", device_map) != accelerate_device("model.embed_tokens", device_map)


def test_tied_oneke_config_keeps_lm_head_with_embeddings(oneke: Planner, tmp_path: Path) -> None:
    config = dict(oneke.source.config, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tied = Planner(resolve_model(str(tmp_path)))
    assert tied.layout.parameter_count == 13_254_415_360 - 55_296 * 5_120  # README's count, less one embedding
    inventory = gpus("24GiB", "12GiB")
    untied_map = oneke.device_map(oneke.plan(inventory, DEFAULT))
    tied_map = tied.device_map(tied.plan(inventory, DEFAULT))
    assert accelerate_device("lm_head", untied_map) == 1 != accelerate_device("model.embed_tokens", untied_map)
    assert accelerate_device("lm_head", tied_map) == accelerate_device("model.embed_tokens", tied_map) == 0
    assert accelerate_device("model.layers.39", tied_map) == 1


# -- GQA ----------------------------------------------------------------------------------------------------------
def test_gqa_plans_less_kv_than_mha(tiny_model_dir: Path, tiny_gqa_dir: Path) -> None:
    """The KV cache by hand from each config.json: K and V of num_key_value_heads x head_dim bf16 values, per
    position, sequence and layer."""
    inventory = gpus("2GiB")
    settings = PlanSettings(Workload(100, 50, 3))
    planned = {}
    for directory in (tiny_model_dir, tiny_gqa_dir):
        plan = Planner(resolve_model(str(directory))).plan(inventory, settings)
        assert plan.fits
        config = json.loads((directory / "config.json").read_text())
        per_position = 2 * config["num_key_value_heads"] * config["head_dim"] * 2 * config["num_hidden_layers"]
        assert plan.placement.estimates[0].kv_cache_bytes == per_position * 3 * (100 + 50)
        planned[directory] = plan.placement.estimates[0]
    assert planned[tiny_gqa_dir].kv_cache_bytes * 2 == planned[tiny_model_dir].kv_cache_bytes  # 2 KV heads, not 4
    # and the k/v projections shrink with it, so the GQA model's weights are smaller too
    assert planned[tiny_gqa_dir].weights_bytes < planned[tiny_model_dir].weights_bytes


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
    # offloaded layers run on GPU 0, so all 40 layers' KV cache (by hand) is charged there and none to cpu/disk
    assert est[0].kv_cache_bytes == _oneke_kv(DEFAULT, 40)
    assert est["cpu"].kv_cache_bytes == est["disk"].kv_cache_bytes == 0
    assert est[0].total_bytes <= 8 * GiB
    assert est["cpu"].total_bytes <= 8 * GiB
    # GPU 0 also holds a staging copy of the largest offloaded block in its workspace: a decoder layer (by hand),
    # larger than the embeddings or lm_head (55,296 x 5,120 x 2 bytes)
    assert _layers_on(profile.device_map, "cpu") + _layers_on(profile.device_map, "disk") > 0
    assert ONEKE_LAYER_BF16_BYTES > 55_296 * 5_120 * 2
    assert est[0].workspace_bytes >= ONEKE_LAYER_BF16_BYTES


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
    one_layer = max((ONEKE_LAYER_BF16_BYTES + _oneke_kv(settings, 1)) / cap for cap in capacity.values())
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
    weights only. Its map, judged without the planner: GPU 0's weights as accelerate itself sizes them, plus the KV
    cache of its layers by hand and the 1 GiB reserve, already exceed 24 GiB before any activation. The plan for the
    same machine puts fewer layers there, and its weights and KV cache per GPU are the same independent numbers."""
    from accelerate import infer_auto_device_map

    inventory = gpus("24GiB", "12GiB")
    plan = oneke.plan(inventory, DEFAULT)
    assert plan.fits
    model = transformers_meta_model(oneke.config, "bfloat16")
    accelerate_map = infer_auto_device_map(
        model,
        max_memory={0: parse_size("24GiB"), 1: parse_size("12GiB")},
        no_split_module_classes=["LlamaDecoderLayer"],
        dtype=torch.bfloat16,
    )
    theirs = _accelerate_weights(model, accelerate_map)[0] + _oneke_kv(DEFAULT, _layers_on(accelerate_map, 0)) + GiB
    assert theirs > 24 * GiB, theirs / GiB
    ours = oneke.profile(plan, inventory)
    weights = _accelerate_weights(model, ours.device_map)
    for device in (0, 1):
        est = ours.estimate[device]
        assert est.weights_bytes == weights[device]
        assert est.kv_cache_bytes == _oneke_kv(DEFAULT, _layers_on(ours.device_map, device))
        assert est.total_bytes <= inventory.gpus[device].total_bytes
    assert _layers_on(accelerate_map, 0) > _layers_on(ours.device_map, 0)


def nf4_double_quant_bytes(out_features: int, in_features: int) -> int:
    """A 4-bit nf4 Linear weight with double quantization, by hand (docs/memory-model.md, checked against
    bitsandbytes in tests/measure/test_memory.py): two values a byte, a uint8 absmax per block of 64 with an fp32
    absmax per 256 of those, the 256-entry fp32 map, the fp32 offset and the 16-entry fp32 code table."""
    n = out_features * in_features
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 1024 + 4 + 64


def test_quantized_plan_prices_offloaded_blocks_unquantized(oneke: Planner) -> None:
    """transformers keeps bitsandbytes models' CPU-offloaded modules in the compute dtype when GPUs are present; on
    the GPU, and with no GPU at all (the whole model quantized on the CPU), the decoder layers' Linears are 4-bit."""
    from oneke_plan.plan.inventory import Gpu, Inventory

    settings = PlanSettings(Workload(256, 256, 1), quant=Quantization("4bit"))
    gpu = Gpu(0, "GPU 0", 6 * 2**30, 6 * 2**30, (8, 6))
    inventory = Inventory((gpu,), 64 * 2**30)
    plan = oneke.plan(inventory, settings)
    assert plan.fits
    device_map = oneke.profile(plan, inventory).device_map
    assert {0, "cpu"} <= set(device_map.values())
    model = transformers_meta_model(oneke.config, "bfloat16")
    bf16 = _accelerate_weights(model, device_map)
    assert plan.placement.estimates["cpu"].weights_bytes == bf16["cpu"]  # unquantized, as accelerate sizes it

    def quantized_layers_bytes(layers: int) -> int:
        """`layers` decoder layers: their 7 Linears in 4-bit, the two norms in bf16."""
        linears = [(5120, 5120)] * 4 + [(13824, 5120)] * 2 + [(5120, 13824)]
        return layers * (sum(nf4_double_quant_bytes(*shape) for shape in linears) + 2 * 5120 * 2)

    on_gpu = _layers_on(device_map, 0)
    layers_bf16 = on_gpu * ONEKE_LAYER_BF16_BYTES
    assert plan.placement.estimates[0].weights_bytes == bf16[0] - layers_bf16 + quantized_layers_bytes(on_gpu)
    # Without a GPU the whole model sits on the CPU and bitsandbytes quantizes it there.
    cpu_only = oneke.plan(Inventory((), 64 * 2**30), settings)
    whole = sum(_accelerate_weights(model, {"": "cpu"}).values())
    assert cpu_only.placement.estimates["cpu"].weights_bytes == (
        whole - 40 * ONEKE_LAYER_BF16_BYTES + quantized_layers_bytes(40)
    )


def test_offloaded_blocks_run_on_the_first_gpu_that_holds_blocks() -> None:
    """accelerate's main device is the first GPU in the device_map; a GPU too small to hold anything is not it."""
    from oneke_plan.api.planner import Planner
    from oneke_plan.plan.inventory import Gpu, Inventory
    from oneke_plan.plan.memory import Workload
    from oneke_plan.plan.model_source import resolve_model
    from oneke_plan.plan.plans import PlanSettings

    planner = Planner(resolve_model("oneke"))
    tiny = Gpu(0, "GPU 0", 900 * 2**20, 900 * 2**20, (8, 6))
    big = Gpu(1, "GPU 1", 24 * GiB, 24 * GiB, (8, 6))
    plan = planner.plan(Inventory((tiny, big), 64 * GiB), PlanSettings(Workload(512, 512, 4)))
    assert plan.fits
    assert 0 not in plan.placement.assignment.values() and "cpu" in plan.placement.assignment.values()
    # every layer, on GPU 1 or offloaded, runs on GPU 1: all 40 layers' KV cache (by hand) is charged there
    assert plan.placement.estimates[1].kv_cache_bytes == _oneke_kv(PlanSettings(Workload(512, 512, 4)), 40)
    assert 0 not in plan.placement.estimates
