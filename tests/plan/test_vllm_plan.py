"""The vLLM translation of a profile (oneke_plan.plan.vllm_plan): pure arithmetic, no vLLM needed. Expectations are
computed here by hand from OneKE's config (40 layers, 40 heads of 128, bf16), not read back from the code. Then
what the CLIs do with it where vLLM is not installed: oneke-plan's serve line, oneke-run's refusals (exit 2)."""

from __future__ import annotations

import shlex
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import BadInput
from oneke_plan.plan.fit import DeviceEstimate
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.profile import ProfileDevice, read_profile
from oneke_plan.plan.vllm_plan import layer_devices, vllm_settings, without_kv_cache_memory_bytes

PROFILES = Path(__file__).parents[2] / "profiles"
ONEKE_LAYERS = 40
# K and V, 40 heads x 128 dims, 2 bytes (bf16): one token of one layer
ONEKE_KV_PER_TOKEN_LAYER = 2 * 40 * 128 * 2


def test_24_plus_12_gib_plan_is_two_uneven_pipeline_stages() -> None:
    profile = read_profile(PROFILES / "oneke-24gib+12gib-bf16.yaml")
    settings = vllm_settings(profile, "/models/OneKE", ONEKE_LAYERS)
    # batch 4 x (512 + 512) positions: the plan's KV on each GPU is its layers' share of that
    per_layer = ONEKE_KV_PER_TOKEN_LAYER * 4 * 1024
    kv = {gpu: profile.estimate[gpu].kv_cache_bytes for gpu in (0, 1)}
    layers = {gpu: kv[gpu] // per_layer for gpu in (0, 1)}
    assert layers == {0: 33, 1: 7}  # the README's table: layers 0-32 on GPU 0, 33-39 on GPU 1
    assert settings.env["VLLM_PP_LAYER_PARTITION"] == "33,7"
    assert settings.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    args = settings.engine_args
    assert args["pipeline_parallel_size"] == 2
    # 1024 positions are 64 whole blocks of 16: nothing to round, vLLM gets the larger stage's bytes
    assert args["kv_cache_memory_bytes"] == 33 * per_layer == 2_768_240_640
    assert (args["dtype"], args["max_model_len"], args["max_num_seqs"]) == ("bfloat16", 1024, 4)
    assert args["enable_prefix_caching"] is True and "quantization" not in args


def test_three_cards_and_the_serve_line() -> None:
    profile = read_profile(PROFILES / "oneke-24gib+12gib+8gib-bf16.yaml")
    settings = vllm_settings(profile, "/models/One KE", ONEKE_LAYERS)
    per_layer = ONEKE_KV_PER_TOKEN_LAYER * 8 * 1536
    counts = [profile.estimate[gpu].kv_cache_bytes // per_layer for gpu in (0, 1, 2)]
    assert counts == [26, 12, 2] and sum(counts) == ONEKE_LAYERS
    assert settings.env["VLLM_PP_LAYER_PARTITION"] == "26,12,2"
    words = shlex.split(settings.serve_command())
    environment = ["CUDA_VISIBLE_DEVICES=0,1,2", "VLLM_PP_LAYER_PARTITION=26,12,2"]
    assert words[:5] == [*environment, "vllm", "serve", "/models/One KE"]
    flags = words[5:]
    expected = {"--dtype": "bfloat16", "--max-model-len": "1536", "--max-num-seqs": "8",
                "--pipeline-parallel-size": "3", "--kv-cache-memory-bytes": str(26 * per_layer)}  # fmt: skip
    for flag, value in expected.items():
        assert flags[flags.index(flag) + 1] == value
    assert "--enable-prefix-caching" in flags and "--seed" not in flags and "--tokenizer" not in flags


def test_without_kv_cache_memory_bytes_the_implied_utilization() -> None:
    profile = read_profile(PROFILES / "oneke-24gib+12gib-bf16.yaml")
    settings = without_kv_cache_memory_bytes(vllm_settings(profile, "m", ONEKE_LAYERS), profile)
    # GPU 0's planned total over its 24 GiB (the larger share), rounded up to 3 decimals
    share = 25_598_782_976 / (24 * 2**30)
    assert 0.993 < share < 0.994
    assert settings.engine_args["gpu_memory_utilization"] == 0.994
    assert "kv_cache_memory_bytes" not in settings.engine_args
    assert any("gpu_memory_utilization 0.994" in note for note in settings.notes)


def test_4bit_is_bitsandbytes_and_8bit_or_fp4_are_refused() -> None:
    four = read_profile(PROFILES / "oneke-12gib-4bit.yaml")
    settings = vllm_settings(four, "m", ONEKE_LAYERS)
    assert settings.engine_args["quantization"] == "bitsandbytes"
    assert "pipeline_parallel_size" not in settings.engine_args and settings.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert settings.engine_args["kv_cache_memory_bytes"] == ONEKE_KV_PER_TOKEN_LAYER * 2 * 1024 * 40
    with pytest.raises(BadInput, match="8-bit.*--engine hf"):
        vllm_settings(read_profile(PROFILES / "oneke-16gib-8bit.yaml"), "m", ONEKE_LAYERS)
    fp4 = replace(four, quantization=replace(four.quantization, quant_type="fp4"))
    with pytest.raises(BadInput, match="fp4.*--engine hf"):
        vllm_settings(fp4, "m", ONEKE_LAYERS)


def test_what_vllm_cannot_express_is_refused() -> None:
    two = read_profile(PROFILES / "oneke-24gib+12gib-bf16.yaml")
    disk = replace(two, device_map={**two.device_map, "lm_head": "disk"})
    with pytest.raises(BadInput, match="disk.*--engine hf"):
        vllm_settings(disk, "m", ONEKE_LAYERS)
    back_and_forth = replace(two, device_map={**two.device_map, "model.layers.5": 1})
    with pytest.raises(BadInput, match="come back.*--engine hf"):
        vllm_settings(back_and_forth, "m", ONEKE_LAYERS)
    head_in_the_middle = replace(two, device_map={**two.device_map, "model.embed_tokens": 1, "lm_head": 0})
    settings = vllm_settings(head_in_the_middle, "m", ONEKE_LAYERS)  # two stages: both are an end
    assert settings.env["VLLM_PP_LAYER_PARTITION"] == "33,7"
    cpu_beside_two = replace(two, device_map={**two.device_map, "lm_head": "cpu"})
    with pytest.raises(BadInput, match="several GPUs.*--engine hf"):
        vllm_settings(cpu_beside_two, "m", ONEKE_LAYERS)


def test_cpu_offload_beside_one_gpu_is_cpu_offload_gb() -> None:
    one = read_profile(PROFILES / "oneke-12gib-4bit.yaml")
    offloaded = {**one.device_map, "": 0, "model.layers.39": "cpu"}
    estimate = {**one.estimate, "cpu": DeviceEstimate(weights_bytes=3 * 2**29, kv_cache_bytes=0)}
    settings = vllm_settings(replace(one, device_map=offloaded, estimate=estimate), "m", ONEKE_LAYERS)
    assert settings.engine_args["cpu_offload_gb"] == 1.5


def test_cpu_plan_gives_vllm_cpu_the_kv_bytes_in_whole_blocks() -> None:
    two = read_profile(PROFILES / "oneke-24gib+12gib-bf16.yaml")
    # a tiny model's CPU plan: batch 8 x (600 + 4) positions, 4 layers of 2 x 8 heads x 64 x 4 bytes (float32)
    per_token = 4 * 2 * 8 * 64 * 4
    cpu = replace(two, device_map={"": "cpu"}, workload=Workload(max_input_tokens=600, max_new_tokens=4, batch_size=8),
                  estimate={"cpu": DeviceEstimate(kv_cache_bytes=per_token * 8 * 604)})  # fmt: skip
    settings = vllm_settings(cpu, "m", 4)
    # 604 positions are 19 blocks of 32 (608 positions) per row
    assert settings.engine_args["kv_cache_memory_bytes"] == per_token * 8 * 608
    assert settings.engine_args["block_size"] == 32 and settings.env == {}
    older = without_kv_cache_memory_bytes(vllm_settings(cpu, "m", 4), cpu)
    assert older.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # 76 MiB, in whole GiB
    assert "kv_cache_memory_bytes" not in older.engine_args


def test_layer_devices_reads_the_map_as_accelerate_does() -> None:
    assert layer_devices({"": 0}, 3) == [0, 0, 0]
    with pytest.raises(BadInput, match="no decoder layers"):  # a map without numbered layers is not guessed at
        layer_devices({"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}, 2)
    mapped = {"transformer.wte": 0, "transformer.h.0": 0, "transformer.h.1": 1, "transformer.ln_f": 1, "lm_head": 1}
    assert layer_devices(mapped, 2) == [0, 1]


# -- the CLIs, without vLLM ----------------------------------------------------------------------------------------
def _tiny_cpu_profile(model_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    inventory = out.with_suffix(".inventory.yaml")
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    argv = [str(model_dir), "--inventory", str(inventory), "--dtype", "float32", "--max-input-tokens", "600"]
    assert plan_main([*argv, "--max-new-tokens", "4", "--batch-size", "2", "-o", str(out)]) == 0
    capsys.readouterr()  # what oneke-plan printed
    return out


def test_oneke_plan_prints_the_serve_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main(["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0", "--engine", "vllm"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "vllm serve" in line).split()
    assert line[:4] == ["CUDA_VISIBLE_DEVICES=0,1", "VLLM_PP_LAYER_PARTITION=33,7", "vllm", "serve"]
    assert "--kv-cache-memory-bytes" in line and "temperature 0" in err
    assert plan_main(["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0"]) == 0
    assert "vllm serve" not in capsys.readouterr().err  # only with --engine vllm


def test_the_serve_line_trusts_remote_code_when_the_plan_did(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["oneke", "--gpu", "24GiB", "--cpu-memory", "0", "--quantize", "4bit", "--engine", "vllm"]
    assert plan_main([*argv, "--trust-remote-code"]) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if "vllm serve" in line).split()
    assert "--trust-remote-code" in line
    assert plan_main(argv) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if "vllm serve" in line).split()
    assert "--trust-remote-code" not in line


def test_oneke_run_refuses_what_vllm_cannot_express_before_anything(
    tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = read_profile(_tiny_cpu_profile(tiny_model_dir, tmp_path / "cpu.yaml", capsys))
    on_disk = replace(
        profile,
        devices=[*profile.devices, ProfileDevice("disk", "disk", None)],
        estimate={**profile.estimate, "disk": DeviceEstimate()},  # every device has an estimate
        device_map={"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"},
        offload_dir="offload",
    )
    (tmp_path / "disk.yaml").write_text(on_disk.to_yaml())
    argv = ["--profile", str(tmp_path / "disk.yaml"), "--input", str(deepke_dir / "NER" / "test.json")]
    argv += ["--output", str(tmp_path / "out.jsonl"), "--no-progress", "--engine", "vllm"]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk" in err[0] and "--engine hf" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.inventory.yaml", "cpu.yaml", "disk.yaml"]


@pytest.mark.skipif(find_spec("vllm") is not None, reason="checks a machine without vLLM")
def test_oneke_run_engine_vllm_without_vllm_is_one_line(
    tiny_model_dir: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = _tiny_cpu_profile(tiny_model_dir, tmp_path / "cpu.yaml", capsys)
    argv = ["--profile", str(profile), "--input", str(deepke_dir / "NER" / "test.json")]
    assert run_main([*argv, "--output", str(tmp_path / "out.jsonl"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed" in err[0] and "oneke-plan[vllm" in err[0] and "--engine hf" in err[0]
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.journal").exists()
