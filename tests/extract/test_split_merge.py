"""--split-long end to end on the runner's own files: a long document's gold triples, spread over many windows and
some straddling the cuts, answered by a scripted decoder that reports the gold triples it can see whole in each
window, merge into one line per prompt that oneke-score scores 100; an interrupted run resumes window by window.

The double reads each prompt as the model would, from its token ids (decoded by SmolLM2's byte-level tokenizer,
which gives every text back exactly): the instruction JSON between the template's markers, its schema and input."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from oneke_plan.cli.score import main as score_main
from oneke_plan.core.errors import BadInput
from oneke_plan.extract.batching import Encoded
from oneke_plan.extract.inputs import PromptRecord, read_raw
from oneke_plan.extract.outputs import RunOutput
from oneke_plan.extract.runner import Runner
from oneke_plan.extract.score import score_file
from oneke_plan.extract.windows import split_long

RELATIONS = ["出生地", "毕业院校"]
LIMIT = 400  # tokens per prompt: the document becomes some 20 windows per schema chunk
FILLER = "的一是在不了有和这中大为上个我以要时来用们生到作于出就分对成会可主发年动同工也能下过子说产种面而方后"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def document(seed: int = 5) -> tuple[str, list[dict[str, str]]]:
    """A Chinese text of some 9,000 characters and its gold triples: each head is named in one sentence and its tail
    in the next, and every triple is told twice, far apart, so that several windows see it."""
    rng = random.Random(seed)
    people = [f"人{chr(0x7532 + i)}{chr(0x4E59 + i)}" for i in range(12)]
    places = [f"城{chr(0x5E02 + i)}" for i in range(12)]
    schools = [f"学院{chr(0x6E05 + i)}" for i in range(12)]
    gold, told = [], []
    for i, person in enumerate(people):
        relation, tail = (RELATIONS[0], places[i]) if i % 2 else (RELATIONS[1], schools[i])
        gold.append({"head": person, "relation": relation, "tail": tail})
        told.append(f"{person}是一位学者。据说其{relation}是{tail}。")
    sentences = ["".join(rng.choice(FILLER) for _ in range(rng.randint(15, 40))) + "。" for _ in range(300)]
    for story in told + told:  # twice each, at random places
        sentences.insert(rng.randrange(len(sentences)), story)
    return "".join(sentences), gold


def instruction_of(tokenizer: Any, ids: Sequence[int]) -> dict[str, Any]:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return dict(json.loads(text[text.index("{") : text.rindex("}") + 1]))


class ScriptedDecoder:
    """Answers each prompt with the gold triples of its schema whose head and tail it sees whole in its input."""

    def __init__(
        self, tokenizer: Any, gold: list[dict[str, str]], stop_after: int | None = None, garbled: int | None = None
    ) -> None:
        self.tokenizer, self.gold, self.stop_after, self.garbled = tokenizer, gold, stop_after, garbled
        self.in_flight: set[int] = set()
        self.asked: list[str] = []

    def run(self, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]:
        for item in prompts:
            if self.stop_after is not None and len(self.asked) == self.stop_after:
                raise RuntimeError("the machine went away")
            seen = instruction_of(self.tokenizer, item.ids)
            self.asked.append(seen["input"])
            answer = {relation: [] for relation in seen["schema"]}
            for triple in self.gold:
                if triple["relation"] in answer and triple["head"] in seen["input"] and triple["tail"] in seen["input"]:
                    answer[triple["relation"]].append({"subject": triple["head"], "object": triple["tail"]})
            text = json.dumps(answer, ensure_ascii=False)
            if len(self.asked) - 1 == self.garbled:  # this one answers with no JSON
                text = "I cannot tell."
            yield item.index, self.tokenizer(text, add_special_tokens=False)["input_ids"]


def windowed_records(
    tokenizer: Any, tmp_path: Path, overlap: int | None = None
) -> tuple[list[PromptRecord], list[PromptRecord], Any]:
    text, gold = document()
    source = tmp_path / "long.json"
    source.write_text(json.dumps({"text": text, "relation": gold}, ensure_ascii=False) + "\n", encoding="utf-8")
    records = read_raw(source, "RE", RELATIONS, "zh", chunk_size=1)
    return records, split_long(records, tokenizer, "llama2_zh", LIMIT, overlap).records, gold


def answer(tokenizer: Any, windows: list[PromptRecord], decoder: Any, output: Path, mode: str) -> list[str]:
    with RunOutput(output, None, mode) as files:
        pending = files.start(windows)
        Runner(decoder, tokenizer, files.writer, 4, LIMIT, progress=False).run(pending)
        files.finish(windows)
    return [p.key for p in pending]


def test_a_long_document_split_and_merged_scores_100(tokenizer: Any, tmp_path: Path) -> None:
    records, windows, gold = windowed_records(tokenizer, tmp_path)
    assert len(records) == 2 and len(windows) >= 30
    # the test means something: triples straddle cuts (head before a window's end, tail after it) ...
    text = records[0].text
    ends = [w.window.end for w in windows if w.window is not None and w.window.whole is records[0]][:-1]
    told = [(m.start(), text.index(t["tail"], m.start())) for t in gold for m in re.finditer(t["head"], text)]
    straddling = sum(1 for end in ends for head, tail in told if head < end <= tail)
    assert straddling >= 3
    decoder = ScriptedDecoder(tokenizer, gold)
    output = tmp_path / "out.jsonl"
    answer(tokenizer, windows, decoder, output, "new")
    # ... and several windows answer the same triple, which must count once
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    found = Counter(
        (relation, item["subject"], item["object"])
        for line in lines
        for window in line.get("windows", [])
        for relation, items in json.loads(window["raw_output"]).items()
        for item in items
    )
    assert max(found.values()) >= 2 and len(found) == len(gold)
    # one line per schema chunk, each holding its windows, then the record's merged line
    assert [line["key"] for line in lines[:2]] == ["1:0", "1:1"] and lines[2]["merged"] is True
    for line, chunk in zip(lines[:2], records, strict=True):
        assert len(line["windows"]) >= 15 and line["instruction"] == chunk.instruction
    assert all(json.loads(line["label"]) == gold for line in lines)
    scores = score_file(output)["RE"]
    triples = scores.counts()["triple"]
    assert (triples.tp, triples.pred, triples.gold) == (len(gold), len(gold), len(gold))
    assert triples.f1 == 100.0


def test_without_overlap_the_straddling_triples_are_lost(tokenizer: Any, tmp_path: Path) -> None:
    """What the default overlap (one sentence) is for: with none, a triple told across a cut is seen by no window."""
    _, windows, gold = windowed_records(tokenizer, tmp_path, overlap=0)
    output = tmp_path / "out.jsonl"
    answer(tokenizer, windows, ScriptedDecoder(tokenizer, gold), output, "new")
    triples = score_file(output)["RE"].counts()["triple"]
    assert triples.tp == triples.pred < len(gold)


def test_oneke_score_says_which_windows_gave_no_answer(
    tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, windows, gold = windowed_records(tokenizer, tmp_path)
    output = tmp_path / "out.jsonl"
    answer(tokenizer, windows, ScriptedDecoder(tokenizer, gold, garbled=3), output, "new")
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    entries = [w for line in lines for w in line.get("windows", [])]
    assert [w["raw_output"] for w in entries if "parse_error" in w] == ["I cannot tell."]
    assert sum("failed_windows" in line for line in lines) == 1
    score = score_file(output)["RE"].summary()
    assert (score["errors"], score["failed_windows"], score["windows"]) == (0, 1, len(windows))
    assert score_main([str(output)]) == 0
    assert f"RE: 1 of the {len(windows)} windows of split prompts gave no answer" in capsys.readouterr().out


def test_an_interrupted_split_run_resumes_window_by_window(tokenizer: Any, tmp_path: Path) -> None:
    records, windows, gold = windowed_records(tokenizer, tmp_path)
    whole = tmp_path / "whole.jsonl"
    answer(tokenizer, windows, ScriptedDecoder(tokenizer, gold), whole, "new")
    output = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="went away"):
        answer(tokenizer, windows, ScriptedDecoder(tokenizer, gold, stop_after=7), output, "new")
    assert not output.exists()
    resumed = ScriptedDecoder(tokenizer, gold)
    pending = answer(tokenizer, windows, resumed, output, "resume")
    assert len(pending) == len(resumed.asked) == len(windows) - 7
    assert output.read_bytes() == whole.read_bytes()
    # an edited text (one name changed, same length, same id and keys): refused, not resumed from the old answers
    old, new = gold[0]["head"], "人丙丁"
    edited = [replace(r, instruction=r.instruction.replace(old, new), text=r.text.replace(old, new)) for r in records]
    with pytest.raises(BadInput, match="written for another prompt"):
        answer(tokenizer, split_long(edited, tokenizer, "llama2_zh", LIMIT).records, resumed, output, "resume")
    # a complete output is resumed from its split lines: nothing is asked again
    again = ScriptedDecoder(tokenizer, gold)
    assert answer(tokenizer, windows, again, output, "resume") == [] and again.asked == []
    assert output.read_bytes() == whole.read_bytes()
