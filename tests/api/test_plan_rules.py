"""The planner follows transformers' rules and never surprises: the dtype `--dtype auto` picks is the one
transformers' `from_pretrained(dtype="auto")` loads; a described machine never borrows this machine's RAM; a plan
that offloads says so with its slowdown; the attention implementation planned for is the one oneke-run loads; a
GPU that cannot run the profile's dtype is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import build_tiny_llama
from transformers import AutoModelForCausalLM

from oneke_plan.api.planner import Planner
from oneke_plan.cli.plan import main as plan_main
from oneke_plan.core.errors import EXIT_DOES_NOT_FIT, BadInput
from oneke_plan.core.sizes import GiB
from oneke_plan.load.loader import load_model
from oneke_plan.load.machine import machine_problems, replan_command
from oneke_plan.measure.compat import dtype_kw, dtype_kwarg
from oneke_plan.plan.inventory import Gpu, Inventory, build_inventory
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings, offload_cost_of
from oneke_plan.plan.profile import read_profile
from oneke_plan.plan.speed import PCIE_BYTES_PER_SECOND

SMALL = PlanSettings(Workload(16, 4, 1))


pytestmark = pytest.mark.usefixtures("quiet_accelerate")


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of a tiny checkpoint whose config.json has `changes` applied (None removes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def fp32_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("fp32"), dtype=torch.float32)


# -- 3. --dtype auto is transformers' dtype="auto" -------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, changes",
    [
        ("bf16", {"torch_dtype": "float32", "dtype": None}),
        ("bf16", {"torch_dtype": "float16", "dtype": None}),
        ("bf16", {"torch_dtype": None, "dtype": "float32"}),
        ("bf16", {"torch_dtype": None, "dtype": None}),  # no dtype in the config: the weights' own
        ("fp32", {"torch_dtype": None, "dtype": None}),
        ("fp32", {"torch_dtype": "bfloat16", "dtype": None}),
    ],
)
def test_auto_dtype_is_what_transformers_loads(
    weights: str, changes: dict, tiny_model_dir: Path, fp32_weights_dir: Path, tmp_path: Path
) -> None:
    model_dir = _copy_with_config(tiny_model_dir if weights == "bf16" else fp32_weights_dir, tmp_path / "m", **changes)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kw("auto")).dtype
    planner = Planner(resolve_model(str(model_dir)))
    plan = planner.plan(build_inventory(["RTX 3090"]), SMALL)
    assert plan.dtype == str(theirs).removeprefix("torch.")
    profile = planner.profile(plan, build_inventory(["RTX 3090"]))
    assert profile.dtype == plan.dtype
    # what oneke-run loads: the profile's dtype (planned for this CPU so that it can load here)
    cpu = Inventory((), 4 * GiB)
    loaded = load_model(planner.profile(planner.plan(cpu, SMALL), cpu), resolve_model(str(model_dir)))
    assert loaded.dtype == theirs
    # and it is said where the dtype came from
    # transformers 5 reads `dtype` and an old config's `torch_dtype`; 4.x reads `torch_dtype` only
    keys = ("dtype", "torch_dtype") if dtype_kwarg() == "dtype" else ("torch_dtype",)
    origin = "config.json" if any(changes.get(key) for key in keys) else "the checkpoint"
    assert any(line.startswith(f"dtype: {plan.dtype}, as {origin} says") for line in plan.log), plan.log


def test_float32_config_is_not_planned_as_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_with_config(tiny_model_dir, tmp_path / "m", torch_dtype="float32", dtype=None)
    fp32 = Planner(resolve_model(str(model_dir))).plan(build_inventory(["24GiB"]), SMALL)
    bf16 = Planner(resolve_model(str(tiny_model_dir))).plan(build_inventory(["24GiB"]), SMALL)
    # every float parameter is twice as large (buffers such as rotary inv_freq are float32 in both)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert fp32.placement.estimates[0].weights_bytes - bf16.placement.estimates[0].weights_bytes == 2 * params


def test_bf16_on_a_card_without_bf16_is_fp16_and_says_so(tiny_model_dir: Path) -> None:
    plan = Planner(resolve_model(str(tiny_model_dir))).plan(build_inventory(["Tesla T4"]), SMALL)
    assert plan.dtype == "float16"
    assert any("Tesla T4" in line and "cannot run bf16" in line for line in plan.log)


def test_no_dtype_anywhere_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="no dtype"):
        Planner(resolve_model(str(folder))).plan(build_inventory(["24GiB"]), SMALL)
    assert plan_main([str(folder), "--gpu", "24GiB", "--dtype", "float16"]) == 0  # --dtype settles it
    capsys.readouterr()


# -- 4. described machines do not borrow this machine's RAM; offload is said, with its slowdown --------------------
def test_described_gpu_does_not_offload_to_this_machines_ram(capsys: pytest.CaptureFixture) -> None:
    """The reported case: OneKE on one 16 GiB card used to exit 0 with 23 layers on the planning machine's RAM."""
    assert build_inventory(["16GiB"]).cpu_bytes == 0
    code = plan_main(["oneke", "--gpu", "16GiB"])
    err = capsys.readouterr().err
    assert code == EXIT_DOES_NOT_FIT, err
    options = err[err.index("what would fit:") :].splitlines()[1:]
    assert options[0].strip().startswith("--quantize 4bit: fits")
    first_offload = next(i for i, line in enumerate(options) if "offload" in line)
    assert all("offload" not in line for line in options[:first_offload])
    assert all("offload" in line for line in options[first_offload:])
    # a card described by its size alone has no known bandwidth: no silent slowdown figure, but what would give one
    assert "slower by a factor not known without the memory bandwidth of GPU 0" in options[first_offload]
    assert "--bandwidth 0=GB/s" in options[first_offload]
    assert plan_main(["oneke", "--gpu", "RTX 4080"]) == EXIT_DOES_NOT_FIT  # 16 GiB, 716.8 GB/s (catalog)
    options = capsys.readouterr().err.split("what would fit:")[1].splitlines()[1:]
    assert "x slower" in next(line for line in options if "offload" in line)


