"""LoRA adapters (--adapter), with real peft on real tensors: a tiny random LLaMA, a LoRA adapter made by peft's
get_peft_model with random lora_B weights (peft starts B at zero, which would make the adapter a no-op and these
tests unable to fail), saved by save_pretrained.

The truths are independent of the code under test: the safetensors file's own tensors for the bytes, peft's own
load for what an adapter holds in memory, peft's merge_and_unload saved as a plain checkpoint for the merged
answers, and transformers' 4-bit load + peft + greedy generate for the unmerged (QLoRA) answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import llama2_zh_ids, needs_bnb_on_cpu
from reference import alone
from safetensors import safe_open
from tiny_checkpoint import build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from oneke_plan import api
from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.extract.inputs import read_converted
from oneke_plan.measure.adapter import ADAPTER_WEIGHTS, PEFT_MISSING, read_adapter
from oneke_plan.measure.compat import bnb_quantizes_on_cpu, dtype_kw
from oneke_plan.plan.profile import read_profile

peft = pytest.importorskip("peft")  # the [lora] extra: make install installs it on both version sets

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # up_proj: LoRA at the MLP's peak
MAX_NEW = 8
WORKLOAD = ["--max-input-tokens", "600", "--max-new-tokens", str(MAX_NEW), "--batch-size", "4"]


def _save_adapter(model: Any, folder: Path, seed: int) -> Path:
    """A LoRA adapter for `model`, with every lora_B weight random, saved as peft saves it (safetensors)."""
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    wrapped.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base: a float32 tiny LLaMA; adapter: a LoRA for it; merged: base + adapter merged by peft, saved as a plain
    checkpoint with the base's tokenizer; other: a LoRA of the same layers for a model of another hidden size."""
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_llama(root / "base", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))
    adapter = _save_adapter(model, root / "adapter", seed=1)
    reference = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))
    merged = peft.PeftModel.from_pretrained(reference, str(adapter)).merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "merged")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=model.config.vocab_size)  # fmt: skip
    other = _save_adapter(AutoModelForCausalLM.from_config(config), root / "other", seed=2)
    return {"base": base, "adapter": adapter, "merged": root / "merged", "other": other}


@pytest.fixture(scope="module")
def cpu_inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inventory") / "cpu.yaml"
    path.write_text("gpus: []\ncpu_memory: 16GiB\n")
    return path


def _plan(model: Path, profile: Path, inventory: Path, *extra: str) -> int:
    return plan_main([str(model), "--inventory", str(inventory), *WORKLOAD, "-o", str(profile), "--overwrite", *extra])


def _run(profile: Path, source: Path, out: Path, *extra: str) -> int:
    return run_main(["--profile", str(profile), "--input", str(source), "--output", str(out), "--overwrite",
                     "--no-progress", *extra])  # fmt: skip


def _outputs(path: Path) -> list[str]:
    return [json.loads(line)["raw_output"] for line in path.read_text(encoding="utf-8").splitlines()]


def _file_tensor_bytes(folder: Path) -> int:
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        return sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())


def _loaded_lora_bytes(lora: dict[str, Path]) -> int:
    """What peft's own load holds of the adapter: every LoRA parameter of PeftModel.from_pretrained, in bytes."""
    model = AutoModelForCausalLM.from_pretrained(lora["base"], **dtype_kw(torch.float32))
    wrapped = peft.PeftModel.from_pretrained(model, str(lora["adapter"]))
    return sum(p.numel() * p.element_size() for n, p in wrapped.named_parameters() if "lora_" in n)


