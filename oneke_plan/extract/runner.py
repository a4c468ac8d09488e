"""Extraction over a file of prompts: tokenize once, decode (generation.py), parse, write each line as it is done.

A prompt longer than the plan's max_input_tokens is reported in its output line, never cut (cutting on the right
drops the closing [/INST]). Out of memory halves the batch size for the rest of the run and starts again the prompts
that were in flight; a single prompt that still does not fit is reported in its line. Every other prompt is written
exactly once, as soon as its answer ends, and then yielded (Runner.lines) to whoever iterates (oneke_plan.api).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from oneke_plan.extract.answer_lines import OutputWriter, answer_line, error_line
from oneke_plan.extract.batching import Encoded, length_batches
from oneke_plan.extract.inputs import PromptRecord
from oneke_plan.formats import answers
from oneke_plan.formats.templates import ONEKE_TEMPLATE, TEMPLATES, chat_messages, special_token_ids

ENCODE_SLICE_CHARS = 2**18
"""Characters of instructions tokenized in one call (encoded_prompts), unless one instruction alone is longer: some
500 prompts of OneKE's size, so that the tokenizer's own batching still pays, and a few tens of MB of its memory.
An input line at its bound (io.limits.MAX_INPUT_LINE_BYTES) is up to 2M characters, tokenized alone."""


@dataclass
class RunStats:
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    parse_errors: int = 0
    too_long: int = 0
    out_of_memory: int = 0
    oom_retries: int = 0
    seconds: float = 0.0


def encode_prompts(
    tokenizer: Any, records: Sequence[PromptRecord], template: str = ONEKE_TEMPLATE
) -> list[Encoded]:
    """Token ids of each record's full chat prompt in `template`, as the model was trained on them.

    A prompt of one text part (OneKE's llama2_zh, with the system block folded into [INST]) is that text as the
    tokenizer encodes it, BOS included where the model has one. A prompt of several parts is laid out as the
    authors' encoder does it: BOS where the tokenizer has one and adds it, then each part on its own, a text
    encoded without special tokens, a special token by its id. Encoding the joined text instead would differ: a
    SentencePiece tokenizer starts every text it encodes at a word boundary (tests/load/test_sentencepiece.py).

    The model's own chat template (templates.MODEL_TEMPLATE) is rendered by transformers' apply_chat_template
    with the generation prompt, and its text encoded without adding special tokens, as apply_chat_template's own
    tokenize=True does (the template writes every special token itself).

    verbose=False: transformers' warning about prompts over the tokenizer's model_max_length is not this tool's
    limit; the runner holds each prompt to the plan's max_input_tokens itself.
    """
    tmpl = TEMPLATES[template]
    if tmpl.from_tokenizer:
        texts = [
            tokenizer.apply_chat_template(chat_messages(r.instruction), add_generation_prompt=True, tokenize=False)
            for r in records
        ]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        return [Encoded(i, list(row)) for i, row in enumerate(ids)]
    parts = [tmpl.parts(record.instruction) for record in records]
    if all(len(p) == 1 and isinstance(p[0], str) for p in parts):
        texts = [str(p[0]) for p in parts]
        ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []
        return [Encoded(i, list(row)) for i, row in enumerate(ids)]
    head = _added_bos(tokenizer)
    texts = [part for p in parts for part in p if isinstance(part, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    special = special_token_ids(tmpl, tokenizer, "the tokenizer")  # checked before any weight (check_tokenizer)
    out = []
    for i, prompt in enumerate(parts):
        row = list(head)
        for part in prompt:
            row += list(next(encoded)) if isinstance(part, str) else [special[part.text]]
        out.append(Encoded(i, row))
    return out


def encoded_prompts(tokenizer: Any, records: Sequence[PromptRecord], template: str) -> Iterator[Encoded]:
    """encode_prompts of every record with a prompt (error None), indexed in `records`, a slice of at most
    ENCODE_SLICE_CHARS characters at a time: the tokenizer holds some 100 bytes for each character it encodes (its
    Encodings, then Python's lists), so one call over a whole file would hold a file's worth at once, and a caller
    can drop what it does not keep before the next slice is encoded."""
    parts: list[list[int]] = [[]]
    chars = 0
    for index, record in enumerate(records):
        if record.error is not None:
            continue
        if parts[-1] and chars + len(record.instruction) > ENCODE_SLICE_CHARS:
            parts.append([])
            chars = 0
        parts[-1].append(index)
        chars += len(record.instruction)
    for part in parts:
        for item in encode_prompts(tokenizer, [records[i] for i in part], template):
            yield Encoded(part[item.index], item.ids)


def prompt_tokens(tokenizer: Any, record: PromptRecord, template: str) -> int:
    """How many tokens `record`'s whole prompt is, as the runner encodes it (BOS and template included)."""
    return len(encode_prompts(tokenizer, [record], template)[0].ids)


def _added_bos(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer starts what it encodes with it, else []: asked of the tokenizer itself, as the
    one-part route lets it decide (its add_bos_token attribute is not set the same way on every version)."""
    bos = tokenizer.bos_token_id
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    return [bos] if bos is not None and first == [bos] else []


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the GPU ran out of memory, so that a smaller batch may run where this one did not.

    Three forms: torch's caching allocator raises torch.cuda.OutOfMemoryError (the public name since torch 1.13;
    torch.OutOfMemoryError only since 2.5); other CUDA calls raise a RuntimeError whose text says "out of memory";
    and cuBLAS, when it cannot allocate its handle or workspace, fails with CUBLAS_STATUS_ALLOC_FAILED, which torch
    raises as RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`") without
    saying "memory" at all.
    """
    import torch

    text = str(exc)
    return (
        isinstance(exc, torch.cuda.OutOfMemoryError)
        or "out of memory" in text.lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


class Decoder(Protocol):
    """What the Runner drives (generation.GreedyGenerator): answers as they end, and which prompts are started
    and not yet answered when it fails."""

    in_flight: set[int]

    def run(self, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]: ...


class BatchDecoder:
    """A Decoder over a function that answers one batch of token-id prompts at a time (length-sorted batches)."""

    def __init__(self, generate: Callable[[Sequence[Sequence[int]]], list[list[int]]]):
        self.generate = generate
        self.in_flight: set[int] = set()

    def run(self, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]:
        for batch in length_batches(prompts, batch_size):
            self.in_flight = {item.index for item in batch}
            answers = self.generate([item.ids for item in batch])
            for item, answer in zip(batch, answers, strict=True):
                self.in_flight.discard(item.index)
                yield item.index, answer


class Runner:
    """Drives generation over records and writes one output line per record (to `writer`, when there is one)."""

    def __init__(
        self,
        decoder: Decoder | Callable[[Sequence[Sequence[int]]], list[list[int]]],
        tokenizer: Any,
        writer: OutputWriter | None,
        batch_size: int,
        max_input_tokens: int,
        progress: bool = True,
        template: str = ONEKE_TEMPLATE,
    ):
        self.decoder: Decoder = BatchDecoder(decoder) if callable(decoder) else decoder
        self.tokenizer = tokenizer
        self.template = template
        self.writer = writer
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.progress = progress
        self.stats = RunStats()

    def run(self, records: Sequence[PromptRecord]) -> RunStats:
        """Answer every record; return what it took."""
        for _ in self.lines(records):
            pass
        return self.stats

    def lines(self, records: Sequence[PromptRecord]) -> Iterator[dict[str, Any]]:
        """Answer every record, yielding each record's line (an answer line, or an error line) once it is written;
        `stats` counts them. Stopping the iteration stops generation; the lines written so far stay written."""
        from tqdm import tqdm

        start = time.perf_counter()
        fitting = []
        for record in records:
            if record.error is not None:  # a line too long to read (inputs.LongInputLine): never tokenized
                yield self._fail(record, record.error)
                self.stats.too_long += 1
        for item in encoded_prompts(self.tokenizer, records, self.template):
            if len(item.ids) > self.max_input_tokens:
                yield self._fail(
                    records[item.index],
                    f"prompt has {len(item.ids)} tokens, more than the plan's "
                    f"max_input_tokens ({self.max_input_tokens}); it was not cut: re-plan with "
                    f"--max-input-tokens {len(item.ids)} to run it whole, or run with --split-long to split its "
                    "text into windows that fit",
                )
                self.stats.too_long += 1
            else:
                fitting.append(item)
        bar = tqdm(
            total=len(records),
            initial=len(records) - len(fitting),
            unit="rec",
            file=sys.stderr,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            yield from self._decode_all(records, fitting, bar, start)
        finally:
            bar.close()
            self.stats.seconds = time.perf_counter() - start

    def _decode_all(
        self, records: Sequence[PromptRecord], fitting: list[Encoded], bar: Any, start: float
    ) -> Iterator[dict[str, Any]]:
        """Decode until every prompt is answered or reported; halve the batch size on each out-of-memory."""
        pending = {item.index: item for item in fitting}
        batch_size = self.batch_size
        while pending:
            lost = yield from self._decode_some(records, pending, batch_size, bar, start)
            if lost is None:
                return
            # Out of memory. Retry only here, after the except block: inside it, the traceback keeps the failed
            # call's frames (and their KV cache) alive, so nothing could be freed for the retry.
            _release_cached_memory()
            if batch_size == 1:
                for index in sorted(lost):
                    self.stats.out_of_memory += 1
                    yield self._fail(
                        records[index],
                        f"out of memory even alone ({len(pending[index].ids)} prompt tokens); "
                        "re-plan with a smaller --max-new-tokens or more memory",
                    )
                    del pending[index]
                    bar.update(1)
                if not lost:
                    raise RuntimeError("out of memory with no prompt in flight")
                continue
            self.stats.oom_retries += 1
            batch_size = max(1, batch_size // 2)

    def _decode_some(
        self, records: Sequence[PromptRecord], pending: dict[int, Encoded], batch_size: int, bar: Any, start: float
    ) -> Generator[dict[str, Any], None, set[int] | None]:
        """Run the decoder over `pending`, writing and yielding answers as they come; return None when all are
        done, else (out of memory) the prompts that were in flight."""
        try:
            for index, answer in self.decoder.run(list(pending.values()), batch_size):
                yield self._answer(records[index], pending.pop(index), answer, bar, start)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return set(self.decoder.in_flight) & set(pending)
        return None

    def _answer(self, record: PromptRecord, item: Encoded, answer: list[int], bar: Any, start: float) -> dict[str, Any]:
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        parsed, error = answers.parse_output(record.task, text)
        line = self._write(answer_line(record, text, parsed, error))
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(item.ids)
        self.stats.new_tokens += len(answer)
        self.stats.parse_errors += error is not None
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{self.stats.new_tokens / elapsed:.1f} tok/s", refresh=False)
        bar.update(1)
        return line

    def _fail(self, record: PromptRecord, reason: str) -> dict[str, Any]:
        # An `error` line, not a parse error: no answer was produced, so --resume runs this prompt again.
        return self._write(error_line(record, reason))

    def _write(self, line: dict[str, Any]) -> dict[str, Any]:
        if self.writer is not None:
            self.writer.write_line(line)
        return line


def _release_cached_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
