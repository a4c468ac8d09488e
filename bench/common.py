"""Helpers shared by the benchmark scripts: public model configs, the machine line, tables, checkpoints, storages.

Every benchmark runs from a fresh clone with `python bench/NAME.py` (the package installed, e.g. `pip install -e .`).
Random checkpoints are built with tools/tiny_checkpoint.py into a cache directory (default:
$TMPDIR/oneke-plan-bench; set ONEKE_BENCH_CACHE to move it) and reused while their build arguments are unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The random checkpoint builder is a development tool beside the package, not in it: tools/tiny_checkpoint.py.
sys.path.insert(0, str(ROOT / "tools"))
GiB = 2**30
MiB = 2**20

# Public config.json values (Hugging Face hub, as published), written inline so no download is needed. Only the
# fields that set tensor shapes, dtype and context matter to the planner; the rest are copied for faithfulness.
PUBLIC_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf: MHA, 32 layers, untied, fp16.
    "llama-2-7b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    },
    # mistralai/Mistral-7B-v0.1: GQA with 8 KV heads, sliding window 4096, bf16.
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen2-1.5B: GQA with 2 KV heads, q/k/v biases, tied embeddings, 151,936-token vocabulary.
    "qwen2-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "max_window_layers": 28,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # google/gemma-2b: multi-query attention (1 KV head), head_dim 256, tied 256,000-token embeddings.
    "gemma-2b": {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06,
        "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # meta-llama/Llama-2-70b-hf: GQA with 8 KV heads, 80 layers, untied, fp16.
    "llama-2-70b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    },
}


# Random LLaMA checkpoints (tiny_checkpoint.build_tiny_llama arguments), built on first use: bf16, 32,000-token
# vocabulary like LLaMA-2. Sizes: 0.13B ~ 0.27 GB, 0.55B ~ 1.1 GB, 0.94B ~ 1.9 GB on disk.
CHECKPOINTS: dict[str, dict[str, Any]] = {
    "0.13B": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  vocab_size=32000),
    "0.13B-gqa": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000),
    "0.13B-tied": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       vocab_size=32000, tie_word_embeddings=True),
    # extraction_speed: >= 100M parameters but only 4 layers, so 72 prompts decode in minutes on 2 cores.
    "0.12B-wide": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                       vocab_size=32000),
    # memory_accuracy's long prompts: a Qwen2.5-0.5B-shaped layer (hidden 896, 14 heads, 2 KV heads) in 4 layers, so
    # that a 16k-token prefill runs in seconds on 2 cores; the peak is one layer's, however many there are.
    "long-0.1B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=32000, max_position_embeddings=32768),
    "0.55B": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                  vocab_size=32000),
    "0.94B": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                  vocab_size=32000),
}


def quiet_libraries() -> None:
    """accelerate logs 'Device 0 is not available' for every described GPU on a CPU machine: silence it. And no
    network, as the tools (compat.stay_offline: bitsandbytes would ask the Hub for a CPU kernel)."""
    import logging
    import warnings

    from oneke_plan.measure.compat import stay_offline

    stay_offline()
    for name in ("accelerate", "transformers", "bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def machine_line() -> str:
    """One line naming the CPU, cores, memory and library versions the numbers came from."""
    import accelerate
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - only a version string
        bnb = "n/a"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem / GiB:.0f} GiB RAM; python {platform.python_version()}, "
        f"torch {torch.__version__} (threads {torch.get_num_threads()}), transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, bitsandbytes {bnb}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] | None = None) -> str:
    """oneke-plan's own table layout (cli/common.format_table) with a dashed rule under the header; numeric columns
    right-aligned (all but the first by default)."""
    from oneke_plan.cli.common import format_table

    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]
    right = range(1, len(header)) if right is None else right
    return format_table(list(header), [["-" * w for w in widths], *cells], right=right)


def cache_dir() -> Path:
    root = Path(os.environ.get("ONEKE_BENCH_CACHE") or Path(tempfile.gettempdir()) / "oneke-plan-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def checkpoint(name: str, **kwargs: Any) -> Path:
    """A random LLaMA checkpoint built by tiny_checkpoint.build_tiny_llama(**kwargs), cached under `name`."""
    import shutil

    from tiny_checkpoint import build_tiny_llama

    out = cache_dir() / name
    stamp = out / ".bench-args.json"
    wanted = json.dumps({k: str(v) for k, v in sorted(kwargs.items())})
    if stamp.is_file() and stamp.read_text() == wanted:
        return out
    if out.exists():
        shutil.rmtree(out)
    build_tiny_llama(out, **kwargs)
    stamp.write_text(wanted)
    return out


def bench_checkpoint(name: str) -> Path:
    """One of CHECKPOINTS, built (or reused) in the cache."""
    return checkpoint(f"mem-{name}", **CHECKPOINTS[name])


def parameter_count(path: Path) -> int:
    from tiny_checkpoint import checkpoint_num_parameters

    return checkpoint_num_parameters(path)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared/tied storages counted once), all devices together."""
    seen: set[tuple[Any, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_tensors(model):
    """Every tensor the model holds: parameters, buffers, and bitsandbytes quantization state."""
    out = []
    for _, p in [*model.named_parameters(), *model.named_buffers()]:
        out.append(p)
        out.append(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            out += [state.absmax, state.code, getattr(state, "offset", None)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                out += [nested.absmax, nested.code]
    for module in model.modules():  # Linear8bitLt keeps SCB on its state too
        state = getattr(module, "state", None)
        if state is not None:
            out.append(getattr(state, "SCB", None))
    return [t for t in out if t is not None]


def cache_tensors(cache: Any) -> list[Any]:
    """The key/value tensors of the cache generate returned: transformers 5's .layers, 4.x's key_cache/value_cache,
    or legacy tuples."""
    if cache is None:
        return []
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:
        pairs = [tuple(layer) for layer in cache]
    return [t for pair in pairs for t in pair if t is not None]