def test_offloaded_plan_says_so_with_its_slowdown(capsys: pytest.CaptureFixture) -> None:
    """The warning's figures are the speed prediction's: RTX 4080 (716.8 GB/s, the catalog's) with 32 GiB of host
    memory. By hand: a decoding step reads GPU 0's weights (but the embedding table, a lookup) and every layer's
    KV cache from its memory, and the CPU's weights across PCIe; with every weight on the GPU, all from its memory."""
    code = plan_main(["oneke", "--gpu", "RTX 4080", "--cpu-memory", "32GiB"])
    err = capsys.readouterr().err
    assert code == 0, err
    planner = Planner(resolve_model("oneke"))
    inventory = build_inventory(["RTX 4080"], cpu_memory="32GiB")
    plan = planner.plan(inventory, PlanSettings(Workload(512, 512, 4)))
    embedding = 55296 * 5120 * 2  # OneKE's vocabulary x hidden size, bf16
    on_gpu = plan.placement.estimates[0].weights_bytes - embedding + plan.placement.estimates[0].kv_cache_bytes
    on_cpu = plan.placement.estimates["cpu"].weights_bytes
    step = on_gpu / 716.8e9 + on_cpu / PCIE_BYTES_PER_SECOND
    expected = step / ((on_gpu + on_cpu) / 716.8e9)
    cost = offload_cost_of(plan, inventory)
    assert cost is not None and cost.slowdown == pytest.approx(expected, rel=1e-9)
    warning = next(line for line in err.splitlines() if line.startswith("warning: offload"))
    assert f"at least {step:.2f} s: about {expected:.0f}x slower" in warning
    assert "GPU 0 716.8 GB/s, catalog" in warning and "CPU -> GPU (PCIe) 25 GB/s, assumed" in warning
    assert "on the GPUs alone, these fit:" in err and "--quantize 4bit: fits" in err


