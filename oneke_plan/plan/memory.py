"""The memory model: pure byte arithmetic on shapes. No torch, no weights, every term named.

All results are ints, in bytes. A device's estimate is

    weights_bytes + kv_cache_bytes + workspace_bytes + reserve_bytes

The planner measures the KV cache (and any recurrent state) and the activations by running each model's own code
on the meta device (measure/forward.py): whatever the architecture. The formulas here for those two terms describe a
LLaMA-shaped model; they are the explanation (docs/memory-model.md) and an independent cross-check of the
measurement in the tests. Weights (bitsandbytes' layout), logits, quantization scratch and the reserve are
computed here and used as they are (speed is speed.py's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from oneke_plan.core.records import boolean, checks, one_of, positive_int
from oneke_plan.core.sizes import GiB

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

QuantMode = Literal["none", "8bit", "4bit"]
QUANT_MODES: tuple[QuantMode, ...] = ("none", "8bit", "4bit")
QuantType = Literal["nf4", "fp4"]
QUANT_TYPES: tuple[QuantType, ...] = ("nf4", "fp4")  # bitsandbytes' 4-bit data types

# bitsandbytes 4-bit layout (bitsandbytes/functional.py, quantize_4bit): weights packed two per byte, one absmax per
# block of 64 values; with double quantization the absmaxes are themselves quantized to uint8 in blocks of 256.
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
BNB_4BIT_CODE_BYTES = 16 * 4  # the nf4/fp4 lookup table, 16 fp32 values, kept per quant state
BNB_NESTED_CODE_BYTES = 256 * 4  # the dynamic-quantization map of the nested absmax, 256 fp32 values
BNB_NESTED_OFFSET_BYTES = 4  # the fp32 mean subtracted from the absmaxes before nesting

# Default per-GPU runtime reserve: what a process holds besides torch's allocations. It covers the CUDA context with
# lazy module loading (CUDA 11.7+: 256-610 MiB published, torch PR #86509 and the others cited in docs/memory-model.md
# "The GPU reserve"; 778 MiB of non-torch memory in the largest published case, an H100 during a forward),
# cuBLAS/cuBLASLt workspaces (about 9 MiB a stream, 64 MiB on Hopper) and allocator rounding, with about 180 MiB to
# spare in that case. An upper bound from published context sizes, not calibrated on a GPU here (none was
# lent): raise it with --reserve for CUDA before 11.7, a display on the card, several processes on one card, NCCL.
DEFAULT_GPU_RESERVE_BYTES = 1 * GiB
# Host memory the running process needs besides the weights it holds: the Python interpreter with torch,
# transformers, accelerate and bitsandbytes imported, the tokenizer and I/O buffers (measured: docs/memory-model.md).
DEFAULT_CPU_RESERVE_BYTES = 2 * GiB

@dataclass(frozen=True)
class Quantization:
    """How Linear weights are stored. `mode` is the public contract; the rest are bitsandbytes settings. The
    defaults are the only ones: a profile without quant_type or double_quant means these."""

    mode: QuantMode = field(default="none", metadata=checks(one_of(QUANT_MODES), required=True))
    # 4-bit only: the data type, and whether the absmaxes are quantized too (QLoRA's default)
    quant_type: str = field(default="nf4", metadata=checks(one_of(QUANT_TYPES)))
    double_quant: bool = field(default=True, metadata=checks(boolean))

    def to_data(self) -> dict[str, object]:
        """As a profile holds it: the mode, and the bitsandbytes settings only where they mean something (4-bit)."""
        if self.mode != "4bit":
            return {"mode": self.mode}
        return {"mode": self.mode, "quant_type": self.quant_type, "double_quant": self.double_quant}


NO_QUANTIZATION = Quantization()


def merges_on_load(mode: str) -> bool:
    """A LoRA adapter is merged into 16-bit weights on load; with 8/4-bit weights (quantization `mode`) it stays
    unmerged (merging would requantize them)."""
    return mode == "none"


@dataclass(frozen=True)
class Workload:
    """What one generate call must hold: a batch of prompts up to max_input_tokens, each growing by max_new_tokens."""

    max_input_tokens: int = field(metadata=checks(positive_int))
    max_new_tokens: int = field(metadata=checks(positive_int))
    batch_size: int = field(metadata=checks(positive_int))

    @property
    def sequence_tokens(self) -> int:
        """Positions the KV cache must hold per sequence (prompt plus every generated token)."""
        return self.max_input_tokens + self.max_new_tokens


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of a decoder layer that set its KV cache and activations."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int


def linear_weight_bytes(out_features: int, in_features: int, quant: Quantization, dtype_bytes: int) -> int:
    """Bytes a Linear's weight matrix takes once loaded (bias excluded: it stays in the compute dtype).

    - none: out*in elements of the compute dtype.
    - 8bit (bitsandbytes Int8Params): 1 byte per element plus one fp32 scale (SCB) per output row.
    - 4bit (bitsandbytes Params4bit): half a byte per element plus one absmax per 64-element block: fp32, or
      with double quantization uint8 plus an fp32 absmax per 256 blocks, the nested code table and its offset;
      plus the 16-entry fp32 code table of nf4/fp4.
    """
    n = out_features * in_features
    if quant.mode == "none":
        return n * dtype_bytes
    if quant.mode == "8bit":
        return n + 4 * out_features
    blocks = -(-n // BNB_4BIT_BLOCKSIZE)
    packed = -(-n // 2)
    if not quant.double_quant:
        return packed + 4 * blocks + BNB_4BIT_CODE_BYTES
    nested_blocks = -(-blocks // BNB_NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested_blocks + BNB_NESTED_CODE_BYTES + BNB_NESTED_OFFSET_BYTES + BNB_4BIT_CODE_BYTES


def kv_cache_bytes_per_token(shape: AttentionShape, dtype_bytes: int) -> int:
    """KV cache bytes one decoder layer adds per token of one sequence: K and V, each kv_heads x head_dim.

    Uses num_key_value_heads, so grouped-query attention (GQA) models need proportionally less.
    """
    return 2 * shape.num_key_value_heads * shape.head_dim * dtype_bytes


def layer_kv_cache_bytes(shape: AttentionShape, workload: Workload, dtype_bytes: int) -> int:
    """KV cache of one decoder layer for the whole workload: batch x (input + new tokens) positions."""
    return kv_cache_bytes_per_token(shape, dtype_bytes) * workload.batch_size * workload.sequence_tokens


def layer_activation_bytes(shape: AttentionShape, workload: Workload, dtype_bytes: int, eager: bool = False) -> int:
    """Peak transient bytes while one decoder layer runs prefill (the largest step of generation).

    Prefill runs the batch's full prompts (rows = batch x max_input_tokens) through the layer. Alive throughout:
    - held by the model's forward: the embedding output (hidden) for the whole forward, and from the second layer
      on the previous layer's output too (2 x hidden), RoPE cos and sin (2 x head_dim), and the 4D attention
      mask, batch x seq x seq, counted at 2 bytes (transformers builds it boolean or in the compute dtype,
      depending on version and backend; the larger is counted), where transformers builds one: for a batch of
      prompts (padded), or with eager attention; SDPA with a single prompt has nothing to mask.
    Plus the largest of the layer's three steps:
    - RMSNorm: the residual input and the norm's two fp32 copies (hidden x (dtype + 8 bytes));
    - attention: residual and normed input (2 x hidden), q, k and v with k/v expanded to all heads for
      grouped-query attention, and the attention output (4 x heads x head_dim);
    - MLP: residual and normed input (2 x hidden), gate, up and act(gate) * up (3 x intermediate).
    With SDPA (transformers' default) the attention scores are never materialized, but for a batch torch converts
    the boolean mask to an additive one of the compute dtype for the call (batch x seq x seq); with eager attention
    (`eager=True`) the attention step also holds batch x heads x seq x seq scores: in the compute dtype, their
    fp32 softmax and its cast back (2 x dtype + 4 bytes each).
    Cross-checked against the measurement (tests/measure/test_memory.py) and torch.profiler on CPU
    (bench/memory_accuracy.py, docs/benchmarks.md).
    """
    rows = workload.batch_size * workload.max_input_tokens
    seq = workload.max_input_tokens
    mask = workload.batch_size * seq * seq * 2 if eager or workload.batch_size > 1 else 0
    held = rows * (2 * shape.hidden_size + 2 * shape.head_dim) * dtype_bytes + mask
    norm = rows * shape.hidden_size * (dtype_bytes + 8)
    attention = rows * (2 * shape.hidden_size + 4 * shape.num_attention_heads * shape.head_dim) * dtype_bytes
    if eager:
        attention += workload.batch_size * shape.num_attention_heads * seq * seq * (2 * dtype_bytes + 4)
    elif workload.batch_size > 1:
        attention += workload.batch_size * seq * seq * dtype_bytes
    mlp = rows * (2 * shape.hidden_size + 3 * shape.intermediate_size) * dtype_bytes
    return held + max(norm, attention, mlp)


def logits_bytes(batch_size: int, vocab_size: int) -> int:
    """What generation holds beside the model's own logits (which the measured forward counts) on the lm_head's
    device per decoding step: transformers' generate copies the last position's logits to float32 and its logits
    processors return float32 scores: batch x vocab x (4 + 4)."""
    return batch_size * vocab_size * (4 + 4)


def quant_scratch_bytes(out_features: int, in_features: int, quant: Quantization) -> int:
    """Transient bytes a quantized Linear needs beside its stored weight.

    - 4bit: bitsandbytes dequantizes the weight to the compute dtype (2 bytes) for a prefill matmul.
    - 8bit: the weight arrives in 16 bits and is quantized on the device, so one 16-bit copy of the largest
      Linear is alive at load time.
    - none: nothing.
    """
    if quant.mode == "none":
        return 0
    return out_features * in_features * 2
