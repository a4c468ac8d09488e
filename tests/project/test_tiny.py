"""The tiny checkpoints must behave like a real LLaMA-2 / OneKE checkpoint under transformers' loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_checkpoint import (
    build_tiny_llama,
    build_tokenizer,
    checkpoint_num_parameters,
    main,
    write_checkpoint,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

ALL_FIXTURES = ["tiny_model_dir", "tiny_gqa_dir", "tiny_tied_dir", "tiny_sharded_dir"]
SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
JSON_TEXT = json.dumps(
    {
        "instruction": "你是专门进行实体抽取的专家。Please respond in the format of a JSON string.",
        "schema": ["人物", "地理位置", {"组织机构": "公司、政府"}],
        "input": "相比之下，青岛海牛队和广州松日队的雨中之战虽然也是0∶0。 Tab\there, emoji 😀, 齉龘 ü ß",
    },
    ensure_ascii=False,
)


def oneke_prompt(instruction_json: str) -> str:
    """OneKE's LLaMA-2 chat wrapper (DeepKE's llama2_zh template); the tokenizer adds <s>."""
    return f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{instruction_json} [/INST]"


def load(model_dir: Path) -> tuple[PreTrainedModel, dict]:
    # "auto": the checkpoint's dtype (the default on transformers 5; transformers 4 defaults to float32).
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, torch_dtype="auto")
    return model, info


def stored_keys(model_dir: Path) -> dict[str, list[str]]:
    """safetensors file name -> tensor names it holds."""
    keys = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys[path.name] = list(f.keys())
    return keys


def file_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_loads_without_missing_or_unexpected_keys(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    model, info = load(model_dir)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    assert model.num_parameters() == checkpoint_num_parameters(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok)


def test_gqa_config(tiny_gqa_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_gqa_dir)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    with safe_open(str(tiny_gqa_dir / "model.safetensors"), framework="pt") as f:
        k_shape = f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()
    assert k_shape == [2 * config.head_dim, config.hidden_size]


def test_sharded_index_covers_every_key_once(tiny_sharded_dir: Path) -> None:
    index = json.loads((tiny_sharded_dir / "model.safetensors.index.json").read_text())
    on_disk = stored_keys(tiny_sharded_dir)
    assert sorted(on_disk) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(on_disk.values()), "every shard must hold at least one tensor"
    all_keys = [k for keys in on_disk.values() for k in keys]
    assert len(all_keys) == len(set(all_keys)), "a key is stored in two shards"
    assert index["weight_map"] == {k: name for name, keys in on_disk.items() for k in keys}
    model, _ = load(tiny_sharded_dir)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    largest = max((tiny_sharded_dir / name).stat().st_size for name in on_disk)
    assert largest < index["metadata"]["total_size"] / 2, "shards should split the bytes roughly evenly"


def test_tied_model_has_no_lm_head_on_disk_and_ties_on_load(tiny_tied_dir: Path) -> None:
    assert "lm_head.weight" not in stored_keys(tiny_tied_dir)["model.safetensors"]
    model, _ = load(tiny_tied_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_model_has_its_own_lm_head(tiny_model_dir: Path) -> None:
    assert "lm_head.weight" in stored_keys(tiny_model_dir)["model.safetensors"]
    model, _ = load(tiny_model_dir)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tokenizer_adds_bos_only(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    ids = tok("hello 世界")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.bos_token_id not in ids[1:]
    assert tok.eos_token_id not in ids


def test_tokenizer_round_trips_chinese_english_json(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(JSON_TEXT)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == JSON_TEXT
    assert tok.decode(ids).startswith("<s>{")
    assert len(ids) < len(JSON_TEXT.encode("utf-8")) / 2, "BPE merges should compress OneKE-like text"


def test_extra_texts_train_merges(tmp_path: Path) -> None:
    word = "知识图谱构建"
    build_tokenizer(tmp_path / "plain")
    build_tokenizer(tmp_path / "extra", texts=[word] * 20)
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    extra = AutoTokenizer.from_pretrained(tmp_path / "extra")
    assert len(extra(word)["input_ids"]) < len(plain(word)["input_ids"])
    assert extra.decode(extra(word)["input_ids"], skip_special_tokens=True) == word


def test_greedy_generation_runs_several_tokens_on_deepke_prompts(tiny_model_dir: Path, deepke_dir: Path) -> None:
    """Random weights must not stop at once: the demo and runner tests need real output to parse."""
    model, _ = load(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = sorted(p.parent.name for p in deepke_dir.glob("*/test.json"))
    assert tasks, f"no DeepKE samples under {deepke_dir}"
    for task in tasks:
        first = (deepke_dir / task / "test.json").read_text(encoding="utf-8").splitlines()[0]
        inputs = tok(oneke_prompt(json.loads(first)["instruction"]), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        before_eos = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
        assert before_eos >= 4, f"{task}: greedy output stopped after {before_eos} tokens"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    first = file_hashes(build_tiny_llama(tmp_path / "a", seed=7))
    again = file_hashes(build_tiny_llama(tmp_path / "b", seed=7))
    other = file_hashes(build_tiny_llama(tmp_path / "c", seed=8))
    assert first == again
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["tokenizer.json"] == first["tokenizer.json"]


def test_write_checkpoint_rejects_more_shards_than_tensors(tmp_path: Path) -> None:
    state = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert len(write_checkpoint(state, tmp_path / "ok", shards=2)) == 2
    with pytest.raises(ValueError, match="shards"):
        write_checkpoint(state, tmp_path / "bad", shards=3)


def test_vocab_size_cannot_be_smaller_than_the_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_llama(tmp_path, vocab_size=10)


def test_cli_builds_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "cli"
    assert main([str(out_dir), "--layers", "2", "--kv-heads", "2", "--vocab", "1088", "--shards", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (2, 2, 1088)
    assert printed[1] == f"parameters: {checkpoint_num_parameters(out_dir):,}"
    _, info = load(out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"]
