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


def _forward_names(model: Any) -> tuple[dict[str, int], str]:
    """Keyword arguments that differ across transformers versions: the request for the last position's logits
    only (`logits_to_keep`, `num_logits_to_keep` before 4.50), and the KV cache's name (`cache` in recent 5.x,
    where `past_key_values` still works but goes through a slower deprecation shim)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    last_only = next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})
    return last_only, "cache" if "cache" in params else "past_key_values"


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x takes no config
        return DynamicCache()


def _keep_rows(cache: Any, rows: Any) -> None:
    """Drop finished sequences from the KV cache, each layer on its own device (transformers 5 and 4.x layouts)."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[rows.to(layer.keys.device)]
                layer.values = layer.values[rows.to(layer.values.device)]
        return
    for i, keys in enumerate(cache.key_cache):
        cache.key_cache[i] = keys[rows.to(keys.device)]
        cache.value_cache[i] = cache.value_cache[i][rows.to(keys.device)]


class GreedyGenerator:
    """Greedy decoding of token-id prompts in left-padded batches, where finished sequences leave the batch.

    The loop is transformers' greedy search written out (the same forward calls, masks and positions), plus one
    thing generate does not do: a sequence that has produced EOS is removed from the batch and its KV cache, so
    the remaining steps compute only the sequences still running.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.device = input_device(model)
        self.last_only, self.cache_name = _forward_names(model)

    def generate(self, batch: Sequence[Sequence[int]]) -> list[list[int]]:
        """New tokens for each prompt, cut before the first EOS."""
        import torch

        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        # Positions count real tokens only, so left padding does not shift them (as generate computes them).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        answers: list[list[int]] = [[] for _ in batch]
        running = list(range(len(batch)))  # answer index of each row still in the batch
        cache = _new_cache(self.model)
        eos = set(self.eos)
        with torch.inference_mode():
            for step in range(self.max_new_tokens):
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    use_cache=True,
                    **{self.cache_name: cache},  # updated in place
                    **self.last_only,
                )
                tokens = out.logits[:, -1, :].argmax(dim=-1).cpu()
                keep = []
                for row, token in enumerate(tokens.tolist()):
                    if token not in eos:
                        answers[running[row]].append(token)
                        keep.append(row)
                if not keep or step == self.max_new_tokens - 1:
                    break
                if len(keep) < len(running):
                    rows = torch.tensor(keep, dtype=torch.long)
                    _keep_rows(cache, rows)
                    running = [running[row] for row in keep]
                    tokens, mask, positions = tokens[rows], mask[rows], positions[rows]
                ids = tokens[:, None]
                mask = torch.cat([mask, torch.ones((len(keep), 1), dtype=torch.long)], dim=-1)
                positions = positions[:, -1:] + 1
        return answers
