"""The model's placement units, read off a model built on the meta device (no weights, no memory).

A *block* is what accelerate will not split: a decoder layer (the model's `_no_split_modules`), or a leaf such as
the embeddings, the final norm or the lm_head. The planner places whole blocks; this module builds the model on meta
and describes them as blocks.py's plain data (each tensor's bytes once loaded, which weights transformers'
bitsandbytes integration would quantize, which are tied) so that every byte count after this is pure arithmetic.
Each rule is transformers' own: its config reader, its model classes built at the planned dtype, its quantizer's
replace logic and skip list.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.measure.compat import dtype_kwarg, no_init_weights
from oneke_plan.plan.blocks import BlockInfo, ModelLayout, TensorInfo
from oneke_plan.plan.fit import device_owner
from oneke_plan.plan.memory import AttentionShape
from oneke_plan.plan.model_source import ModelSource


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """A transformers config object for `source`, read as transformers reads it (AutoConfig: defaults, attribute
    names, nested text configs), never running code from it unless asked to, and never touching the network.
    Its sizes are checked (validate_config) before anything is built from it."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if source.gguf_file is not None:  # transformers' config from the GGUF's metadata (measure.gguf)
        from oneke_plan.measure.gguf import load_gguf_config

        gguf_config = load_gguf_config(source.gguf_file)
        validate_config(gguf_config, str(source.gguf_file))
        return gguf_config
    where = source.directory / "config.json" if source.directory else source.name
    model_type = source.config.get("model_type")
    if not trust_remote_code and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING):
        raise BadInput(
            f"{where}: model_type {model_type!r} is not built into transformers {_transformers_version()}; upgrade "
            "transformers, or pass --trust-remote-code if you trust the code shipped with the model"
        )
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            if source.directory is not None:
                config = AutoConfig.from_pretrained(
                    str(source.directory), trust_remote_code=trust_remote_code, local_files_only=True
                )
            else:
                fields = {k: v for k, v in source.config.items() if k != "model_type"}
                config = CONFIG_MAPPING[str(model_type)].from_dict(fields)
    except Exception as exc:  # noqa: BLE001 - any failure of transformers' reader is about the file it was given
        raise BadInput(f"{where}: transformers cannot read this config ({_reason(exc)})") from None
    validate_config(config, str(where))
    return config


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _reason(exc: BaseException) -> str:
    """The most specific line of a config error (huggingface_hub's validation errors put it on the second line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else type(exc).__name__) or type(exc).__name__


# Config fields that count or size the model's tensors, and the most any real model has: a config beyond these
# is a mistake (1e9 layers would be built one by one), refused before anything is built.
_COUNT_LIMITS = {"num_hidden_layers": 10_000, "num_experts": 1_000_000, "num_local_experts": 1_000_000}
_CORE = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads")
_SIZE_LIMIT = 1 << 31  # any one dimension (hidden size, vocabulary, intermediate size, positions, ...)
_SIZE_FIELD = re.compile(r"^(num|n)_|(_size|_dim|_heads|_layers|_experts|_embeddings|_positions|_tok)$|^vocab")


def validate_config(config: Any, where: str) -> None:
    """Every field that sets a tensor size or a count is a non-negative integer within what real models use, and
    the core ones (layers, hidden size, vocabulary, heads) are positive: one clear line otherwise (BadInput)."""
    for text in _text_configs(config):
        for name, value in sorted(vars(text).items()):
            if name.startswith("_") or not _SIZE_FIELD.search(name) or value is None or isinstance(value, dict):
                continue
            for item in value if isinstance(value, list | tuple) else [value]:
                switch = isinstance(item, bool) and name not in _CORE  # e.g. tie_word_embeddings
                if isinstance(item, str | dict | list) or item is None or switch:
                    continue  # names of layer types, nested settings, switches: not sizes
                if isinstance(item, bool) or not isinstance(item, int):
                    raise BadInput(f"{where}: {name} is {item!r}; it must be a whole number")
                limit = _COUNT_LIMITS.get(name, _SIZE_LIMIT)
                if item < 0 or item > limit:
                    raise BadInput(f"{where}: {name} is {item}; it must be between 0 and {limit:,}")
        for name in _CORE:
            value = getattr(text, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise BadInput(f"{where}: {name} is {value}; it must be a positive number")


def _text_configs(config: Any) -> list[Any]:
    """The config and the text config inside a composite one (Gemma-3, Llama-4: `text_config`)."""
    found = [config]
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # more than one text config: check every sub-config
        text = None
        found += [getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None)]
    if text is not None and text is not config:
        found.append(text)
    return found


def max_positions(config: Any) -> int | None:
    """The positions the model's text config allows (max_position_embeddings), None if it names none: a property
    of the config, the same at every dtype, so it needs no build."""
    return getattr(_text_configs(config)[-1], "max_position_embeddings", None)


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
    config: Any,
    dtype: str,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    fake: bool = False,
) -> Any:
    """AutoModelForCausalLM on the meta device, weights tied. `attn_implementation` None lets transformers choose
    (SDPA where the model supports it); the choice is in `model.config._attn_implementation`. `fake`: as fake CPU
    tensors instead (torch's FakeTensorMode: no memory either), for transformers whose forward cannot run on meta.

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
    # include_buffers: every tensor on meta from the start (a buffer such as GPT-2's n_positions^2 causal mask, or
    # experts created with torch.empty before they become parameters, would otherwise take real memory first).
    with (
        _fake_mode() if fake else init_empty_weights(include_buffers=True),
        no_init_weights(),
        warnings.catch_warnings(),
        contextlib.redirect_stderr(quiet),
    ):
        warnings.simplefilter("ignore")
        try:
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code, **{dtype_kwarg(): torch_dtype}, **extra
            )
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
            raise BadInput(f"config.json: transformers cannot build a causal LM from it ({_first_line(exc)})") from None
    model.tie_weights()
    model.eval()
    return model


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def two_layer_copy(
    config: Any, model: Any, layers: list[str], dtype: str, attn_implementation: str | None, fake: bool = False
) -> Any:
    """The same model with two decoder layers, to measure quickly, when its layers are all alike: the same
    classes, tensors and layer type (config.layer_types). ValueError when they are not (measure the whole model)."""
    modules = dict(model.named_modules())
    signatures = {_layer_signature(modules[name]) for name in layers}
    text = _text_configs(config)[-1]
    types = getattr(text, "layer_types", None)
    if len(signatures) != 1 or (isinstance(types, list) and len(set(map(str, types))) > 1) or len(layers) < 3:
        raise ValueError("the decoder layers differ")
    small = copy.deepcopy(config)
    small_text = _text_configs(small)[-1]
    count = len(layers)
    for name, value in list(vars(small_text).items()):
        if isinstance(value, list) and len(value) == count:
            if len({repr(v) for v in value}) > 1:
                raise ValueError(f"config.{name} differs from layer to layer")
            setattr(small_text, name, value[:2])
    small_text.num_hidden_layers = 2
    return build_meta_model(small, dtype, attn_implementation=attn_implementation, fake=fake)


