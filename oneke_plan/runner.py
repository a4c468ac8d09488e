"""Extraction over a file of prompts: tokenize once, batch by length, generate, parse, write each line as it is done.

A prompt longer than the plan's max_input_tokens is reported in its output line, never cut (cutting on the right
drops the closing [/INST]). Out of memory halves the batch and retries; a single prompt that still does not fit is
reported in its line. Every other prompt is written exactly once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oneke_plan import oneke
from oneke_plan.extract import OutputWriter, PromptRecord
from oneke_plan.generation import Encoded, length_batches


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


def encode_prompts(tokenizer: Any, records: Sequence[PromptRecord]) -> list[Encoded]:
    """Token ids of each record's full chat prompt, BOS included (the tokenizer adds it, as in training)."""
    texts = [oneke.chat_prompt(record.instruction) for record in records]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [Encoded(i, list(row)) for i, row in enumerate(ids)]


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    # torch.cuda.OutOfMemoryError: the public name since torch 1.13 (torch.OutOfMemoryError only since 2.5)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Runner:
    """Drives generation over records and writes one output line per record."""

    def __init__(
        self,
        generate: Callable[[Sequence[Sequence[int]]], list[list[int]]],
        tokenizer: Any,
        writer: OutputWriter,
        batch_size: int,
        max_input_tokens: int,
        progress: bool = True,
    ):
        self.generate = generate
        self.tokenizer = tokenizer
        self.writer = writer
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.progress = progress
        self.stats = RunStats()

    def run(self, records: Sequence[PromptRecord]) -> RunStats:
        from tqdm import tqdm

        start = time.perf_counter()
        encoded = encode_prompts(self.tokenizer, records)
        fitting = []
        for item in encoded:
            if len(item.ids) > self.max_input_tokens:
                self._fail(
                    records[item.index],
                    f"prompt has {len(item.ids)} tokens, more than the plan's "
                    f"max_input_tokens ({self.max_input_tokens}); it was not cut: re-plan with "
                    f"--max-input-tokens {len(item.ids)} to run it",
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
            for batch in length_batches(fitting, self.batch_size):
                self._run_batch(records, batch, bar, start)
        finally:
            bar.close()
            self.stats.seconds = time.perf_counter() - start
        return self.stats

    def _run_batch(self, records: Sequence[PromptRecord], batch: list[Encoded], bar: Any, start: float) -> None:
        answers = None
        try:
            answers = self.generate([item.ids for item in batch])
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        if answers is None:
            # Out of memory. Retry only here, after the except block: inside it, the traceback keeps the failed
            # call's frames (and their KV cache) alive, so nothing could be freed for the retry.
            _release_cached_memory()
            if len(batch) == 1:
                self.stats.out_of_memory += 1
                self._fail(
                    records[batch[0].index],
                    f"out of memory even alone ({len(batch[0].ids)} prompt tokens); "
                    "re-plan with a smaller --max-new-tokens or more memory",
                )
                bar.update(1)
                return
            self.stats.oom_retries += 1
            half = len(batch) // 2
            self._run_batch(records, batch[:half], bar, start)
            self._run_batch(records, batch[half:], bar, start)
            return
        for item, answer in zip(batch, answers, strict=True):
            record = records[item.index]
            text = self.tokenizer.decode(answer, skip_special_tokens=True)
            parsed, error = oneke.parse_output(record.task, text)
            self.writer.write(record, text, parsed, error)
            self.stats.prompts += 1
            self.stats.prompt_tokens += len(item.ids)
            self.stats.new_tokens += len(answer)
            self.stats.parse_errors += error is not None
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{self.stats.new_tokens / elapsed:.1f} tok/s", refresh=False)
        bar.update(len(batch))

    def _fail(self, record: PromptRecord, reason: str) -> None:
        # An `error` line, not a parse error: no answer was produced, so --resume runs this prompt again.
        self.writer.fail(record, reason)


def _release_cached_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
