"""oneke-plan and oneke-run on real trained weights: SmolLM2-135M-Instruct (the package index's GGUF, converted to a
float32 safetensors checkpoint by tools/real_checkpoint.py), all through the real CLIs.

What random weights cannot show: a trained model's chat template and EOS. SmolLM2 is a LLaMA whose vocabulary is
none of DeepKE's, and its tokenizer carries ChatML, so its default template is its own; its answers end at
`<|im_end|>`. It rarely ends an answer early on DeepKE's Chinese prompts, so short English prompts (which it
answers in 2-20 tokens) sit beside them: rows that finish at different steps leave the batch and others join it.

The reference is transformers' own: `apply_chat_template(..., tokenize=True)` for the prompt's ids and greedy
`generate` one prompt at a time (tests/reference.py), none of oneke_plan's prompt or decoding code.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import needs_bnb_on_cpu, quant_state_tensors
from reference import alone

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.cli.score import main as score_main
from oneke_plan.measure.compat import dtype_kw

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_NEW = 32
# (instruction, input): short English questions in OneKE's instruction form, which SmolLM2 answers and ends
SHORT = [
    ("Which city is the capital? Answer with one word.", "Paris is the capital of France."),
    ("Who is the person here? Answer with the name only.", "Alice met Bob."),
    ("Answer yes or no: is there a city in the input?", "Tim lives in Berlin."),
    ("What is the sum? Answer with a number only.", "2 + 2"),
    ("Name the organization in the input.", "Tim Cook runs Apple."),
    ("Summarize the input in three words.", "The cat sat on the mat all day long."),
]
SCHEMA = ["person", "organization", "location"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def plan(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    inventory = out.with_suffix(".inventory.yaml")
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    argv = [str(model), "--inventory", str(inventory), "--max-input-tokens", "512", "--max-new-tokens", str(MAX_NEW)]
    assert plan_main([*argv, "--batch-size", "4", "-o", str(out), *extra]) == 0
    return dict(yaml.safe_load(out.read_text()))


@pytest.fixture(scope="module")
def prompts(deepke_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The short English prompts and two of DeepKE's Chinese NER prompts, as converted lines."""
    path = tmp_path_factory.mktemp("real") / "prompts.json"
    lines = [
        {"id": f"en{i}", "task": "NER", "instruction": json.dumps({"instruction": q, "schema": SCHEMA, "input": text})}
        for i, (q, text) in enumerate(SHORT)
    ]
    lines += [json.loads(line) for line in (deepke_dir / "NER" / "test.json").read_text().splitlines()[1:3]]
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def float32_run(smollm2_dir: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("f32")
    profile = plan(smollm2_dir, folder / "f32.yaml", "--dtype", "float32")
    out = folder / "out.jsonl"
    assert run_main(["--profile", str(folder / "f32.yaml"), "--input", str(prompts), "--output", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    return {"profile": profile, "lines": read_jsonl(out), "input": prompts, "profile_file": folder / "f32.yaml"}


def test_the_default_template_is_the_models_own(float32_run: dict[str, Any]) -> None:
    assert float32_run["profile"]["template"] == "model"


def test_float32_answers_equal_generate_one_prompt_at_a_time(smollm2_dir: Path, float32_run: dict[str, Any]) -> None:
    """Every answer equals transformers' greedy generate of the same chat prompt alone, ending at <|im_end|>;
    some end early and some run to max_new_tokens, so rows left the batch at different steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), **dtype_kw(torch.float32)).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == im_end  # the trained model's EOS, not an assumption
    lengths = []
    for line in float32_run["lines"]:
        messages = [{"role": "user", "content": line["instruction"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding on 5.x, a list on 4.x
        answer = alone(model, ids, [im_end], MAX_NEW)
        lengths.append(len(answer))
        assert line["raw_output"] == tokenizer.decode(answer, skip_special_tokens=True), line["id"]
        assert "<|im_end|>" not in line["raw_output"]
    assert min(lengths) < 8 and max(lengths) == MAX_NEW, lengths  # ends at different steps, and at the limit


def test_the_english_examples_run_and_score(
    smollm2_dir: Path, float32_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raw English text with a schema (the demo's input) runs on the real model and oneke-score scores it against
    the records' own gold labels."""
    examples = Path(__file__).resolve().parents[2] / "examples" / "english" / "NER.json"
    small = tmp_path / "ner.json"
    small.write_text("".join(examples.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    profile = tmp_path / "p.yaml"
    plan(smollm2_dir, profile, "--dtype", "float32")
    out = tmp_path / "ner.jsonl"
    argv = ["--profile", str(profile), "--input", str(small), "--output", str(out), "--task", "NER"]
    assert run_main([*argv, "--schema", json.dumps(SCHEMA), "--lang", "en", "--no-progress", "--max-new-tokens",
                     "8"]) == 0  # fmt: skip
    lines = read_jsonl(out)
    assert [json.loads(line["label"])[0]["entity"] for line in lines] == ["Barack Obama", "Tim Cook", "Angela Merkel"]
    capsys.readouterr()
    assert score_main([str(out)]) == 0
    table = capsys.readouterr().out
    assert "NER" in table and "gold" in table


def loaded_weight_bytes(model: Any) -> int:
    """Bytes of every parameter's and buffer's storage of a model transformers loaded itself, each storage once,
    with the tensors bitsandbytes keeps beside a quantized weight."""
    seen: set[int] = set()
    total = 0
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        for t in [tensor, *quant_state_tensors(tensor)]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(("--dtype", "bfloat16"), id="bf16"),
        pytest.param(("--quantize", "8bit", "--dtype", "float32"), id="8bit", marks=needs_bnb_on_cpu),
        pytest.param(("--quantize", "4bit", "--dtype", "float32"), id="4bit", marks=needs_bnb_on_cpu),
    ],
)
def test_bf16_and_quantized_runs_complete_with_planned_equal_to_loaded(
    smollm2_dir: Path, prompts: Path, tmp_path: Path, mode: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each completes every prompt, and the planned weight bytes are what transformers itself loads (with
    bitsandbytes where quantized: the route oneke-run does not take to count). How many answers change against
    float32 is measured in bench/real_model_quality.py, not asserted: near-ties flip."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    profile = plan(smollm2_dir, tmp_path / "p.yaml", *mode)
    out = tmp_path / "out.jsonl"
    assert run_main(["--profile", str(tmp_path / "p.yaml"), "--input", str(prompts), "--output", str(out),
                     "--no-progress", "--max-new-tokens", "8"]) == 0  # fmt: skip
    lines = read_jsonl(out)
    assert len(lines) == len(SHORT) + 2 and not [line for line in lines if "error" in line]
    extra: dict[str, Any] = {}
    if "8bit" in mode:
        extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if "4bit" in mode:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_dir), **dtype_kw(getattr(torch, profile["dtype"])), device_map={"": "cpu"}, **extra
    )
    assert profile["estimate"]["cpu"]["weights_bytes"] == loaded_weight_bytes(model)


@pytest.mark.vllm
@pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed here: `make test VERSIONS=vllm` runs it")
def test_the_vllm_engine_answers_as_the_hf_engine(float32_run: dict[str, Any], tmp_path: Path) -> None:
    """The same profile and prompts on vLLM's engine (fed the runner's token ids, greedy, cut at <|im_end|>): every
    answer equals the hf engine's, itself equal to transformers' generate alone (above)."""
    out = tmp_path / "vllm.jsonl"
    argv = ["--profile", str(float32_run["profile_file"]), "--input", str(float32_run["input"]), "--output", str(out)]
    assert run_main([*argv, "--no-progress", "--engine", "vllm"]) == 0
    hf = {line["id"]: line["raw_output"] for line in float32_run["lines"]}
    assert {line["id"]: line["raw_output"] for line in read_jsonl(out)} == hf
