"""Long documents: a prompt whose text does not fit the plan's max_input_tokens becomes windows of that text that do.

Each window is the record's prompt (template, instruction, schema chunk, few-shot examples) with part of the text as
its `input`, and it is measured as the runner will run it: the whole prompt encoded by the model's own tokenizer
(runner.encode_prompts), never a character estimate. The splitting, in steps:

1. Cuts are allowed at sentence ends (Chinese 。！？； and English . ! ? followed by white space, closing quotes
   kept with their sentence) and at line ends (sentence_cuts).
2. A window runs from its start to the furthest cut whose prompt still fits, found by doubling then halving the
   number of sentences (each probe encodes one candidate prompt, so a book costs a few probes per window).
3. A sentence longer than a window is cut at the token boundary nearest the limit (the tokenizer's own offsets),
   never inside a word of a spaced script (a Chinese text has no spaces: any character boundary is a word boundary)
   nor between a character and its marks, unless one word is longer than a window (a URL, a run of digits); Python
   strings index whole code points, so no multi-byte character is ever split.
4. The next window starts `overlap` before the end: by default at the last whole sentence of the window (where the
   window ends inside a sentence longer than a window: its last min(64, room / 8) tokens, token_overlap), or, with
   --window-overlap N, at the earliest sentence start (else token boundary) whose remaining text is at most N tokens.
   An entity or a triple that straddles a cut is then seen whole in one window. Where the overlap would leave no
   room for new text, the next window starts at the end instead (no overlap there).

The windows' texts, overlaps removed (text[new_from:end]), concatenate to the record's text.
"""

from __future__ import annotations

import bisect
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.extract.inputs import PromptRecord, TextWindow
from oneke_plan.extract.runner import encoded_prompts, prompt_tokens
from oneke_plan.io import jsonfile

_SENTENCE_END = re.compile(r"(?:[。！？；]+|[.!?]+(?=\s))[”’」』）)\"']*\s*|\n\s*")
_JOINERS = "\u200c\u200d\ufe0e\ufe0f"  # zero-width (non-)joiner, text and emoji variation selectors
_CLOSED_SCRIPT = 0x2E80  # from here on (CJK radicals, kana, ideographs, Hangul): no spaces between words


def sentence_cuts(text: str) -> list[int]:
    """Offsets (characters) where `text` may be cut: after each sentence end and its closing quotes and white space,
    and after each line end; the text's end included, 0 not."""
    cuts = [m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.end() < len(text)]
    return sorted(set(cuts)) + [len(text)]


def inside_word(text: str, at: int) -> bool:
    """Whether offset `at` falls inside a word of a spaced script (letters or digits on both sides, both below the
    CJK blocks), before a mark (a combining accent, a Thai or Devanagari vowel sign) or next to a joiner or variation
    selector: no cut goes there unless a word is longer than a window."""
    if not 0 < at < len(text):
        return False
    before, after = text[at - 1], text[at]
    if unicodedata.category(after).startswith("M") or after in _JOINERS or before in _JOINERS:
        return True
    spaced = ord(before) < _CLOSED_SCRIPT and ord(after) < _CLOSED_SCRIPT
    return spaced and before.isalnum() and after.isalnum()


