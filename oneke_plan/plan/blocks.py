"""The model as placement units, in plain data: its tensors, its blocks, and the whole layout.

A *block* is what accelerate will not split: a decoder layer (the model's `_no_split_modules`), or a leaf such as
the embeddings, the final norm or the lm_head. layout.py reads these off a model built on the meta device; the
placement arithmetic (fit.py) and the planner only read them. No torch, no transformers: sizes are ints (elements,
bytes per element).
"""

from __future__ import annotations

from dataclasses import dataclass

from oneke_plan.plan.memory import AttentionShape


@dataclass(frozen=True)
class TensorInfo:
    """One parameter or buffer: its size, and how it is stored once loaded."""

    name: str
    numel: int
    is_float: bool
    dtype_bytes: int  # bytes per element once loaded unquantized at the layout's dtype (transformers' rules)
    is_buffer: bool


@dataclass(frozen=True)
class BlockInfo:
    name: str
    kind: str  # "layer" (a decoder layer), "lm_head", or "other"
    tensors: tuple[TensorInfo, ...]
    tied_to: str | None  # an earlier block whose weight this one shares: both must sit on one device


@dataclass(frozen=True)
class ModelLayout:
    architecture: str
    model_type: str
    dtype: str  # the dtype it was built at, which its tensors' dtype_bytes are for
    parameter_count: int  # tied weights counted once
    num_layers: int
    max_position_embeddings: int | None
    vocab_size: int  # rows of the output embeddings (logits per position); 0 without any
    attention: AttentionShape | None  # for the analytic cross-check (docs/memory-model.md); None if not LLaMA-like
    no_split_module_classes: tuple[str, ...]
    blocks: tuple[BlockInfo, ...]
    input_embeddings: str | None = None  # the block of the input embeddings (a lookup: decoding reads B rows of it)
    output_embeddings_numel: int = 0  # elements of the lm_head's weight (tied or not): its matmul's parameters