def test_the_plan_counts_the_adapters_bytes_merged_and_unmerged(lora: dict[str, Path], cpu_inventory: Path) -> None:
    plain = api.plan(lora["base"], inventory_file=cpu_inventory, max_input_tokens=600, max_new_tokens=MAX_NEW)
    merged = api.plan(lora["base"], inventory_file=cpu_inventory, max_input_tokens=600, max_new_tokens=MAX_NEW,
                      adapter=lora["adapter"])  # fmt: skip
    record = merged.profile.adapter
    assert record is not None and record.on_load == "merged"
    assert record.file_tensor_bytes == _file_tensor_bytes(lora["adapter"]) > 0
    assert record.r == 4 and record.target_modules == sorted(TARGETS) and record.modules == 16
    # merged: the weights are the base model's, as peft's merge_and_unload leaves them (the merged checkpoint)
    merged_file = (lora["merged"] / "model.safetensors").stat().st_size
    assert merged.profile.estimate["cpu"].weights_bytes == plain.profile.estimate["cpu"].weights_bytes
    assert abs(merged.profile.estimate["cpu"].weights_bytes - merged_file) < 4096  # the file adds its header
    assert any(note.startswith("adapter:") and "merged into the weights" in note for note in merged.profile.notes)
    # unmerged (4-bit): the adapter's tensors are weights, in the dtype peft loads them in. One prompt at a time:
    # no attention mask, so the MLP, where the LoRA path runs, makes the layer's peak (on this tiny model a batch's
    # mask, converted to float32 by SDPA, would make the attention step larger)
    q_plain = api.plan(lora["base"], inventory_file=cpu_inventory, max_input_tokens=600, max_new_tokens=MAX_NEW,
                       quantize="4bit", batch_size=1)  # fmt: skip
    q_lora = api.plan(lora["base"], inventory_file=cpu_inventory, max_input_tokens=600, max_new_tokens=MAX_NEW,
                      quantize="4bit", adapter=lora["adapter"], batch_size=1)  # fmt: skip
    assert q_lora.profile.adapter is not None and q_lora.profile.adapter.on_load == "unmerged"
    added = q_lora.profile.estimate["cpu"].weights_bytes - q_plain.profile.estimate["cpu"].weights_bytes
    assert added == _loaded_lora_bytes(lora) > 0
    # the LoRA path's intermediates are in each layer's measured peak: more than without it, and at most what
    # peft's forward allocates beside the base layer's output, by hand: x @ A^T (batch x tokens x r), its product
    # with B^T, that times the scaling and the sum (each batch x tokens x out), in float32
    layer = next(c for c in q_lora.plan.costs if c.kind == "layer")
    without = next(c for c in q_plain.plan.costs if c.name == layer.name)
    rows = 600 + MAX_NEW
    assert 0 < layer.activation_bytes - without.activation_bytes <= rows * (4 + 3 * 128) * 4