def test_inventory_without_gpus_must_say_its_cpu_memory(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("gpus: []\n")
    with pytest.raises(BadInput, match="cpu_memory"):
        build_inventory(inventory_file=path)
    path.write_text("gpus: []\ncpu_memory: 8GiB\n")
    assert build_inventory(inventory_file=path).cpu_bytes == 8 * GiB


# -- 5. attention implementation and dtype support on the machine ------------------------------------------------
@pytest.mark.parametrize("eager", [False, True])
def test_profile_records_and_runner_loads_the_planned_attention(
    eager: bool, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "p.yaml"
    argv = [str(tiny_model_dir), "--cpu-memory", "4GiB", "--max-input-tokens", "16", "--max-new-tokens", "4", "-o"]
    assert plan_main([*argv, str(out), *(["--eager-attention"] if eager else [])]) == 0
    capsys.readouterr()
    profile = read_profile(out)
    assert profile.attn_implementation == ("eager" if eager else "sdpa")
    model = load_model(profile, resolve_model(str(tiny_model_dir)))
    assert model.config._attn_implementation == profile.attn_implementation
    # eager attention materializes batch x heads x seq x seq scores, which the plan counts
    data = out.read_text()
    assert ("attn_implementation: eager" in data) == eager


def test_profile_without_attention_key_reads_as_sdpa(tmp_path: Path) -> None:
    source = Path(__file__).parents[2] / "profiles" / "oneke-24gib+12gib-bf16.yaml"
    text = "".join(line for line in source.read_text().splitlines(keepends=True) if "attn_implementation" not in line)
    (tmp_path / "old.yaml").write_text(text)
    assert read_profile(tmp_path / "old.yaml").attn_implementation == "sdpa"
    (tmp_path / "bad.yaml").write_text(text + "attn_implementation: flash\n")
    with pytest.raises(BadInput, match="attn_implementation"):
        read_profile(tmp_path / "bad.yaml")


def test_machine_check_refuses_a_gpu_without_bf16() -> None:
    profile = read_profile(Path(__file__).parents[2] / "profiles" / "oneke-24gib+12gib-bf16.yaml")
    assert profile.dtype == "bfloat16"
    source = resolve_model("oneke")
    big = 40 * GiB  # plenty of memory: only the dtype is wrong
    turing = (Gpu(0, "TITAN RTX", big, big, (7, 5)), Gpu(1, "RTX 3090", big, big, (8, 6)))
    problems = machine_problems(profile, source, turing, 0)
    assert len(problems) == 1 and "GPU 0" in problems[0] and "bfloat16" in problems[0]
    assert "--dtype float16" in replan_command(profile, "oneke", turing)
    ampere = (Gpu(0, "RTX 3090", big, big, (8, 6)), Gpu(1, "RTX 3090", big, big, (8, 6)))
    assert machine_problems(profile, source, ampere, 0) == []
    assert "--dtype" not in replan_command(profile, "oneke", ampere)


def test_replanning_for_a_turing_card_gives_a_profile_it_accepts() -> None:
    """Follow the advice: the re-plan command's settings give an fp16 profile the same machine check accepts."""
    big = 40 * GiB
    turing = (Gpu(0, "TITAN RTX", big, big, (7, 5)),)
    planner = Planner(resolve_model("oneke"))
    settings = PlanSettings(Workload(512, 512, 4), dtype="float16")
    inventory = Inventory(turing, 0)
    profile = planner.profile(planner.plan(inventory, settings), inventory)
    assert machine_problems(profile, resolve_model("oneke"), turing, 0) == []


@pytest.mark.parametrize("gpu", ["20GiB", "12GiB"])
def test_each_what_would_fit_suggestion_plans_when_given(
    gpu: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every "what would fit" line, given back as its flags, plans (exit 0): a --cpu-memory rounded down to the
    printed two decimals once left 16 blocks over (OneKE on 20 GiB: 11.98GiB printed, 11.98... GiB needed)."""
    assert plan_main(["oneke", "--gpu", gpu, "--cpu-memory", "0"]) == EXIT_DOES_NOT_FIT
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines() if line.startswith("  --") or "offload: --" in line]
    flags = [(line.split(": ", 1)[1] if "offload:" in line else line).split(":")[0].split(" (")[0] for line in lines]
    assert any("--cpu-memory" in f for f in flags), err
    for i, suggestion in enumerate(flags):
        extra = suggestion.replace("--offload-dir DIR", f"--offload-dir {tmp_path / 'offload'}").split()
        extra += [] if "--cpu-memory" in extra else ["--cpu-memory", "0"]
        assert plan_main(["oneke", "--gpu", gpu, *extra, "-o", str(tmp_path / f"{i}.yaml")]) == 0, suggestion