def token_spans(tokenizer: Any, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) offsets in `text` of each token of text[start:end] encoded alone by `tokenizer` (a character cut
    into several byte tokens gives each the character's span); one span per character when the tokenizer gives no
    offsets (a slow, Python tokenizer)."""
    piece = text[start:end]
    try:
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return [(at, at + 1) for at in range(start, end)]
    return [(start + int(a), start + int(b)) for a, b in offsets if int(b) > int(a)]


def token_ends(tokenizer: Any, text: str, start: int, end: int) -> list[int]:
    """Offsets in `text` where a token of text[start:end] ends (token_spans), `end` included."""
    ends = {stop for _, stop in token_spans(tokenizer, text, start, end) if start < stop <= end}
    return sorted(ends | {end})


@dataclass
class Windowed:
    """Records with every long one replaced by its windows (in place, in order), and what was done."""

    records: list[PromptRecord]
    token_cut: list[str] = field(default_factory=list)  # keys of records with a sentence longer than a window
    overlap_dropped: int = 0  # cuts where the overlap left no room for new text

    def _windows(self, split: bool) -> list[PromptRecord]:
        return [r for r in self.records if r.window is not None and (r.window.count > 1) == split]

    @property
    def windows(self) -> int:
        """Windows of the prompts split in several."""
        return len(self._windows(True))

    @property
    def split(self) -> int:
        """Prompts split in several windows."""
        return sum(1 for r in self._windows(True) if r.window is not None and r.window.number == 1)

    @property
    def reencoded(self) -> int:
        """Prompts in one window: they fit once their instruction JSON was written without \\u escapes."""
        return len(self._windows(False))


PROBE_CHARS_PER_TOKEN = 4
"""Characters per token of the limit that a first probe of a far cut encodes (OneKE's Chinese is about 1 character
per token, English 4): a window that reaches a cut further away is tried on that many characters first, then twice
as many, and so on, and refused as soon as a prefix does not fit; a sentence of a million characters thus costs each
window a few bounded probes, never the whole sentence (nor, for the tokenizer, one million-character word)."""


class _Prompt:
    """One record's prompt with any part of its text as input, measured in tokens as the runner encodes it; the
    instruction JSON is decoded once."""

    def __init__(self, record: PromptRecord, tokenizer: Any, template: str, max_input_tokens: int) -> None:
        self.record, self.tokenizer, self.template = record, tokenizer, template
        self.max_input_tokens = max_input_tokens
        self.fields = jsonfile.loads(record.instruction)  # read as the input reader read it (inputs.py)
        self.probe_chars = PROBE_CHARS_PER_TOKEN * max_input_tokens
        self.room = max_input_tokens - self.tokens("")  # tokens of text a window holds

    def tokens(self, text: str) -> int:
        return prompt_tokens(self.tokenizer, with_input(self.record, text, 0, fields=self.fields), self.template)

    def fits(self, start: int, end: int) -> bool:
        """Whether the window [start, end) of the text fits (PROBE_CHARS_PER_TOKEN: prefixes first)."""
        span = self.probe_chars
        while end - start > span:
            if self.tokens(self.record.text[start : start + span]) > self.max_input_tokens:
                return False
            span *= 2
        return self.tokens(self.record.text[start:end]) <= self.max_input_tokens


def with_input(
    record: PromptRecord,
    text: str,
    number: int,
    window: TextWindow | None = None,
    fields: dict[str, Any] | None = None,
) -> PromptRecord:
    """`record` with `text` as its input: the instruction JSON (`fields`: already decoded) written again with the
    same keys in the same order and ensure_ascii=False, as the authors write it (oneke.make_instruction); key
    KEY#wN for window N."""
    instruction = dict(fields if fields is not None else jsonfile.loads(record.instruction))
    instruction["input"] = text
    return PromptRecord(
        key=f"{record.key}#w{number}",
        id=record.id,
        task=record.task,
        instruction=json.dumps(instruction, ensure_ascii=False),
        extra=dict(record.extra),
        text=text,
        window=window,
    )


def _largest(candidates: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of ascending `candidates` that `fits`, assuming it holds up to some point and not after: doubling
    from the smallest, then halving, so each probe is at most twice the answer's size. None if the first does not."""
    if not candidates or not fits(candidates[0]):
        return None
    good, step = 0, 1
    while good + step < len(candidates) and fits(candidates[good + step]):
        good += step
        step *= 2
    bad = min(good + step, len(candidates))
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(candidates[middle]):
            good = middle
        else:
            bad = middle
    return candidates[good]


def split_windows(
    prompt: _Prompt, tokenizer: Any, overlap_tokens: int | None, windowed: Windowed
) -> list[tuple[int, int, int]]:
    """(start, end, new_from) of each window of the prompt's text (module docstring, steps 2 to 4)."""
    text = prompt.record.text
    cuts = sentence_cuts(text)
    found: list[tuple[int, int, int]] = []
    start = done = 0
    while done < len(text):
        end = _window_end(prompt, tokenizer, cuts, start, done, windowed)
        if end is None and start < done:  # the overlap leaves no room for new text: no overlap at this cut
            windowed.overlap_dropped += 1
            start = done
            end = _window_end(prompt, tokenizer, cuts, start, done, windowed)
        if end is None:  # one character takes more tokens than the room (an emoji's bytes, a rare CJK character)
            raise BadInput(
                f"prompt {prompt.record.key}: its text at character {done} ({text[done]!r}) does not fit in the "
                f"{prompt.room} tokens a window leaves for text: re-plan with a larger --max-input-tokens, or use a "
                "smaller --chunk-size or fewer --example items"
            )
        found.append((start, end, done))
        if end < len(text):
            start = _next_start(prompt, tokenizer, cuts, start, end, overlap_tokens)
        done = end
    return found


def _window_end(
    prompt: _Prompt, tokenizer: Any, cuts: list[int], start: int, done: int, windowed: Windowed
) -> int | None:
    """The furthest cut after `done` whose window from `start` fits; inside a sentence too long for any window, the
    furthest token end that fits and is no word's inside. None if not even one more token fits."""
    text = prompt.record.text
    after = cuts[bisect.bisect_right(cuts, done) :]
    end = _largest(after, lambda c: prompt.fits(start, c))
    if end is not None:
        return end
    # The sentence from `done` does not fit whole: cut it by tokens, encoding only as much of it as a window can
    # hold (more only if all of that fits, which the bound makes rare).
    span = prompt.probe_chars
    while True:
        stop = min(after[0], done + span)
        ends = [e for e in token_ends(tokenizer, text, done, stop) if e > done]
        safe = [e for e in ends if not inside_word(text, e)]
        end = _largest(safe, lambda e: prompt.fits(start, e))
        if end is None:  # a word longer than a window (a URL, a run of digits): cut inside it, at a token's end
            end = _largest(ends, lambda e: prompt.fits(start, e))
        if end is None or end < stop or stop == after[0]:
            break
        span *= 2
    if end is not None and prompt.record.key not in windowed.token_cut:
        windowed.token_cut.append(prompt.record.key)
    return end


def _next_start(
    prompt: _Prompt, tokenizer: Any, cuts: list[int], start: int, end: int, overlap_tokens: int | None
) -> int:
    """Where the window after [start, end) starts: `end` less the overlap (module docstring, step 4)."""
    text = prompt.record.text
    inside = cuts[bisect.bisect_right(cuts, start) : bisect.bisect_left(cuts, end)]
    if overlap_tokens is None:
        at = bisect.bisect_left(cuts, end)
        if inside and at < len(cuts) and cuts[at] == end:
            return inside[-1]  # the window's last whole sentence
        overlap_tokens = token_overlap(prompt.room)  # it ends inside a sentence: its last tokens
    if overlap_tokens == 0:
        return end
    starts = [first for first, _ in token_spans(tokenizer, text, start, end)]

    def tail_tokens(at: int) -> int:  # tokens of the window from `at` on, as the window's text is encoded alone
        return len(starts) - bisect.bisect_left(starts, at)

    for candidate in inside:  # the earliest sentence start whose tail is short enough
        if tail_tokens(candidate) <= overlap_tokens:
            return candidate
    for candidate in sorted(set(starts)):
        if candidate > start and tail_tokens(candidate) <= overlap_tokens and not inside_word(text, candidate):
            return candidate
    return end


def token_overlap(room: int) -> int:
    """The default overlap, in tokens, after a window that ends inside a sentence (one longer than a window): an
    eighth of the window's room for text, at most 64 tokens."""
    return min(64, room // 8)


def check_overlap(overlap_tokens: int | None) -> int | None:
    """--window-overlap's value: a whole number of tokens, 0 or more (None: one sentence)."""
    if overlap_tokens is not None and (isinstance(overlap_tokens, bool) or overlap_tokens < 0):
        raise BadInput(f"--window-overlap must be 0 or a positive number of tokens, not {overlap_tokens}")
    return overlap_tokens


def split_long(
    records: Sequence[PromptRecord],
    tokenizer: Any,
    template: str,
    max_input_tokens: int,
    overlap_tokens: int | None = None,
) -> Windowed:
    """`records`, each whose prompt has more than `max_input_tokens` tokens replaced by its windows (module
    docstring). BadInput when the prompt without any text is already too long, or the overlap is not smaller than
    the text a window holds.

    Every prompt is encoded here to find the long ones, and the runner encodes the ones it runs again: keeping the
    ids of a whole corpus between the two would hold what encoded_prompts encodes slice by slice so as not to hold."""
    overlap_tokens = check_overlap(overlap_tokens)
    windowed = Windowed([])
    lengths = {item.index: len(item.ids) for item in encoded_prompts(tokenizer, records, template)}
    for index, record in enumerate(records):
        if record.error is not None or lengths[index] <= max_input_tokens:
            windowed.records.append(record)
            continue
        prompt = _Prompt(record, tokenizer, template, max_input_tokens)
        bare = max_input_tokens - prompt.room
        if bare >= max_input_tokens:
            raise BadInput(
                f"prompt {record.key}: without any input text it already takes {bare} tokens, "
                f"{bare - max_input_tokens + 1} more than the plan's max_input_tokens ({max_input_tokens}) leaves for "
                "one token of text: re-plan with a larger --max-input-tokens, or use a smaller --chunk-size or "
                "fewer --example items"
            )
        room = prompt.room
        if overlap_tokens is not None and overlap_tokens >= room:
            raise BadInput(
                f"--window-overlap {overlap_tokens} is not smaller than a window: prompt {record.key}'s template, "
                f"instruction and schema leave {room} tokens of text per window: give an overlap under {room}"
            )
        spans = split_windows(prompt, tokenizer, overlap_tokens, windowed)
        for number, (start, end, new_from) in enumerate(spans, 1):
            where = TextWindow(record, number, len(spans), start, end, new_from)
            windowed.records.append(with_input(record, record.text[start:end], number, where, prompt.fields))
    return windowed


def summary(windowed: Windowed) -> list[str]:
    """What splitting did, as notes for the run's report (nothing when no record was split)."""
    notes = []
    if windowed.reencoded:
        notes.append(
            f"--split-long: {windowed.reencoded} prompts fit once their instruction JSON is written without \\u "
            "escapes (as the authors write it), in one window"
        )
    if not windowed.split:
        return notes
    notes.append(
        f"--split-long: {windowed.split} prompts too long for the plan (a text per schema chunk) became "
        f"{windowed.windows} windows"
    )
    if windowed.token_cut:
        keys = ", ".join(windowed.token_cut[:5]) + (" ..." if len(windowed.token_cut) > 5 else "")
        notes.append(
            f"{len(windowed.token_cut)} prompts have a sentence longer than a window, cut at token boundaries "
            f"(prompts {keys})"
        )
    if windowed.overlap_dropped:
        notes.append(f"{windowed.overlap_dropped} cuts have no overlap: it would have left no room for new text")
    return notes
