"""The model's placement units, read off a model built on the meta device (no weights, no memory).

A *block* is what accelerate will not split: a decoder layer (the model's `_no_split_modules`), or a leaf such as
the embeddings, the final norm or the lm_head. The planner places whole blocks; this module only describes them
(tensor shapes, which Linears bitsandbytes would quantize, which weights are tied) so that every byte count after
this is pure arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

from oneke_plan.compat import dtype_kwarg, no_init_weights
from oneke_plan.errors import BadInput
from oneke_plan.memory import AttentionShape
from oneke_plan.model_source import ModelSource


@dataclass(frozen=True)
class TensorInfo:
    """One parameter or buffer: its shape, and how it is stored."""

    name: str
    numel: int
    is_float: bool
    own_dtype_bytes: int  # bytes per element as built; used for buffers and non-float tensors
    is_buffer: bool
    linear_shape: tuple[int, int] | None  # (out, in) when this is the weight of a Linear bitsandbytes quantizes


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
    parameter_count: int  # tied weights counted once
    num_layers: int
    max_position_embeddings: int | None
    attention: AttentionShape
    no_split_module_classes: tuple[str, ...]
    blocks: tuple[BlockInfo, ...]


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """A transformers config object for `source`, never running code from it unless asked to."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = source.config.get("model_type")
    if trust_remote_code and source.directory is not None:
        return AutoConfig.from_pretrained(source.directory, trust_remote_code=True)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        where = source.directory / "config.json" if source.directory else source.name
        raise BadInput(
            f"{where}: model_type {model_type!r} is not built into this transformers; upgrade transformers, or "
            "pass --trust-remote-code if you trust the code shipped with the model"
        )
    config_class = CONFIG_MAPPING[model_type]
    fields = {k: v for k, v in source.config.items() if k != "model_type"}
    return config_class.from_dict(fields)


def config_dtype(config: Any) -> str | None:
    """The dtype a config names, read as this transformers reads it: `dtype` since 4.56 (which also takes an old
    config's `torch_dtype`), only `torch_dtype` before. None if it names none."""
    dtype = getattr(config, dtype_kwarg(), None)
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def attention_shape(config: Any) -> AttentionShape:
    """The sizes that set KV cache and activations, from the config (names per transformers' attribute_map)."""

    def need(attr: str) -> int:
        value = getattr(config, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise BadInput(
                f"config.json: {attr} is missing or not a positive integer ({value!r}); "
                "oneke-plan needs it to size the KV cache"
            )
        return value

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return AttentionShape(
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=need("vocab_size"),
    )


def build_meta_model(
    config: Any, dtype: str, trust_remote_code: bool = False, attn_implementation: str | None = None
) -> Any:
    """AutoModelForCausalLM on the meta device, weights tied. `attn_implementation` None lets transformers choose
    (SDPA where the model supports it); the choice is in `model.config._attn_implementation`.

    ForCausalLM, not AutoModel: the headless model's parameter names (`layers.0...`) do not match a causal-LM
    checkpoint (`model.layers.0...`), which is how the published multi-GPU snippet ends with weights on meta.
    tie_weights: on transformers 5 a meta model is not tied until it is called, and untied weights are counted
    (and placed) twice.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    quiet = io.StringIO()
    with init_empty_weights(), no_init_weights(), warnings.catch_warnings(), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        try:
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code, **{dtype_kwarg(): torch_dtype}, **extra
            )
        except ValueError as exc:
            raise BadInput(f"config.json: transformers cannot build a causal LM from it ({exc})") from None
    model.tie_weights()
    return model


def _split_blocks(model: Any, no_split: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Modules and loose parameters in accelerate's traversal order, split until no_split classes or leaves."""
    import torch

    out: list[tuple[str, Any]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        children = list(module.named_children())
        if not children or type(module).__name__ in no_split:
            out.append((prefix, module))
            return
        for name, param in module.named_parameters(recurse=False):
            out.append((f"{prefix}.{name}" if prefix else name, param))
        for name, buf in module.named_buffers(recurse=False):
            out.append((f"{prefix}.{name}" if prefix else name, buf))
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out


def _quantizable_linears(model: Any) -> dict[str, tuple[int, int]]:
    """Full names of Linear weights bitsandbytes would replace, with (out, in).

    As transformers' bitsandbytes integration does by default: every nn.Linear except the output embeddings
    (lm_head), which stay in the compute dtype for accuracy.
    """
    import torch

    output = model.get_output_embeddings()
    return {
        f"{name}.weight": (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }


def _tensor_infos(prefix: str, obj: Any, quantizable: dict[str, tuple[int, int]], seen: set[int]) -> list[TensorInfo]:
    import torch

    if isinstance(obj, torch.Tensor):
        items = [(prefix, obj, isinstance(obj, torch.nn.Parameter) is False)]
    else:
        params = [(f"{prefix}.{n}" if prefix else n, t, False) for n, t in obj.named_parameters()]
        buffers = [(f"{prefix}.{n}" if prefix else n, t, True) for n, t in obj.named_buffers()]
        items = params + buffers
    infos = []
    for name, tensor, is_buffer in items:
        if id(tensor) in seen:  # a tied weight already counted in an earlier block
            continue
        seen.add(id(tensor))
        infos.append(
            TensorInfo(
                name=name,
                numel=tensor.numel(),
                is_float=tensor.is_floating_point(),
                own_dtype_bytes=tensor.element_size(),
                is_buffer=is_buffer,
                linear_shape=quantizable.get(name),
            )
        )
    return infos


def read_layout(model: Any, config: Any) -> ModelLayout:
    """Describe `model` (built by build_meta_model) block by block."""
    from accelerate.utils import find_tied_parameters

    no_split = tuple(getattr(model, "_no_split_modules", None) or ())
    quantizable = _quantizable_linears(model)
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), None)
    tied_groups = find_tied_parameters(model)

    seen: set[int] = set()
    blocks: list[BlockInfo] = []
    owner_of: dict[str, str] = {}
    for name, obj in _split_blocks(model, no_split):
        tensors = tuple(_tensor_infos(name, obj, quantizable, seen))
        kind = "layer" if type(obj).__name__ in no_split else "lm_head" if name == output_name else "other"
        tied_to = None
        for group in tied_groups:
            mine = [p for p in group if p == name or p.startswith(name + ".")]
            if mine:
                earlier = [owner_of[p] for p in group if p in owner_of and owner_of[p] != name]
                tied_to = earlier[0] if earlier else None
                for p in mine:
                    owner_of[p] = name
        blocks.append(BlockInfo(name, kind, tensors, tied_to))

    parameter_count = sum(t.numel for b in blocks for t in b.tensors if not t.is_buffer)
    num_layers = sum(1 for b in blocks if b.kind == "layer")
    return ModelLayout(
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        parameter_count=parameter_count,
        num_layers=num_layers,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        attention=attention_shape(config),
        no_split_module_classes=no_split,
        blocks=tuple(blocks),
    )
