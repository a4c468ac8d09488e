"""Loading a checkpoint into a profile's device_map.

- The reported multi-GPU failure (shared/oneke/README.md): DeepKE's snippet builds the headless AutoModel, whose
  names match nothing in a causal-LM checkpoint, so nothing loads and dispatch meets meta weights; the loader's
  key check names the cause, and load_model loads every weight.
- Every layout oneke-plan writes (CPU, CPU + disk offload, bitsandbytes 8/4-bit, sharded and tied checkpoints)
  gives the same logits as transformers' own single-device from_pretrained.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights, load_checkpoint_in_model
from conftest import accelerate_device, needs_bnb_on_cpu, storage_bytes_by_owner
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from oneke_plan.api.planner import Planner
from oneke_plan.core.errors import DoesNotFit
from oneke_plan.extract.inputs import read_converted
from oneke_plan.extract.runner import encode_prompts
from oneke_plan.load.loaded_weights import measured_weight_bytes
from oneke_plan.load.loader import load_model
from oneke_plan.measure.checkpoint import explain_mismatch, key_mismatch, read_checkpoint
from oneke_plan.measure.compat import bnb_quantizes_on_cpu, dtype_kw
from oneke_plan.plan.fit import Placement, device_owner, estimate
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings
from oneke_plan.plan.profile import Profile

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GiB = 1024**3
WORKLOAD = Workload(max_input_tokens=600, max_new_tokens=8, batch_size=4)


# -- helpers ---------------------------------------------------------------------------------------------------------
def cpu_profile(model_dir: Path, dtype: str = "bfloat16", quant: str = "none") -> Profile:
    """What oneke-plan writes for this CPU-only machine (planned with a fixed 16 GiB so it does not vary)."""
    planner = Planner(resolve_model(str(model_dir)))
    inventory = Inventory((), 16 * GiB)
    settings = PlanSettings(WORKLOAD, quant=Quantization(quant), dtype=dtype)
    return planner.profile(planner.plan(inventory, settings), inventory)


def disk_profile(model_dir: Path, offload_dir: Path, dtype: str) -> Profile:
    """A CPU + disk offload profile from the planner: small CPU memory (reserve 0), offload_dir set.

    The planner does not offload to disk on a machine without GPUs (see test_planner_offloads_to_disk_without_gpus):
    until it does, the same Planner turns a placement that keeps the first blocks on the CPU and puts the rest on
    disk into the profile (the placement written as the device_map, estimates from fit.estimate).
    """
    planner = Planner(resolve_model(str(model_dir)))
    settings = PlanSettings(WORKLOAD, dtype=dtype, cpu_reserve_bytes=0)
    whole = planner.plan(Inventory((), 16 * GiB), settings)
    half = whole.placement.estimates["cpu"].total_bytes * 3 // 4
    inventory = Inventory((), half, str(offload_dir), None)
    plan = planner.plan(inventory, settings)
    if not (plan.fits and "disk" in plan.placement.assignment.values()):
        names = [cost.name for cost in plan.costs]
        assignment: dict[str, Any] = {name: "cpu" if i < 3 else "disk" for i, name in enumerate(names)}
        plan = replace(plan, placement=Placement(assignment, estimate(assignment, plan.costs, plan.slots)))
    profile = planner.profile(plan, inventory)
    assert "disk" in profile.device_map.values() and "cpu" in profile.device_map.values()
    return profile


def safetensors_state(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    return state


def last_logits(model: Any, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of a left-padded batch (attention mask set), as generate sees them on its first step."""
    width = max(len(ids) for ids in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.equal(got, want), f"max |difference| {(got - want).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path, deepke_dir: Path) -> list[list[int]]:
    """Token ids of three DeepKE prompts of different lengths (NER, RE, EEA)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [read_converted(deepke_dir / task / "test.json")[0] for task in ("NER", "RE", "EEA")]
    ids = [item.ids for item in encode_prompts(tokenizer, records)]
    assert len({len(i) for i in ids}) == 3
    return ids


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, Any]:
    """transformers' own single-device model, per dtype."""
    return {
        dtype: AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kw(getattr(torch, dtype))).eval()
        for dtype in ("bfloat16", "float32")
    }


# -- 1. the reported failure ---------------------------------------------------------------------------------------
def published_snippet_model(model_dir: Path) -> Any:
    """DeepKE's multi-GPU snippet: AutoModel.from_config under init_empty_weights, fp16."""
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        return AutoModel.from_config(config, **dtype_kw(torch.float16))


