"""DeepKE's chat templates (`--template`): the prompt text of each is the authors' string, written out here by hand
from their template.py (prefix with the system prompt, separator, user turn; LLaMA-2's system block folded into the
first [INST]); the default comes from the model; the profile records it; oneke-run uses it, checks the tokenizer
has the special tokens it places, and stops at its stop words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_checkpoint import build_tiny_llama
from transformers import AutoConfig, AutoTokenizer

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.extract.inputs import read_converted
from oneke_plan.extract.runner import encode_prompts
from oneke_plan.formats import templates
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.profile import read_profile

CONFIGS = Path(__file__).parents[1] / "configs"
Q = '{"instruction": "你是专门进行实体抽取的专家。", "schema": ["人物"], "input": "2024年"}'
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)
CHAT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
GLM3 = (
    "You are ChatGLM3, a large language model trained by Zhipu.AI. Follow the user's instructions carefully. "
    "Respond using markdown."
)
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
H = "<|start_header_id|>"
E = "<|end_header_id|>"
# The authors' first-turn prompt for each template, BOS aside (the tokenizer adds it where the model has one).
AUTHORS = {
    "llama2_zh": f"[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n{Q} [/INST]",
    "llama2": f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n{Q} [/INST]",
    "llama3": f"{H}system{E}\n\nYou are a helpful assistant.<|eot_id|>{H}user{E}\n\n{Q}<|eot_id|>{H}assistant{E}\n\n",
    "llama3_zh": f"{H}system{E}\n\nYou are a helpful assistant. 你是一个乐于助人的助手。<|eot_id|>{H}user{E}\n\n{Q}"
    f"<|eot_id|>{H}assistant{E}\n\n",
    "qwen": f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "baichuan": f"<reserved_102>{Q}<reserved_103>",
    "baichuan2": f"<reserved_106>{Q}<reserved_107>",
    "mistral": f"[INST] {Q} [/INST]",  # empty system: no prefix, so no separator either
    "chatglm2": f"[gMASK]sop\n\n[Round 1]\n\n问：{Q}\n\n答：",
    "chatglm3": f"[gMASK]sop<|system|>\n{GLM3}<|user|>\n{Q}<|assistant|>",
    "alpaca": f"{ALPACA}\n\n### Instruction:\n{Q}\n\n### Response:\n",
    "vicuna": f"{CHAT}USER: {Q} ASSISTANT:",
    "default": f"{CHAT}\nHuman: {Q}\nAssistant:",
    "vanilla": Q,
}


def test_every_template_is_the_authors_string() -> None:
    assert set(templates.DEEPKE_TEMPLATES) == set(AUTHORS)
    assert set(templates.TEMPLATES) == {*AUTHORS, templates.MODEL_TEMPLATE}
    for name, expected in AUTHORS.items():
        assert templates.TEMPLATES[name].render(Q) == expected, name


# The authors' stop_words (template.py); every other template has none and ends at the model's EOS.
AUTHORS_STOP_WORDS = {
    "llama3": ("<|eot_id|>",),
    "llama3_zh": ("<|eot_id|>",),
    "qwen": ("<|im_end|>",),
    "chatglm3": ("<|user|>", "<|observation|>"),
}


def test_every_template_stops_at_the_authors_stop_words() -> None:
    for name in templates.DEEPKE_TEMPLATES:
        tmpl = templates.TEMPLATES[name]
        assert tmpl.stop_words == AUTHORS_STOP_WORDS.get(name, ()), name


def test_placeholder_text_inside_the_query_is_left_alone() -> None:
    query = "{{system}} {{idx}} {{query}}"
    assert templates.TEMPLATES["chatglm2"].render(query) == f"[gMASK]sop\n\n[Round 1]\n\n问：{query}\n\n答："
    assert templates.TEMPLATES["llama2_zh"].render(query).endswith(f"\n\n{query} [/INST]")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("oneke", "llama2_zh"),
        (str(CONFIGS / "llama-3.2-1b.json"), "llama3"),
        (str(CONFIGS / "qwen2.5-0.5b.json"), "qwen"),
    ],
)
def test_default_template_follows_the_model(config: str, expected: str) -> None:
    if config == "oneke":
        data = resolve_model("oneke").config
    else:
        data = json.loads(Path(config).read_text())
    assert templates.default_template(data)[0] == expected


def test_a_model_of_no_known_family_gets_onekes_template_said_so() -> None:
    name, why = templates.default_template({"model_type": "gpt2", "vocab_size": 50257})
    assert name == "llama2_zh" and "--template" in why
    # transformers' own "glm" is GLM-4, whose chat format is not ChatGLM3's and for which DeepKE defines none
    name, why = templates.default_template({"model_type": "glm", "vocab_size": 151552})
    assert name == "llama2_zh" and "--template" in why


def test_a_model_of_no_known_family_with_a_chat_template_gets_its_own() -> None:
    """SmolLM2 is a LLaMA of a 49,152-token vocabulary: DeepKE names no template, its tokenizer carries ChatML."""
    name, why = templates.default_template({"model_type": "llama", "vocab_size": 49152}, has_chat_template=True)
    assert name == "model" and "own chat template" in why
    # DeepKE's models keep DeepKE's templates, chat template or not (OneKE's tokenizer carries none; LLaMA-3's does)
    assert templates.default_template(resolve_model("oneke").config, has_chat_template=True)[0] == "llama2_zh"
    llama3 = json.loads((CONFIGS / "llama-3.2-1b.json").read_text())
    assert templates.default_template(llama3, has_chat_template=True)[0] == "llama3"


def test_the_profile_records_the_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    assert plan_main([str(tiny_model_dir), "--max-new-tokens", "4", "--template", "vicuna", "-o", str(profile)]) == 0
    assert yaml.safe_load(profile.read_text())["template"] == "vicuna"
    assert plan_main([str(tiny_model_dir), "--max-new-tokens", "4", "-o", str(profile), "--overwrite"]) == 0
    assert yaml.safe_load(profile.read_text())["template"] == "llama2_zh"


@pytest.mark.parametrize("value", ["nonsense", ["qwen"], {"name": "qwen"}])
def test_a_profile_without_template_runs_onekes_and_a_bad_one_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, deepke_dir: Path, capsys: pytest.CaptureFixture[str], value: object
) -> None:
    profile = tmp_path / "p.yaml"
    assert plan_main([str(tiny_model_dir), "--max-new-tokens", "2", "-o", str(profile)]) == 0
    data = yaml.safe_load(profile.read_text())
    del data["template"]
    old = tmp_path / "old.yaml"  # as written before the key existed
    old.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert read_profile(old).template == "llama2_zh"
    data["template"] = value  # a list or a mapping is no dict key: it once escaped as an internal error (exit 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    args = ["--input", str(deepke_dir / "NER" / "test.json"), "--no-progress"]
    capsys.readouterr()
    assert run_main(["--profile", str(bad), "--output", str(tmp_path / "a.jsonl"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"template {value!r} is not one of" in err[0], err


def authors_qwen_ids(tokenizer, instruction: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The authors' route for the qwen template: special tokens by id, each text part encoded on its own, after the
    BOS the tokenizer adds (the tiny tokenizer has one; Qwen's own has none)."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    parts = [[start], "system\nYou are a helpful assistant.", [end], "\n", [start], f"user\n{instruction}", [end],
             "\n", [start], "assistant\n"]  # fmt: skip
    ids = [tokenizer.bos_token_id]
    for part in parts:
        ids += part if isinstance(part, list) else tokenizer.encode(part, add_special_tokens=False)
    return ids


@pytest.fixture(scope="module")
def chatml_model_dir(tmp_path_factory: pytest.TempPathFactory, deepke_dir: Path) -> Path:
    """A tiny float32 LLaMA whose tokenizer knows Qwen's <|im_start|> and <|im_end|> as special tokens, and whose
    lm_head makes <|im_end|> win wherever a token its answers use part-way would (1.05 times that token's row):
    answers then end at the template's stop word, as a real Qwen's do."""
    import torch
    from reference import frequent_stop
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from oneke_plan.extract.batching import Encoded
    from oneke_plan.measure.compat import dtype_kw

    folder = build_tiny_llama(tmp_path_factory.mktemp("chatml"), vocab_size=1100, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert len(tokenizer) <= AutoConfig.from_pretrained(folder).vocab_size
    tokenizer.save_pretrained(folder)
    records = read_converted(deepke_dir / "NER" / "test.json")
    prompts = [Encoded(i, authors_qwen_ids(tokenizer, r.instruction)) for i, r in enumerate(records)]
    model = AutoModelForCausalLM.from_pretrained(folder, **dtype_kw(torch.float32)).eval()
    stop = frequent_stop(model, prompts)
    weights = load_file(folder / "model.safetensors")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    weights["lm_head.weight"][end] = weights["lm_head.weight"][stop] * 1.05
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_qwen_prompts_are_the_authors_ids(chatml_model_dir: Path, deepke_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chatml_model_dir)
    records = read_converted(deepke_dir / "NER" / "test.json")
    got = [item.ids for item in encode_prompts(tokenizer, records, "qwen")]
    assert got == [authors_qwen_ids(tokenizer, r.instruction) for r in records]


def test_qwen_answers_end_at_im_end_like_generate(
    chatml_model_dir: Path, tmp_path: Path, deepke_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from reference import alone
    from transformers import AutoModelForCausalLM

    from oneke_plan.measure.compat import dtype_kw

    max_new = 12
    profile = tmp_path / "p.yaml"
    assert plan_main([str(chatml_model_dir), "--max-new-tokens", str(max_new), "-o", str(profile)]) == 0
    out = tmp_path / "o.jsonl"
    args = ["--profile", str(profile), "--input", str(deepke_dir / "NER" / "test.json"), "--output", str(out)]
    capsys.readouterr()
    assert run_main([*args, "--no-progress", "--template", "qwen"]) == 0  # oneke-run's flag over the profile's
    assert "--template qwen: prompts use it instead of the profile's llama2_zh" in capsys.readouterr().err
    got = [json.loads(line)["raw_output"] for line in out.read_text(encoding="utf-8").splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(chatml_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(chatml_model_dir, **dtype_kw(torch.float32)).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [authors_qwen_ids(tokenizer, r.instruction) for r in read_converted(deepke_dir / "NER" / "test.json")]
    stopped = [alone(reference, ids, [2, end], max_new) for ids in prompts]
    assert [tokenizer.decode(a, skip_special_tokens=True) for a in stopped] == got
    running_on = [alone(reference, ids, [2], max_new) for ids in prompts]
    assert any(len(a) < len(b) for a, b in zip(stopped, running_on, strict=True))  # the stop word ended some


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused_before_loading(
    tiny_model_dir: Path, tmp_path: Path, deepke_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "p.yaml"
    assert plan_main([str(tiny_model_dir), "--max-new-tokens", "2", "--template", "qwen", "-o", str(profile)]) == 0
    capsys.readouterr()
    out = tmp_path / "o.jsonl"
    args = ["--profile", str(profile), "--input", str(deepke_dir / "NER" / "test.json"), "--output", str(out)]
    assert run_main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "template qwen needs the special token <|im_start|>" in err[0]
    assert "planned weights" not in "".join(err)  # refused before the weights were loaded
