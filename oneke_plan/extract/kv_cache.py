"""The KV cache as the decoder handles it, whatever the transformers version: made, read, filled, shrunk, merged.

transformers 4.x keeps a DynamicCache's tensors in key_cache / value_cache lists, 5.x in one layer object per
layer (full attention, sliding window, linear attention, ...); the functions here hide that difference from the
decoding loop (generation.py), and say which caches the loop's prefix reuse and row merging can work on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def new_cache(model: Any) -> Any:
    """The cache generate would make: a DynamicCache laid out by the model's config (sliding, linear, hybrid)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x takes no config
        return DynamicCache()


def uses_sliding_window(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    return bool(window) and getattr(text, "use_sliding_window", True) is not False


def supports_standard_cache(model: Any) -> bool:
    """False for the few models transformers itself gives no DynamicCache (its own test, where it has one)."""
    test = getattr(model, "_supports_default_dynamic_cache", None)
    return bool(test()) if callable(test) else True


# Layer types whose reorder_cache selects every state they hold (keys/values, conv and recurrent states, indexer
# keys), so finished rows can leave through it. A sliding layer's cumulative length is one number for all rows.
SHRINKABLE_LAYERS = frozenset(
    {
        "DynamicLayer",
        "DynamicSlidingWindowLayer",
        "DynamicIndexedLayer",
        "LinearAttentionLayer",
        "LinearAttentionAndFullAttentionLayer",
        "LinearAttentionAndSlidingWindowAttentionLayer",
        "DummyLayer",
    }
)


def cache_layers(cache: Any) -> list[Any] | None:
    return getattr(cache, "layers", None) if hasattr(cache, "layers") else None


def is_plain_kv_cache(cache: Any) -> bool:
    """Whether every layer holds plain full-attention keys and values, [batch, heads, positions, head_dim], that
    grow by one position per token: the cache prefix reuse and merging rows need."""
    layers = cache_layers(cache)
    if layers is None:
        return type(cache).__name__ == "DynamicCache" and hasattr(cache, "key_cache")  # transformers 4.x
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def can_shrink(cache: Any) -> bool:
    """Whether finished rows can leave this cache through its own methods (see SHRINKABLE_LAYERS)."""
    layers = cache_layers(cache)
    if layers is None:
        return is_plain_kv_cache(cache)
    return all(type(layer).__name__ in SHRINKABLE_LAYERS for layer in layers)


def shrink(cache: Any, rows: Any) -> None:
    """Keep only `rows` (a LongTensor of batch indices) in the cache, each layer on its own device."""
    layers = cache_layers(cache)
    if layers is None:  # transformers 4.x DynamicCache
        for i, keys in enumerate(cache.key_cache):
            cache.key_cache[i] = keys.index_select(0, rows.to(keys.device))
            cache.value_cache[i] = cache.value_cache[i].index_select(0, rows.to(keys.device))
        return
    cache.reorder_cache(rows)


def kv_pairs(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) of every layer of a plain KV cache."""
    layers = cache_layers(cache)
    if layers is None:
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(layer.keys, layer.values) for layer in layers]


def filled_cache(model: Any, pairs: Sequence[tuple[Any, Any]]) -> Any:
    """A new plain KV cache holding `pairs` as they are (views allowed: the next forward concatenates them)."""
    cache = new_cache(model)
    layers = cache_layers(cache)
    for i, (keys, values) in enumerate(pairs):
        if layers is None:
            cache.key_cache.append(keys)
            cache.value_cache.append(values)
            if i == 0 and hasattr(cache, "_seen_tokens"):
                cache._seen_tokens = keys.shape[-2]
        else:
            layers[i].lazy_initialization(keys, values)
            layers[i].keys, layers[i].values = keys, values
    return cache


def set_kv_pairs(cache: Any, pairs: Sequence[tuple[Any, Any]]) -> None:
    layers = cache_layers(cache)
    for i, (keys, values) in enumerate(pairs):
        if layers is None:
            cache.key_cache[i], cache.value_cache[i] = keys, values
        else:
            layers[i].keys, layers[i].values = keys, values


def pairs_bytes(pairs: Sequence[tuple[Any, Any]]) -> int:
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


def release_layer(cache: Any, layer: int) -> None:
    """Release one layer's tensors from a cache being merged away (the merged copy replaces them)."""
    layers = cache_layers(cache)
    if layers is None:
        cache.key_cache[layer] = cache.value_cache[layer] = None
    else:
        layers[layer].keys = layers[layer].values = None


def copy_rows(source: Any, rows: Any, first: int, out: Any, pad: int) -> None:
    """out[:, :, pad:] = source[rows, :, first:], with zeros in out[:, :, :pad]: one copy, no zero-filled
    allocation (padding must hold finite values: a masked position still multiplies its attention weight, 0, by
    its value)."""
    import torch

    out[:, :, :pad].zero_()
    view = source[:, :, first:]
    if len(rows) == source.shape[0] and bool((rows == torch.arange(len(rows))).all()):
        out[:, :, pad:].copy_(view)
    elif pad == 0:
        torch.index_select(view, 0, rows.to(source.device), out=out)
    else:
        out[:, :, pad:].copy_(view.index_select(0, rows.to(source.device)))