def _layer_signature(module: Any) -> tuple[Any, ...]:
    return (
        tuple(type(m).__name__ for m in module.modules()),
        tuple((n, tuple(t.shape), str(t.dtype)) for n, t in [*module.named_parameters(), *module.named_buffers()]),
    )


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


def quantizable_linears(config: Any, dtype: str, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """The weights transformers' bitsandbytes integration replaces, with their (out, in) sizes: its quantizer's own
    replace logic and skip list (the output embeddings, tied weights, `_keep_in_fp32_modules`, exactly `nn.Linear`
    and Conv1D) run on a meta copy of the model. The same set for 8-bit and 4-bit."""
    import torch
    from accelerate import init_empty_weights
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    model = build_meta_model(copy.deepcopy(config), dtype, trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True), pre_quantized=False)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    with init_empty_weights(include_buffers=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer.preprocess_model(
            model=model, device_map={"": 0}, keep_in_fp32_modules=keep, dtype=getattr(torch, dtype)
        )
    return {
        f"{name}.weight": (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if type(module).__module__.startswith("bitsandbytes")
        and hasattr(module, "out_features")
        and hasattr(module, "in_features")
    }


def _tensor_infos(prefix: str, obj: Any, seen: set[int], loaded_bytes: Any) -> list[TensorInfo]:
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
                dtype_bytes=loaded_bytes(name, tensor, is_buffer),
                is_buffer=is_buffer,
            )
        )
    return infos