def snippet_load(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    model = published_snippet_model(model_dir)
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": "1GiB"}, no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.float16
    )
    load_checkpoint_in_model(model, str(model_dir / "model.safetensors"), device_map=device_map)
    return model, device_map


def test_published_snippet_loads_nothing_and_dispatch_fails_on_meta(tiny_model_dir: Path) -> None:
    model, device_map = snippet_load(tiny_model_dir)
    assert type(model).__name__ == "LlamaModel"  # headless: no lm_head, names without "model."
    # load_checkpoint_in_model does not raise: it only logs that the checkpoint's weights "were not used"
    names = [name for name, _ in model.named_parameters()]
    assert names and all(p.device.type == "meta" for p in model.parameters())
    # With two or more devices (the users' two GPUs) dispatch_model attaches hooks that move every weight to its
    # execution device; force_hooks takes that same path on this CPU-only machine, whose map has one device.
    # The error is the reported one, naming "cpu" where users saw GPU "0".
    with pytest.raises(ValueError, match=r"weight is on the meta device, we need a `value` to put in on cpu"):
        dispatch_model(model, device_map=device_map, force_hooks=True)


def test_published_snippet_on_one_device_fails_moving_meta_tensors(tiny_model_dir: Path) -> None:
    """On a single device (here {"": "cpu"}) dispatch_model just calls model.to(): torch refuses to copy meta."""
    model, device_map = snippet_load(tiny_model_dir)
    assert set(device_map.values()) == {"cpu"}
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        dispatch_model(model, device_map=device_map)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_key_mismatch_names_the_headless_cause(tiny_model_dir: Path) -> None:
    """The published snippet's AutoModel: transformers' loading would strip the checkpoint's 'model.' prefix, so
    every name but the lm_head's has a home, and the lm_head has none: the model cannot generate."""
    checkpoint = read_checkpoint(tiny_model_dir)
    model = published_snippet_model(tiny_model_dir)
    mismatch = key_mismatch(model, checkpoint)
    assert mismatch.missing == [] and mismatch.wrong_shapes == []
    assert mismatch.unexpected == ["lm_head.weight"]
    text = explain_mismatch(mismatch, checkpoint.path)
    assert "in the checkpoint but not the model (1): lm_head.weight" in text
    assert "headless AutoModel" in text and "AutoModelForCausalLM" in text


