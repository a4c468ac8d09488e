"""OneKE as it is released: its tokenizer is SentencePiece's tokenizer.model alone (no tokenizer.json), with a
tokenizer_config.json asking for the slow LlamaTokenizer in legacy mode, and its weights are three safetensors
shards with an index, fetched into the Hugging Face cache as zjunlp/OneKE.

The SentencePiece model here is trained inside the test by sentencepiece's own trainer on DeepKE's Chinese and
English text; the truth for token ids is sentencepiece itself (BOS + SentencePieceProcessor.encode), the truth for
answers is transformers' from_pretrained + greedy generate, one prompt at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import DEEPKE_DIR, put_in_hub_cache
from packaging.version import Version
from reference import alone
from tiny_checkpoint import build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from oneke_plan.extract import inputs
from oneke_plan.extract.runner import encode_prompts
from oneke_plan.formats import oneke
from oneke_plan.load.loader import load_tokenizer
from oneke_plan.measure.compat import dtype_kw
from oneke_plan.plan.model_source import resolve_model

TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
ROOT = Path(__file__).parents[2]


def deepke_texts() -> list[str]:
    """Every line of DeepKE's sample and test files: Chinese and English text, schemas, instructions."""
    return [
        line
        for task in TASKS
        for name in ("sample.json", "test.json", "schema.json")
        for line in (DEEPKE_DIR / task / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def written_out_prompt(instruction: str) -> str:
    """DeepKE's llama2_zh prompt written out here (/work/shared/oneke/README.md, "Prompt format")."""
    system = "You are a helpful assistant. 你是一个乐于助人的助手。"
    return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA in float32 whose tokenizer is a SentencePiece model trained on DeepKE's text."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("sp_model"), tokenizer="sentencepiece", texts=deepke_texts(), dtype=torch.float32
    )


def every_deepke_prompt() -> list[inputs.PromptRecord]:
    """The records of every DeepKE test file, and of every sample file converted from raw text with its schema."""
    records = [r for task in TASKS for r in inputs.read_converted(DEEPKE_DIR / task / "test.json")]
    for task in TASKS:
        schema = oneke.load_schema_file(str(DEEPKE_DIR / task / "schema.json"), task)
        records += inputs.read_raw(DEEPKE_DIR / task / "sample.json", task, schema, "zh")
    return records


def test_released_tokenizer_files_have_no_tokenizer_json(sp_model_dir: Path) -> None:
    names = {p.name for p in sp_model_dir.iterdir()}
    assert "tokenizer.model" in names and "tokenizer.json" not in names
    config = json.loads((sp_model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is True and config["use_fast"] is False


def test_ids_of_every_deepke_prompt_are_sentencepieces_own(sp_model_dir: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_dir / "tokenizer.model"))
    tokenizer = load_tokenizer(resolve_model(str(sp_model_dir)))
    # the class the config names; transformers 4 loads the slow SentencePiece one it asks for (use_fast: false),
    # transformers 5 has only the one built on the tokenizers library, converted from tokenizer.model
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert tokenizer.is_fast == (Version(transformers.__version__) >= Version("5"))
    records = every_deepke_prompt()
    assert len(records) > 341  # the test files' 341 prompts and the samples'
    got = [item.ids for item in encode_prompts(tokenizer, records)]  # the route oneke-run takes
    expected = [[sp.bos_id(), *sp.encode(written_out_prompt(r.instruction))] for r in records]
    equal = sum(g == e for g, e in zip(got, expected, strict=True))
    assert equal == len(records)
    # the vocabulary was learnt on this text: prompts are pieces, not bytes
    assert sum(map(len, expected)) < 0.5 * sum(len(written_out_prompt(r.instruction).encode()) for r in records)


def test_templates_of_several_parts_encode_each_part_as_the_authors_do(sp_model_dir: Path) -> None:
    """DeepKE's encoder encodes a template's prefix, separator and user turn each on its own; sentencepiece starts
    every text with a word boundary, so the joined text would be other ids than the models were trained on."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_dir / "tokenizer.model"))
    tokenizer = load_tokenizer(resolve_model(str(sp_model_dir)))
    records = inputs.read_converted(DEEPKE_DIR / "NER" / "test.json")
    alpaca = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    chat = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    )
    segments = {  # the authors' parts, written out from their template.py
        "alpaca": lambda q: [alpaca, "\n\n", f"### Instruction:\n{q}\n\n### Response:\n"],
        "default": lambda q: [chat, "\n", f"Human: {q}\nAssistant:"],
        "vicuna": lambda q: [chat, f"USER: {q} ASSISTANT:"],
    }
    for name, parts in segments.items():
        got = [item.ids for item in encode_prompts(tokenizer, records, name)]
        expected = [[sp.bos_id(), *(i for part in parts(r.instruction) for i in sp.encode(part))] for r in records]
        assert got == expected, name
        joined = [[sp.bos_id(), *sp.encode("".join(parts(r.instruction)))] for r in records]
        assert joined != expected, name  # the seams matter: this test can tell the two routes apart


def hide_packages_script(packages: list[str], code: str) -> str:
    """A child Python in which `packages` are not installed, as far as importing and transformers can tell."""
    return (
        "import importlib.abc, importlib.util, sys\n"
        f"HIDDEN = {packages!r}\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN or name.startswith('google.protobuf') and 'protobuf' in HIDDEN:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "real = importlib.util.find_spec\n"
        "def find_spec(name, *args, **kwargs):\n"
        "    top = 'protobuf' if name.startswith('google.protobuf') else name.split('.')[0]\n"
        "    return None if top in HIDDEN else real(name, *args, **kwargs)\n"
        "importlib.util.find_spec = find_spec\n" + code
    )


@pytest.mark.parametrize("hidden", [["sentencepiece", "protobuf"], ["sentencepiece"]])
def test_missing_tokenizer_library_is_one_line_naming_it(
    sp_model_dir: Path, tmp_path: Path, hidden: list[str]
) -> None:
    code = (
        "import sys\nfrom oneke_plan.cli.run import main\n"
        f"sys.exit(main(['--profile', {str(tmp_path / 'p.yaml')!r}, '--input', "
        f"{str(DEEPKE_DIR / 'NER' / 'test.json')!r}, '--output', {str(tmp_path / 'out.jsonl')!r}]))\n"
    )
    plan = [sys.executable, "-m", "oneke_plan.cli.plan", str(sp_model_dir), "--max-new-tokens", "4", "-o"]
    subprocess.run([*plan, str(tmp_path / "p.yaml")], check=True, capture_output=True)
    done = subprocess.run(
        [sys.executable, "-c", hide_packages_script(hidden, code)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"pip install {hidden[0]}" in lines[0] and "sentencepiece" in lines[0]
    assert "copy them again" not in lines[0] and "the files themselves are fine" in lines[0]
    assert not (tmp_path / "out.jsonl").exists()


# ------------------------------------------------------------------------- the release, from the hub cache


def test_released_layout_from_the_hub_cache_runs_offline_like_generate(tmp_path: Path) -> None:
    staged = build_tiny_llama(
        tmp_path / "staged", tokenizer="sentencepiece", texts=deepke_texts(), shards=3, dtype=torch.float32
    )
    assert len(list(staged.glob("model-0000?-of-00003.safetensors"))) == 3
    assert (staged / "model.safetensors.index.json").is_file()
    snapshot = put_in_hub_cache(staged, tmp_path / "hf", "zjunlp/OneKE")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    bin_dir = Path(sys.executable).parent
    profile = tmp_path / "p.yaml"
    planned = subprocess.run(
        [bin_dir / "oneke-plan", "zjunlp/OneKE", "--max-input-tokens", "1024", "--max-new-tokens", "6",
         "--batch-size", "4", "-o", profile],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert "prompt template: llama2_zh" in planned.stderr
    out = tmp_path / "out.jsonl"
    ran = subprocess.run(
        [bin_dir / "oneke-run", "--profile", profile, "--model", "zjunlp/OneKE", "--input",
         DEEPKE_DIR / "NER" / "test.json", "--output", out, "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(snapshot, use_fast=False)
    reference = AutoModelForCausalLM.from_pretrained(snapshot, **dtype_kw(torch.float32)).eval()
    records = inputs.read_converted(DEEPKE_DIR / "NER" / "test.json")
    expected = []
    for record in records:
        text = written_out_prompt(record.instruction)
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        expected.append(tokenizer.decode(alone(reference, ids, [tokenizer.eos_token_id], 6), skip_special_tokens=True))
    assert [line["raw_output"] for line in lines] == expected
    assert all(text for text in expected)  # answers of several tokens: the comparison can fail