def test_profile_records_the_adapter_and_reads_it_back(
    lora: dict[str, Path], cpu_inventory: Path, tmp_path: Path
) -> None:
    profile = tmp_path / "p.yaml"
    assert _plan(lora["base"], profile, cpu_inventory, "--adapter", str(lora["adapter"])) == 0
    read = read_profile(profile)
    assert read.adapter is not None
    assert read.adapter.path == str(lora["adapter"]) and read.adapter.fingerprint.startswith("sha256:")
    assert read.adapter.base_model_name_or_path == json.loads(
        (lora["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"]  # fmt: skip
    without = tmp_path / "without.yaml"
    assert _plan(lora["base"], without, cpu_inventory) == 0
    assert "adapter" not in without.read_text()  # profiles without one are unchanged


def test_float32_answers_equal_the_merged_models(
    lora: dict[str, Path], cpu_inventory: Path, deepke_dir: Path, tmp_path: Path
) -> None:
    source = deepke_dir / "NER" / "test.json"
    with_adapter, merged, plain = tmp_path / "lora.yaml", tmp_path / "merged.yaml", tmp_path / "plain.yaml"
    assert _plan(lora["base"], with_adapter, cpu_inventory, "--adapter", str(lora["adapter"])) == 0
    assert _plan(lora["merged"], merged, cpu_inventory) == 0
    assert _plan(lora["base"], plain, cpu_inventory) == 0
    for profile, out in ((with_adapter, "lora.jsonl"), (merged, "merged.jsonl"), (plain, "plain.jsonl")):
        assert _run(profile, source, tmp_path / out) == 0
    got, expected, base = (_outputs(tmp_path / name) for name in ("lora.jsonl", "merged.jsonl", "plain.jsonl"))
    assert len(got) == len(expected) == 6
    assert got == expected
    assert got != base  # the adapter changes the answers: the comparison can fail


@needs_bnb_on_cpu
def test_qlora_4bit_unmerged_runs_on_cpu_like_peft(
    lora: dict[str, Path], cpu_inventory: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import BitsAndBytesConfig

    source = deepke_dir / "NER" / "test.json"
    profile = tmp_path / "q.yaml"
    assert _plan(lora["base"], profile, cpu_inventory, "--quantize", "4bit", "--adapter", str(lora["adapter"])) == 0
    capsys.readouterr()
    assert _run(profile, source, tmp_path / "out.jsonl") == 0
    table = capsys.readouterr().err
    assert "+0.00%" in table  # loaded weights (peft's LoRA tensors included) are the planned ones
    # independent route: transformers' own 4-bit load, peft's own adapter load, greedy generate one prompt at a time
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(lora["base"], quantization_config=quant, device_map={"": "cpu"},
                                                **dtype_kw(torch.float32))  # fmt: skip
    reference = peft.PeftModel.from_pretrained(base, str(lora["adapter"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(lora["base"])
    expected = [tokenizer.decode(alone(reference, llama2_zh_ids(tokenizer, r.instruction), [2], MAX_NEW),
                                 skip_special_tokens=True) for r in read_converted(source)]  # fmt: skip
    assert _outputs(tmp_path / "out.jsonl") == expected


def test_an_adapter_for_another_base_is_refused_before_loading(
    lora: dict[str, Path], cpu_inventory: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _plan(lora["base"], tmp_path / "p.yaml", cpu_inventory, "--adapter", str(lora["other"])) == 3
    err = capsys.readouterr().err
    assert "made for another base model" in err and "32 -> 32 features, the model's layer 64 -> 64" in err
    # oneke-run checks the shapes too, before any weight is read: a profile naming that adapter (as if planned
    # with it), over a checkpoint whose weights are all NaN, stops at exit 3, not at the NaN check (exit 2)
    model = tmp_path / "nan-model"
    shutil.copytree(lora["base"], model)
    weights = model / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    weights.write_bytes(weights.read_bytes()[:header] + b"\xff" * (weights.stat().st_size - header))
    nan_profile = tmp_path / "nan.yaml"
    assert _plan(model, nan_profile, cpu_inventory, "--adapter", str(lora["adapter"])) == 0
    out = tmp_path / "out.jsonl"
    assert _run(nan_profile, deepke_dir / "NER" / "test.json", out) == 2  # loaded, the NaN weights are found
    assert "NaN" in capsys.readouterr().err
    recorded = read_profile(nan_profile).adapter
    assert recorded is not None
    wrong = read_adapter(lora["other"])
    text = nan_profile.read_text()
    nan_profile.write_text(text.replace(recorded.fingerprint, wrong.fingerprint)
                           .replace(f"path: {recorded.path}", f"path: {lora['other']}"))  # fmt: skip
    assert _run(nan_profile, deepke_dir / "NER" / "test.json", out) == 3
    assert "made for another base model" in capsys.readouterr().err


def test_a_changed_or_missing_adapter_is_refused(
    lora: dict[str, Path], cpu_inventory: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(lora["adapter"], adapter)
    profile, plain = tmp_path / "p.yaml", tmp_path / "plain.yaml"
    assert _plan(lora["base"], profile, cpu_inventory, "--adapter", str(adapter)) == 0
    assert _plan(lora["base"], plain, cpu_inventory) == 0
    source, out = deepke_dir / "NER" / "test.json", tmp_path / "out.jsonl"
    capsys.readouterr()
    data = bytearray((adapter / ADAPTER_WEIGHTS).read_bytes())
    data[-1] ^= 0x40  # one bit of the last lora_B weight: retrained, or a different download
    (adapter / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    assert _run(profile, source, out) == 3
    assert "not those the profile was planned with" in capsys.readouterr().err
    assert _run(plain, source, out, "--adapter", str(adapter)) == 3  # planned without one: its memory is not counted
    assert "planned without an adapter" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("tool", ["oneke-plan", "oneke-run"])
def test_without_peft_one_line_and_exit_2(
    tool: str, lora: dict[str, Path], cpu_inventory: Path, tmp_path: Path, deepke_dir: Path
) -> None:
    profile = tmp_path / "p.yaml"
    assert _plan(lora["base"], profile, cpu_inventory, "--adapter", str(lora["adapter"])) == 0
    if tool == "oneke-plan":
        args = [str(lora["base"]), "--inventory", str(cpu_inventory), "--adapter", str(lora["adapter"])]
        module = "oneke_plan.cli.plan"
    else:
        args = ["--profile", str(profile), "--input", str(deepke_dir / "NER" / "test.json"), "--output",
                str(tmp_path / "out.jsonl")]  # fmt: skip
        module = "oneke_plan.cli.run"
    # a child process in which `import peft` fails, as where the [lora] extra is not installed
    code = f"import sys; sys.modules['peft'] = None; from {module} import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"{tool}: error: {PEFT_MISSING}"


@pytest.mark.skipif(bnb_quantizes_on_cpu(), reason="only transformers < 4.53 cannot run bitsandbytes on the CPU")
def test_qlora_on_the_cpu_alone_is_refused_on_old_transformers(
    lora: dict[str, Path], cpu_inventory: Path, deepke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "q.yaml"
    assert _plan(lora["base"], profile, cpu_inventory, "--quantize", "4bit", "--adapter", str(lora["adapter"])) == 0
    capsys.readouterr()
    assert _run(profile, deepke_dir / "NER" / "test.json", tmp_path / "out.jsonl") == 2
    assert "cannot do with bitsandbytes" in capsys.readouterr().err.strip().splitlines()[-1]


def test_what_is_not_a_plain_lora_adapter_is_one_line_and_exit_2(
    lora: dict[str, Path], cpu_inventory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def plan_with(folder: Path) -> str:
        assert _plan(lora["base"], tmp_path / "p.yaml", cpu_inventory, "--adapter", str(folder)) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "not a folder" in plan_with(tmp_path / "nowhere")
    dora = tmp_path / "dora"
    shutil.copytree(lora["adapter"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    assert "DoRA" in plan_with(dora)
    for targets, says in ((["k_proj", *TARGETS], "4 layers the file has no tensors for"),
                          (TARGETS[:-1], "not wrap 4 layers the file has tensors for")):  # fmt: skip
        (dora / "adapter_config.json").write_text(json.dumps(config | {"target_modules": targets}))
        assert says in plan_with(dora)
    (dora / "adapter_config.json").write_text(json.dumps(config))
    (dora / ADAPTER_WEIGHTS).write_bytes((dora / ADAPTER_WEIGHTS).read_bytes()[:-100])
    assert "not a valid safetensors file" in plan_with(dora)
    (dora / ADAPTER_WEIGHTS).unlink()
    assert "adapter_model.safetensors: missing" in plan_with(dora)


def test_api_load_applies_the_profiles_adapter(lora: dict[str, Path], cpu_inventory: Path, tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    assert _plan(lora["base"], profile, cpu_inventory, "--adapter", str(lora["adapter"])) == 0
    model, tokenizer = api.load(profile)  # the adapter: the profile's
    reference = AutoModelForCausalLM.from_pretrained(lora["merged"], **dtype_kw(torch.float32)).eval()
    ids = torch.tensor([tokenizer("[INST] 抽取实体 [/INST]")["input_ids"]])
    with torch.inference_mode():
        got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert not any("lora_" in name for name, _ in model.named_parameters())  # merged: plain Linear layers again
    torch.testing.assert_close(got, expected)
