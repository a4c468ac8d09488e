"""oneke-run --split-long through the real CLIs: a 20,000-character Chinese text (DeepKE's own inputs, joined) in a
converted line (the tiny model: its answers mean nothing, its prompts are real) and a shorter one on SmolLM2's
trained weights (its prefill runs at some 200 tokens/s on one core here: 20,000 characters would take two minutes).
Every window's prompt, rebuilt from the output line alone (the input's instruction with the window's text) and
encoded the way transformers encodes the template, fits the plan; the windows cover the text with no gap; the record
has one output line.

Bad input through the CLI: each refusal is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import llama2_zh_ids
from long_text import chinese_text, deepke_text
from transformers import AutoTokenizer

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.cli.score import main as score_main

pytestmark = pytest.mark.usefixtures("single_torch_thread")

def converted_line(text: str, record_id: str = "long-1") -> dict[str, Any]:
    instruction = {"instruction": "你是专门进行实体抽取的专家。", "schema": ["人物", "地理位置"], "input": text}
    label = [{"entity": text[3:6], "entity_type": "人物"}]
    return {
        "id": record_id,
        "task": "NER",
        "instruction": json.dumps(instruction, ensure_ascii=False),
        "label": json.dumps(label, ensure_ascii=False),
    }


def plan(model: Path, out: Path, max_input: int, *extra: str) -> dict[str, Any]:
    inventory = out.with_suffix(".inventory.yaml")
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    argv = [str(model), "--inventory", str(inventory), "--max-input-tokens", str(max_input), "--max-new-tokens", "2"]
    assert plan_main([*argv, "--batch-size", "4", "-o", str(out), *extra]) == 0
    return dict(yaml.safe_load(out.read_text()))


def window_prompt(line: dict[str, Any], text: str, window: dict[str, Any]) -> str:
    """The window's instruction, from the record's: the same keys in the same order, its text as input."""
    instruction = json.loads(line["instruction"])
    instruction["input"] = text[window["start"] : window["end"]]
    return json.dumps(instruction, ensure_ascii=False)


def check_split_line(line: dict[str, Any], source: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """The record's one line: its own id, instruction and label, and windows that cover the text with no gap."""
    assert (line["id"], line["instruction"], line["label"]) == (source["id"], source["instruction"], source["label"])
    windows = line["windows"]
    assert len(windows) >= 3 and [w["key"] for w in windows] == [f"1#w{n}" for n in range(1, len(windows) + 1)]
    assert windows[0]["start"] == 0 and windows[-1]["end"] == len(text)
    for before, after in zip(windows, windows[1:], strict=False):
        assert before["start"] < after["start"] <= before["end"] < after["end"]  # overlap, never a gap
    ends = [0, *(w["end"] for w in windows[:-1])]
    kept = "".join(text[max(w["start"], end) : w["end"]] for end, w in zip(ends, windows, strict=True))
    assert kept == text
    return list(windows)


def test_a_20000_character_text_becomes_windows_that_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = deepke_text(20_000)
    assert len(text) >= 20_000
    source = converted_line(text)
    data = tmp_path / "long.json"
    data.write_text(json.dumps(source, ensure_ascii=False) + "\n", encoding="utf-8")
    profile = tmp_path / "tiny.yaml"
    plan(tiny_model_dir, profile, 1024)
    out = tmp_path / "out.jsonl"
    argv = ["--profile", str(profile), "--input", str(data), "--output", str(out), "--no-progress"]
    assert run_main([*argv, "--split-long"]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 1
    windows = check_split_line(lines[0], source, text)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sizes = [len(llama2_zh_ids(tokenizer, window_prompt(lines[0], text, w))) for w in windows]
    assert max(sizes) <= 1024 < sum(sizes) // len(sizes) * 2, sizes  # every one fits, and they are full on average
    assert score_main([str(out)]) == 0  # oneke-score reads the split record's line as any other


def test_split_long_on_real_weights(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 under its own chat template (ChatML): the windows' prompts are what transformers' apply_chat_template
    encodes, each within the plan's 512 tokens."""
    text = chinese_text(1_200, seed=3, sentence=(10, 60), newlines=0.05)
    source = converted_line(text, "real-1")
    data = tmp_path / "long.json"
    data.write_text(json.dumps(source, ensure_ascii=False) + "\n", encoding="utf-8")
    profile = tmp_path / "smollm2.yaml"
    assert plan(smollm2_dir, profile, 512, "--dtype", "float32")["template"] == "model"
    out = tmp_path / "out.jsonl"
    argv = ["--profile", str(profile), "--input", str(data), "--output", str(out), "--no-progress", "--split-long"]
    assert run_main([*argv, "--window-overlap", "16"]) == 0
    (line,) = [json.loads(row) for row in out.read_text(encoding="utf-8").splitlines()]
    windows = check_split_line(line, source, text)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for window in windows:
        messages = [{"role": "user", "content": window_prompt(line, text, window)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert len(ids["input_ids"] if hasattr(ids, "keys") else ids) <= 512  # a BatchEncoding on 5.x, a list on 4.x
        assert "raw_output" in window  # each window's own answer is kept


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--window-overlap", "5"], "--window-overlap needs --split-long"),
        (["--split-long", "--window-overlap", "1020"], "--window-overlap 1020 is not smaller than a window"),
        (["--split-long", "--window-overlap", "-2"], "--window-overlap must be 0 or a positive number"),
    ],
)
def test_bad_window_flags_are_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    data = tmp_path / "long.json"
    data.write_text(json.dumps(converted_line(chinese_text(3_000)), ensure_ascii=False) + "\n", encoding="utf-8")
    profile = tmp_path / "tiny.yaml"
    plan(tiny_model_dir, profile, 1024)
    capsys.readouterr()
    argv = ["--profile", str(profile), "--input", str(data), "--output", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert run_main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.journal").exists()


def test_no_room_for_text_is_one_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "raw.json"
    data.write_text(json.dumps({"text": chinese_text(3_000)}, ensure_ascii=False) + "\n", encoding="utf-8")
    profile = tmp_path / "tiny.yaml"
    plan(tiny_model_dir, profile, 256)
    schema = json.dumps([f"很长的实体类型名称第{i}号" for i in range(40)], ensure_ascii=False)
    capsys.readouterr()
    argv = ["--profile", str(profile), "--input", str(data), "--output", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert run_main([*argv, "--task", "NER", "--schema", schema, "--chunk-size", "-1", "--split-long"]) == 2
    err = capsys.readouterr().err.strip()
    assert "without any input text it already takes" in err and "--chunk-size" in err and len(err.splitlines()) == 1
