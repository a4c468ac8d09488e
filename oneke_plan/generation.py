"""Batched greedy decoding that gives the same tokens as decoding each prompt alone.

Prompts are tokenized once, sorted by length and batched so little padding is wasted; padding goes on the left
(with an attention mask, so positions and attention ignore it), and each answer is cut at its first EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Encoded:
    """A prompt's token ids (BOS included), and its position in the caller's list."""

    index: int
    ids: list[int]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's EOS (int or list) and the tokenizer's."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return ids


def input_device(model: Any) -> Any:
    """Where input ids must be: the embeddings' device (accelerate's hooks move them on from there)."""
    import torch

    weight = model.get_input_embeddings().weight
    if weight.device.type != "meta":
        return weight.device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def length_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Batches of prompts of similar length (longest first, so an out-of-memory shows up at once)."""
    ordered = sorted(encoded, key=lambda e: (-len(e.ids), e.index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


class GreedyGenerator:
    """Greedy decoding of token-id prompts with transformers' generate, in left-padded batches."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.device = input_device(model)

    def generate(self, batch: Sequence[Sequence[int]]) -> list[list[int]]:
        """New tokens for each prompt, cut before the first EOS."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad,
                eos_token_id=self.eos or None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        answers = []
        for row in output[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in self.eos), len(row))
            answers.append(row[:cut])
        return answers
