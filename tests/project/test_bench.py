"""The benchmarks' own routes, run small: no test ran them, and both once broke unseen when fit.block_costs
changed (a TypeError in every cell). Each is checked against another route, not against itself."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import storage_bytes_by_owner
from transformers import AutoModelForCausalLM

from oneke_plan.api.planner import Planner
from oneke_plan.core.sizes import GiB
from oneke_plan.measure.compat import dtype_kw
from oneke_plan.plan.inventory import Gpu, Inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_plan_quality_exhaustive_optimum_equals_the_planners_largest_context() -> None:
    """OneKE on 24 + 12 GiB, batch 4 with 512 new tokens: the benchmark's depth-first search over every contiguous
    split and the planner's fill-then-bisect reach the same largest context (1,856 tokens in docs/benchmarks.md)."""
    plan_quality = bench_module("plan_quality")
    planner = Planner(resolve_model("oneke"))
    workload = Workload(2048, 512, 4)
    settings = PlanSettings(workload=workload, reserve_bytes=plan_quality.RESERVE)
    inventory = Inventory(tuple(Gpu(i, f"GPU {i}", s * GiB, s * GiB, None) for i, s in enumerate((24, 12))), 0)
    ours = planner.largest(inventory, settings, "max_input_tokens")
    optimum = plan_quality.exact_largest_context(planner, "bfloat16", Quantization("none"), workload, (24, 12))
    assert ours == optimum > 0


def test_memory_accuracy_predicts_the_weights_transformers_loads(tiny_model_dir: Path) -> None:
    """memory_accuracy's prediction for the whole model on one device, in bf16, against the bytes of every
    distinct storage (parameters and buffers, persistent or not) of transformers' own load of the checkpoint."""
    memory_accuracy = bench_module("memory_accuracy")
    weights, kv, workspace = memory_accuracy.predicted(tiny_model_dir, "none", Workload(16, 4, 2))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), **dtype_kw(torch.bfloat16))
    assert weights == sum(storage_bytes_by_owner(model, [""]).values())  # parameters and buffers, each storage once
    assert kv > 0 and workspace > 0


def test_speed_prediction_reads_the_weights_transformers_loads_and_decodes(tiny_model_dir: Path) -> None:
    """speed_prediction's route on the tiny model: its plan's bytes per decoding step are the loaded float32
    weights without the embedding table (transformers' own load) plus the KV cache by hand; the probes measure
    something; oneke-run's decoder, run as the benchmark runs it, counts its steps."""
    speed_prediction = bench_module("speed_prediction")
    assert speed_prediction.read_bandwidth(16 * 2**20, 1) > 0 and speed_prediction.matmul_throughput(64, 1) > 0
    prompt, new = 12, 5
    result = speed_prediction.predicted(tiny_model_dir, prompt, new, 10e9, 1e11)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), **dtype_kw(torch.float32))
    config = model.config
    weights = sum(storage_bytes_by_owner(model, [""]).values())
    embedding = model.get_input_embeddings().weight.numel() * 4
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_key_value_heads * head_dim * 4 * (prompt + new) * config.num_hidden_layers  # batch 1
    speed = result.profile.speed
    assert speed["devices"]["cpu"]["decode_read_bytes"] == weights - embedding + kv
    assert speed["decode_tokens_per_second"] == pytest.approx(10e9 / (weights - embedding + kv), rel=1e-5)
    from oneke_plan import api

    loaded, tokenizer = api.load(result.profile, tiny_model_dir)
    with torch.inference_mode():
        prefill_s, decode_s, steps = speed_prediction.measured(loaded, tokenizer, [1, 5, 6, 7, 8], 3)
    assert prefill_s > 0 and 1 <= steps <= 3 and decode_s >= 0


def test_real_model_speed_plain_generate_answers_as_oneke_runs_hf_engine(smollm2_dir: Path) -> None:
    """real_model_speed's routes on SmolLM2-135M-Instruct (float32): its prompts are the model's chat template
    rendered and encoded by hand as the issue gives it (apply_chat_template, then the tokenizer without special
    tokens), 20 English and 7 x per-file DeepKE; its plain batched generate (left padding by the tokenizer) gives
    the answers of oneke-run's hf engine through api.extract, whose ids it captures."""
    from transformers import AutoTokenizer

    from oneke_plan import api
    from oneke_plan.extract.engines import hf_decoder

    bench = bench_module("real_model_speed")
    records, sources = bench.read_prompts(1)
    assert len(records) == 20 + 7 and sources.count("en-NER") == 12 and sources.count("zh-SPO") == 1
    records = records[:2] + records[12:13]  # two NER prompts of different lengths and one RE
    max_new, batch = 6, 2
    profile, longest = bench.planned(smollm2_dir, records, max_new, batch)
    assert profile.template == "model"
    model, tokenizer = api.load(profile, smollm2_dir)
    fresh = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = []
    for record in records:
        text = fresh.apply_chat_template(
            [{"role": "user", "content": record.instruction}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(fresh(text, add_special_tokens=False)["input_ids"])
    assert longest == max(map(len, prompts)) and len(set(map(len, prompts))) > 1  # left padding is exercised
    ours = bench.hf_engine(model, tokenizer, profile, records)
    eos = hf_decoder(model, tokenizer, profile, max_new, smollm2_dir).eos
    plain = bench.plain_generate(model, tokenizer, prompts, list(eos), max_new, batch)
    assert plain == ours and all(ours)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_every_name_bench_and_tools_import_from_the_package_exists() -> None:
    """A script no test runs whole still imports from the package by name: when a name moves (OutputWriter left
    extract.inputs), the script breaks unseen. Every `from oneke_plan... import NAME` in bench/ and tools/, at any
    depth, is imported for real, and so is every name they import from each other (bnb_cpu_memory.py's --profile
    once imported profiler_peak from memory_accuracy after it had moved to tools/allocated_peak.py)."""
    import ast

    scripts = sorted([*BENCH.glob("*.py"), *(BENCH.parent / "tools").glob("*.py")])
    local = {path.stem for path in scripts}
    missing = []
    sys.path[:0] = [str(BENCH), str(BENCH.parent / "tools")]
    try:
        for path in scripts:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                name = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
                if name.startswith("oneke_plan") or name in local:
                    module = importlib.import_module(name)
                    missing += [f"{path.name}: {name}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    finally:
        del sys.path[:2]
    assert missing == []
