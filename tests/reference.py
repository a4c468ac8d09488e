"""The reference answers tests compare oneke-run's against: transformers' own greedy `generate`, one prompt at a time
(an independent route: none of oneke_plan's decoding runs in it)."""

from __future__ import annotations

from typing import Any

import torch

from oneke_plan.extract.batching import Encoded

MAX_NEW = 10


def alone(model: Any, prompt: list[int], eos: list[int], max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy generate on one prompt, cut before the first EOS: the reference answer."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    return out[: next((k for k, token in enumerate(out) if token in eos), len(out))]


def frequent_stop(model: Any, prompts: list[Encoded]) -> int:
    """A token that some greedy answers produce part-way: as an extra EOS it makes answers end at different steps
    (random weights almost never produce the real EOS), so rows leave the batch and others join it."""
    counts: dict[int, int] = {}
    for item in prompts[:: max(1, len(prompts) // 12)]:
        for token in set(alone(model, item.ids, [2])[1:-1]):
            counts[token] = counts.get(token, 0) + 1
    return max(counts, key=lambda t: (counts[t] < len(prompts), counts[t]))