def layer_classes(model: Any) -> tuple[str, ...]:
    """The module classes accelerate must not split: the model's `_no_split_modules`, or else the class of the
    longest ModuleList's items (its decoder layers), so that a model that names none is still placed, and
    measured, layer by layer."""
    import torch

    declared = tuple(getattr(model, "_no_split_modules", None) or ())
    if declared:
        return declared
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        return ()
    longest = max(lists, key=len)
    return (type(longest[0]).__name__,)


def read_layout(model: Any, config: Any, dtype: str) -> ModelLayout:
    """Describe `model` (built by build_meta_model at `dtype`) block by block."""
    from accelerate.utils import find_tied_parameters

    from oneke_plan.measure.compat import loaded_dtype_bytes

    no_split = layer_classes(model)
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), None)
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model that does not say: its embeddings count as read
        embeddings = None
    input_name = next((n for n, m in model.named_modules() if m is embeddings), None) if embeddings else None
    tied_groups = find_tied_parameters(model)
    loaded_bytes = loaded_dtype_bytes(model, dtype)

    seen: set[int] = set()
    blocks: list[BlockInfo] = []
    owner_of: dict[str, str] = {}
    for name, obj in _split_blocks(model, no_split):
        tensors = tuple(_tensor_infos(name, obj, seen, loaded_bytes))
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
    text = _text_configs(config)[-1]
    weight = getattr(output, "weight", None)
    try:
        attention: AttentionShape | None = attention_shape(text)
    except BadInput:
        attention = None
    return ModelLayout(
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        dtype=dtype,
        parameter_count=parameter_count,
        num_layers=num_layers,
        max_position_embeddings=max_positions(config),
        vocab_size=int(weight.shape[0]) if weight is not None and weight.dim() == 2 else 0,
        attention=attention,
        no_split_module_classes=no_split,
        blocks=tuple(blocks),
        input_embeddings=input_name if any(b.name == input_name for b in blocks) else None,
        output_embeddings_numel=int(weight.numel()) if weight is not None else 0,
    )


def device_map_problem(model: Any, device_map: dict[str, Any]) -> str | None:
    """What keeps `device_map` from placing every tensor of `model` (a meta-device model will do), as one phrase, or
    None: a key that names no module or parameter, a parameter or buffer no key covers (non-persistent buffers
    included: dispatch needs a device for them too), tied weights on different devices (they are one tensor).

    Keys are read as accelerate reads them, the longest matching prefix winning (fit.device_owner). The planner asks
    it of the map it wrote, the loader of the map a profile brings."""
    from accelerate.utils import find_tied_parameters

    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for key in device_map:
        if key != "" and key not in names:
            return f"{key!r} is not a module of {type(model).__name__}"
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        try:
            device_owner(name, device_map)
        except KeyError:
            return f"no entry covers {name!r}"
    for group in find_tied_parameters(model):
        devices = {device_owner(name, device_map) for name in group}
        if len(devices) > 1:
            return f"tied weights {', '.join(group)} are split across devices {sorted(map(str, devices))}"
    return None