def test_key_mismatch_names_a_headless_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The other way round: a checkpoint saved from AutoModel (no 'model.' prefix, no lm_head) for the causal LM."""
    import shutil

    from safetensors.torch import load_file, save_file

    from oneke_plan.load.loader import build_empty_model

    headless = tmp_path / "headless"
    shutil.copytree(tiny_model_dir, headless)
    state = load_file(headless / "model.safetensors")
    save_file(
        {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}, headless / "model.safetensors"
    )
    mismatch = key_mismatch(build_empty_model(resolve_model(str(headless)), "bfloat16"), read_checkpoint(headless))
    assert mismatch.missing == ["lm_head.weight"] and mismatch.unexpected == []
    assert "saved from a headless model" in explain_mismatch(mismatch, headless)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_sharded_dir", "tiny_tied_dir", "tiny_gqa_dir"])
def test_load_model_loads_every_weight(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    profile = cpu_profile(model_dir)
    model = load_model(profile, resolve_model(str(model_dir)))
    assert type(model).__name__ == "LlamaForCausalLM"
    on_meta = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    assert on_meta == []
    stored = safetensors_state(model_dir)
    state = model.state_dict()
    for key, tensor in stored.items():
        assert state[key].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(state[key], tensor), key
    if fixture == "tiny_tied_dir":
        assert "lm_head.weight" not in stored
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert set(stored) == set(state)
    # the plan and the planned-vs-loaded weights table oneke-run prints, both against the loaded storages: exact for
    # a 16-bit CPU profile
    real = storage_bytes_by_owner(model, [""])[""]
    assert profile.estimate["cpu"].weights_bytes == real
    assert measured_weight_bytes(model, profile.device_map, profile.dtype) == {"cpu": real}


# -- 2. dispatched logits == the plain single-device model's -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_profile_logits_equal_from_pretrained(
    dtype: str, tiny_model_dir: Path, prompts: list[list[int]], reference: dict[str, Any]
) -> None:
    profile = cpu_profile(tiny_model_dir, dtype)
    assert profile.dtype == dtype and set(profile.device_map.values()) == {"cpu"}
    model = load_model(profile, resolve_model(str(tiny_model_dir)))
    assert model.dtype == getattr(torch, dtype)
    assert_same_logits(last_logits(model, prompts), last_logits(reference[dtype], prompts))
    real = storage_bytes_by_owner(model, [""])[""]
    assert profile.estimate["cpu"].weights_bytes == real
    assert measured_weight_bytes(model, profile.device_map, dtype) == {"cpu": real}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_disk_offload_profile_logits_equal_from_pretrained(
    dtype: str, tiny_model_dir: Path, prompts: list[list[int]], reference: dict[str, Any], tmp_path: Path
) -> None:
    offload = tmp_path / "offload"
    profile = disk_profile(tiny_model_dir, offload, dtype)
    assert profile.offload_dir == str(offload)
    model = load_model(profile, resolve_model(str(tiny_model_dir)))
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    assert offloaded and "lm_head.weight" in offloaded  # really on disk, fetched by accelerate's hooks
    checkpoint = read_checkpoint(tiny_model_dir)
    if (offload / "index.json").exists():  # transformers 4.x copies offloaded weights into the folder ...
        index = json.loads((offload / "index.json").read_text())
        assert set(offloaded) <= set(index)
        # ... at the checkpoint's dtype (bf16), cast on every fetch whatever the profile's dtype
        assert {entry["dtype"] for entry in index.values()} == {"bfloat16"}
    else:  # ... transformers 5 reads them straight from the checkpoint's safetensors
        assert {checkpoint.dtypes[name] for name in offloaded} == {"bfloat16"}
    assert_same_logits(last_logits(model, prompts), last_logits(reference[dtype], prompts))
    measured = measured_weight_bytes(model, profile.device_map, dtype, profile.offload_dir, checkpoint.dtypes)
    planned = {d: profile.estimate[d].weights_bytes for d in ("cpu", "disk")}
    if dtype == "bfloat16":
        assert measured == planned
    else:  # the table shows what is on disk: bf16, half the fp32 weights the plan counted
        on_disk = sum(torch.Size(checkpoint.shapes[name]).numel() * 2 for name in offloaded)
        buffers = sum(  # rotary inv_freq buffers: model-wide on transformers 5, per layer on 4.x
            b.numel() * b.element_size()
            for name, b in model.named_buffers()
            if accelerate_device(name, profile.device_map) == "disk"
        )
        assert measured == {"cpu": planned["cpu"], "disk": on_disk + buffers}
        assert measured["disk"] < planned["disk"]


def test_planner_offloads_to_disk_without_gpus(tiny_model_dir: Path, tmp_path: Path) -> None:
    planner = Planner(resolve_model(str(tiny_model_dir)))
    settings = PlanSettings(WORKLOAD, dtype="bfloat16", cpu_reserve_bytes=0)
    alone = planner.plan(Inventory((), 16 * GiB), settings).placement.estimates["cpu"]
    # Room for the KV cache and workspace, which stay on the CPU, but for only half the weights.
    inventory = Inventory((), alone.total_bytes - alone.weights_bytes // 2, str(tmp_path / "offload"), None)
    plan = planner.plan(inventory, settings)
    assert plan.fits and "disk" in plan.placement.assignment.values()


@pytest.mark.parametrize("fixture", ["tiny_sharded_dir", "tiny_tied_dir"])
def test_sharded_and_tied_profiles_logits_equal_from_pretrained(
    fixture: str, request: pytest.FixtureRequest, prompts: list[list[int]]
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    model = load_model(cpu_profile(model_dir), resolve_model(str(model_dir)))
    want = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kw(torch.bfloat16)).eval()
    assert_same_logits(last_logits(model, prompts), last_logits(want, prompts))


# -- 2b. bitsandbytes 8-bit / 4-bit on CPU -------------------------------------------------------------------------
def bnb_config(mode: str) -> BitsAndBytesConfig:
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@needs_bnb_on_cpu
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_profile_equals_transformers_bnb(mode: str, tiny_model_dir: Path, prompts: list[list[int]]) -> None:
    import bitsandbytes as bnb

    profile = cpu_profile(tiny_model_dir, quant=mode)
    assert profile.quantization.mode == mode and set(profile.device_map.values()) == {"cpu"}
    model = load_model(profile, resolve_model(str(tiny_model_dir)))
    layer_type = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {name for name, kind in linears.items() if issubclass(kind, layer_type)}
    # every decoder-layer Linear is quantized on the CPU; lm_head stays 16-bit, as transformers always keeps it
    assert quantized == {name for name in linears if name.startswith("model.layers.")}
    assert len(quantized) == 4 * 7
    assert not issubclass(linears["lm_head"], layer_type)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.dtype == (torch.int8 if mode == "8bit" else torch.uint8)
    # Measured before the first forward: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights (and casts
    # their absmax to bf16) at the first forward, so bytes measured after it depend on the host.
    real = storage_bytes_by_owner(model, [""])[""]  # every storage once, bitsandbytes' quantization state included
    assert profile.estimate["cpu"].weights_bytes == real
    assert measured_weight_bytes(model, profile.device_map, profile.dtype) == {"cpu": real}

    want = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, **dtype_kw(torch.bfloat16), quantization_config=bnb_config(mode), device_map="cpu"
    ).eval()
    assert_same_logits(last_logits(model, prompts), last_logits(want, prompts))


# -- 5b. --force onto a GPU that is not there ----------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA GPUs")
def test_load_model_onto_missing_gpu_is_one_clear_error(tiny_model_dir: Path) -> None:
    profile = cpu_profile(tiny_model_dir)
    profile = replace(profile, device_map={"": 0})
    with pytest.raises(DoesNotFit) as info:
        load_model(profile, resolve_model(str(tiny_model_dir)))
    message = str(info.value)
    assert "\n" not in message
    assert "GPU 0" in message and "no CUDA GPU" in message and "oneke-plan" in message


@pytest.mark.skipif(bnb_quantizes_on_cpu(), reason="only transformers < 4.53 cannot run bitsandbytes on the CPU")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_cpu_load_is_refused_on_old_transformers(mode: str, tiny_model_dir: Path) -> None:
    from oneke_plan.core.errors import BadInput

    with pytest.raises(BadInput, match="upgrade transformers"):
        load_model(cpu_profile(tiny_model_dir, quant=mode), resolve_model(str(tiny_model_dir)))


def test_replan_command_keeps_the_workload_and_quantization(tiny_model_dir: Path) -> None:
    from oneke_plan.load.machine import replan_command

    profile = cpu_profile(tiny_model_dir, quant="4bit")
    profile = replace(
        profile, quantization=Quantization("4bit", "fp4", double_quant=False), offload_dir="/o d"
    )
    command = replan_command(profile, "/models/One KE", ())
    assert command == (
        "oneke-plan '/models/One KE' --max-input-tokens 600 --max-new-tokens 8 --batch-size 4 --quantize 4bit "
        "--quant-type fp4 --no-double-quant --offload-dir '/o d' -o PROFILE.yaml"
    )


def test_pickled_bin_checkpoint_loads_weights_only(tiny_model_dir: Path, tmp_path: Path, prompts: list) -> None:
    """A plain-tensor pytorch_model.bin (what older checkpoints ship) loads through the weights-only path."""
    import shutil

    from safetensors.torch import load_file

    model_dir = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, model_dir)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    assert read_checkpoint(model_dir).pickled
    model = load_model(cpu_profile(model_dir), resolve_model(str(model_dir)))
    want = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kw(torch.bfloat16)).eval()
    assert_same_logits(last_logits(model, prompts), last_logits(want, prompts))


def test_device_owner_agrees_with_where_accelerate_puts_each_weight(tmp_path: Path) -> None:
    """fit.device_owner (the planner's, the loader's and the weight table's reading of a device_map) against where
    transformers and accelerate really put each parameter: layer 1 and lm_head on disk (left on meta, fetched by
    hooks), layer 10 (whose name starts with layer 1's) and the rest on the CPU."""
    from tiny_checkpoint import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "eleven", num_hidden_layers=11)
    device_map: dict[str, int | str] = {f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(11)}
    device_map.update({"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "disk"})
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload"), **dtype_kw(torch.float32)
    )
    where = {name: "disk" if p.device.type == "meta" else p.device.type for name, p in model.named_parameters()}
    assert {name for name, device in where.items() if device == "disk"} >= {"lm_head.weight"}
    assert where == {name: device_owner(name, device_map) for name in where}


def test_a_device_map_that_leaves_a_weight_out_is_one_line_before_loading(tiny_model_dir: Path) -> None:
    from oneke_plan.core.errors import BadInput

    profile = cpu_profile(tiny_model_dir)
    device_map = {f"model.layers.{i}": "cpu" for i in range(4)} | {"model.embed_tokens": "cpu", "model.norm": "cpu"}
    with pytest.raises(BadInput, match=r"^profile device_map: no entry covers 'lm_head.weight'; re-create"):
        load_model(replace(profile, device_map=device_map), resolve_model(str(tiny_model_dir)))
