"""--split-long's windows: each prompt fits, measured by the model's own tokenizer around DeepKE's llama2_zh template
written out by hand (conftest.llama2_zh_ids), never by the code under test; cuts at sentence ends, or at token
boundaries outside words; overlaps as asked; no text lost."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import llama2_zh_ids
from long_text import chinese_text
from transformers import AutoTokenizer

from oneke_plan.core.errors import BadInput
from oneke_plan.extract.inputs import PromptRecord, read_converted, read_raw
from oneke_plan.extract.windows import inside_word, sentence_cuts, split_long, with_input
from oneke_plan.formats import oneke

TEMPLATE = "llama2_zh"
SENTENCE_ENDS = "。！？；\n"


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    """A real byte-level BPE tokenizer (SmolLM2's, with offsets) and the tiny model's SentencePiece one."""
    name = "smollm2_dir" if request.param == "smollm2" else "tiny_model_dir"
    return AutoTokenizer.from_pretrained(request.getfixturevalue(name))


def record(text: str, task: str = "NER", schema: Any = ("人物", "地理位置"), lang: str = "zh") -> PromptRecord:
    return PromptRecord(
        key="7", id="x", task=task, instruction=oneke.make_instruction(task, list(schema), text, lang), text=text
    )


def tokens(tokenizer: Any, instruction: str) -> int:
    return len(llama2_zh_ids(tokenizer, instruction, bos=False))


def check_windows(tokenizer: Any, whole: PromptRecord, windows: list[PromptRecord], limit: int) -> None:
    """Every window fits, keeps the record's prompt around its text, and the windows cover the text once each."""
    assert len(windows) >= 2
    covered = ""
    for number, window in enumerate(windows, 1):
        place = window.window
        assert place is not None and place.whole is whole and (place.number, place.count) == (number, len(windows))
        assert window.key == f"{whole.key}#w{number}" and window.id == whole.id and window.extra == whole.extra
        assert window.text == whole.text[place.start : place.end]
        expected = json.loads(whole.instruction)
        expected["input"] = window.text
        assert json.loads(window.instruction) == expected
        assert tokens(tokenizer, window.instruction) <= limit
        assert place.new_from == len(covered) and place.start <= place.new_from < place.end
        covered += whole.text[place.new_from : place.end]
    assert covered == whole.text


def test_cuts_fall_after_sentence_ends_quotes_and_line_ends() -> None:
    text = "他说：“走了。”然后呢？Yes. Mr. Smith\nleft!No.5 ok"
    cuts = sentence_cuts(text)
    # hand-found: after 。” , after ？, after "Yes. ", after "Mr. ", after the newline, the end
    expected = [text.index(after) for after in ("然", "Y", "Mr", "Smith", "left")]
    assert cuts == [*expected, len(text)]


def test_inside_word() -> None:
    assert inside_word("hello world", 2) and not inside_word("hello world", 5) and not inside_word("hello world", 6)
    assert not inside_word("中文文本", 2)  # no spaces in Chinese: any character boundary is a word boundary
    assert inside_word("cafe\u0301", 4)  # never between a letter and its combining accent
    assert inside_word("\u0e01\u0e47", 1)  # nor before a Thai vowel sign (a mark, though not "combining")
    assert inside_word("\U0001f469\u200d\U0001f4bb", 1) and inside_word("\u2764\ufe0f", 1)  # joiners, selectors


def test_a_prompt_that_fits_is_left_as_it_is(tokenizer: Any) -> None:
    short = record("张三在北京。")
    done = split_long([short], tokenizer, TEMPLATE, 512)
    assert done.records == [short] and done.split == 0


@pytest.mark.parametrize("overlap", [None, 0, 40])
def test_windows_fit_cut_at_sentence_ends_and_lose_no_text(tokenizer: Any, overlap: int | None) -> None:
    limit = 384
    whole = record(chinese_text(5000))
    assert tokens(tokenizer, whole.instruction) > limit
    done = split_long([whole], tokenizer, TEMPLATE, limit, overlap)
    check_windows(tokenizer, whole, done.records, limit)
    assert done.token_cut == [] and done.windows == len(done.records)
    cuts = set(sentence_cuts(whole.text))
    for window, after in zip(done.records, done.records[1:], strict=False):
        place, next_place = window.window, after.window
        assert place is not None and next_place is not None
        assert place.end in cuts and whole.text[place.end - 1] in SENTENCE_ENDS
        # as long as it can be: the next sentence would not have fitted
        longer = min(c for c in cuts if c > place.end)
        assert tokens(tokenizer, with_input(whole, whole.text[place.start : longer], 0).instruction) > limit
        shared = whole.text[next_place.start : place.end]
        if overlap is None:  # the window's last whole sentence
            assert next_place.start == max(c for c in cuts if c < place.end)
        elif overlap == 0:
            assert shared == ""
        else:
            assert 0 < len(tokenizer(shared, add_special_tokens=False)["input_ids"]) <= overlap + 1


def test_a_text_without_sentence_ends_is_cut_at_tokens_outside_words(tokenizer: Any) -> None:
    rng = random.Random(3)
    words = "alpha beta gamma extraordinary internationalization cat Paris".split()
    text = " ".join(rng.choice(words) for _ in range(1500))
    whole = record(text, schema=["person"], lang="en")
    done = split_long([whole], tokenizer, TEMPLATE, 300, 20)
    check_windows(tokenizer, whole, done.records, 300)
    assert done.token_cut == ["7"]
    for window in done.records:
        assert window.window is not None and not inside_word(text, window.window.end)


def test_the_default_overlap_inside_a_long_sentence_is_its_last_tokens(tokenizer: Any) -> None:
    """Where a window ends inside a sentence, no sentence can be repeated: the next starts with the window's last
    tokens instead (min(64, an eighth of the room)), so what straddles that cut is seen whole too."""
    text = "".join(c for c in chinese_text(6000, seed=4) if c not in SENTENCE_ENDS)
    whole = record(text)
    done = split_long([whole], tokenizer, TEMPLATE, 400)
    check_windows(tokenizer, whole, done.records, 400)
    room = 400 - tokens(tokenizer, with_input(whole, "", 0).instruction)
    for window, after in zip(done.records, done.records[1:], strict=False):
        assert window.window is not None and after.window is not None
        shared = text[after.window.start : window.window.end]
        assert 0 < len(tokenizer(shared, add_special_tokens=False)["input_ids"]) <= min(64, room // 8) + 1


def test_a_word_longer_than_a_window_is_cut_inside_it(tokenizer: Any) -> None:
    """A URL (or any run of letters) longer than a window can only be cut inside: at a token's end, said once."""
    text = "See http://example.org/" + "abcdefgh" * 800 + " for more. Then it ends here."
    whole = record(text, schema=["person"], lang="en")
    done = split_long([whole], tokenizer, TEMPLATE, 300, 0)
    check_windows(tokenizer, whole, done.records, 300)
    assert done.token_cut == ["7"]


def test_converted_lines_keep_the_authors_instruction(tokenizer: Any, deepke_dir: Path) -> None:
    """A converted line's instruction is rebuilt with its keys in order and ensure_ascii=False: with its own text
    it is byte for byte the file's."""
    for task in ("NER", "RE", "EE", "KG"):
        for converted in read_converted(deepke_dir / task / "test.json")[:20]:
            assert with_input(converted, converted.text, 1).instruction == converted.instruction


def test_raw_lines_with_examples_keep_the_authors_instruction(tmp_path: Path) -> None:
    source = tmp_path / "raw.json"
    source.write_text(json.dumps({"text": "张三在北京。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    example = [{"input": "李四在上海。", "output": {"人物": ["李四"]}}]
    (raw,) = read_raw(source, "NER", ["人物"], "zh", example=example)
    assert with_input(raw, raw.text, 1).instruction == raw.instruction
    assert list(json.loads(raw.instruction)) == ["instruction", "schema", "example", "input"]


def test_no_room_for_text_is_one_line_with_the_numbers(tokenizer: Any) -> None:
    whole = record(chinese_text(2000), schema=[f"类型{i}" for i in range(60)])
    bare = tokens(tokenizer, with_input(whole, "", 0).instruction)
    with pytest.raises(BadInput) as refused:
        split_long([whole], tokenizer, TEMPLATE, bare - 5)
    assert f"it already takes {bare} tokens, 6 more than the plan's max_input_tokens ({bare - 5})" in str(refused.value)
    assert "--max-input-tokens" in str(refused.value) and "\n" not in str(refused.value)


def test_a_character_larger_than_the_room_is_one_line(smollm2_dir: Path) -> None:
    """Room for one token of text, and a text of emoji, each several byte tokens: no window can hold a character."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    whole = record("\U0001f600" * 200)
    bare = tokens(tokenizer, with_input(whole, "", 0).instruction)
    assert len(tokenizer("\U0001f600", add_special_tokens=False)["input_ids"]) > 1
    with pytest.raises(BadInput, match=r"its text at character 0 \('\U0001f600'\) does not fit in the 1 tokens"):
        split_long([whole], tokenizer, TEMPLATE, bare + 1)


def test_an_overlap_as_large_as_a_window_is_refused(tokenizer: Any) -> None:
    whole = record(chinese_text(3000))
    room = 300 - tokens(tokenizer, with_input(whole, "", 0).instruction)
    with pytest.raises(BadInput, match=f"--window-overlap {room} is not smaller than a window.*leave {room} tokens"):
        split_long([whole], tokenizer, TEMPLATE, 300, room)
    assert split_long([whole], tokenizer, TEMPLATE, 300, room - 1).split == 1
    with pytest.raises(BadInput, match="--window-overlap must be 0 or a positive"):
        split_long([whole], tokenizer, TEMPLATE, 300, -1)


class CountingTokenizer:
    """A tokenizer that counts the characters each call encodes, and otherwise is the real one."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        self.calls.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("sentence_ends", [True, False])
def test_the_tokenizer_work_grows_with_the_text_not_its_square(tokenizer: Any, sentence_ends: bool) -> None:
    """A long text, even one long sentence, costs each window probes about its own size: the characters encoded per
    character of text stay the same from 10,000 to 30,000 characters (probing the rest of the text from each window
    would triple them), and no probe is much larger than a window."""
    per_character = []
    for chars in (10_000, 30_000):
        text = chinese_text(chars, seed=2)
        if not sentence_ends:
            text = "".join(c for c in text if c not in SENTENCE_ENDS)
        counting = CountingTokenizer(tokenizer)
        done = split_long([record(text)], counting, TEMPLATE, 512)
        assert done.windows >= 20 and (done.token_cut == []) == sentence_ends
        first, *probes = counting.calls
        assert first >= len(text)  # the whole prompt, measured once to see it is too long
        assert max(probes) <= 8 * 4 * 512
        per_character.append(sum(probes) / len(text))
    assert per_character[1] <= 1.25 * per_character[0], per_character
