"""The differences between the transformers versions we support (4.46 through 5.x), in one place."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from functools import cache
from typing import Any

LIBRARIES = ("transformers", "accelerate", "bitsandbytes", "gguf")


@contextlib.contextmanager
def quiet(names: tuple[str, ...] = LIBRARIES) -> Iterator[None]:
    """Silence library chatter while they load a model or read a file (progress bars, dtype cast notices, loggers
    below ERROR); their errors still raise."""
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def stay_offline() -> None:
    """No network from the libraries oneke-plan and oneke-run drive, unless the user set HF_HUB_OFFLINE themselves.

    Both read local files only, yet importing bitsandbytes >= 0.49 on a CPU with AVX512-BF16 asks the Hub for a
    4-bit kernel (kernels.get_kernel("kernels-community/...")): DNS lookups and a download of code at run time.
    huggingface_hub reads HF_HUB_OFFLINE into `constants` once, when imported, and kernels and huggingface_hub
    consult that constant on each call: so the variable (for what is imported later, subprocesses included) and
    the constant (where it was imported already) both. bitsandbytes then falls back to its own kernels.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        setattr(constants, "HF_HUB_OFFLINE", True)  # noqa: B010 - a module found at run time


@cache
def transformers_at_least(version: str) -> bool:
    """Whether the installed transformers is `version` or later (every version rule below asks this)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


@cache
def dtype_kwarg() -> str:
    """The from_pretrained/from_config keyword for the weights' dtype: `dtype` since 4.56, `torch_dtype` before."""

    return "dtype" if transformers_at_least("4.56") else "torch_dtype"


def no_init_weights() -> Any:
    """transformers' context manager that skips weight initialization (pointless on the meta device, and the
    slowest part of building a 70B model there): in transformers.initialization since 5.0, modeling_utils before."""
    import importlib

    try:
        module = importlib.import_module("transformers.initialization")
    except ImportError:
        module = importlib.import_module("transformers.modeling_utils")
    return module.no_init_weights()


def dtype_kw(dtype: Any) -> dict[str, Any]:
    """`{"dtype": dtype}` or `{"torch_dtype": dtype}`, whichever this transformers' from_pretrained takes."""
    return {dtype_kwarg(): dtype}


def tokenizer_libraries(tokenizer_config: dict[str, Any]) -> tuple[str, ...]:
    """The Python packages this transformers needs to load a tokenizer shipped as SentencePiece's tokenizer.model
    alone (no tokenizer.json), given its tokenizer_config.json.

    5.x always converts tokenizer.model into the tokenizers library's form, reading it through sentencepiece's
    protobuf schema. 4.x loads the slow tokenizer the config asks for (`use_fast: false`, OneKE's) with
    sentencepiece alone when `legacy` is true; the fast one, or `legacy: false`, needs protobuf too."""

    if transformers_at_least("5"):
        return ("sentencepiece", "protobuf")
    slow_legacy = tokenizer_config.get("use_fast") is False and tokenizer_config.get("legacy", True) is not False
    return ("sentencepiece",) if slow_legacy else ("sentencepiece", "protobuf")


TRANSFORMERS_BNB_CPU = "4.53"  # before it, transformers runs bitsandbytes on the CPU only with Intel's IPEX


@cache
def bnb_quantizes_on_cpu() -> bool:
    """Whether this transformers lets bitsandbytes quantize a model that sits on the CPU alone. Before 4.53 its
    bitsandbytes integration required Intel's IPEX for the CPU (and 4.46-4.50 crash in that check)."""

    return transformers_at_least(TRANSFORMERS_BNB_CPU)


def loaded_dtype_bytes(model: Any, dtype: str) -> Any:
    """A function (name, meta tensor, is_buffer) -> bytes per element once from_pretrained has loaded it at `dtype`
    (for a model built at `dtype`), by this transformers' rules:

    - parameters its `_keep_in_fp32_modules` names stay float32 (5.x: its `_get_dtype_plan`, with
      `_keep_in_fp32_modules_strict` for bf16 too; 4.x: only when loading fp16);
    - any other keeps the dtype the model's code builds it with at `dtype` (a parameter declared float32, such as
      Mamba's A_log or a router bias, stays float32: 5.x keeps the built dtype, 4.x's loading through accelerate's
      set_module_tensor_to_device casts to it);
    - buffers keep the dtype they are built with; non-float tensors their own.
    """
    import re

    import torch

    target = getattr(torch, dtype)
    newer = transformers_at_least("5.0")
    if newer and hasattr(model, "_get_dtype_plan"):
        plan = model._get_dtype_plan(target)
        pattern = re.compile("|".join(key.replace("*", ".*") for key in plan)) if plan else None
    else:
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) if target == torch.float16 else []
        pattern = re.compile("|".join(rf"(^|\.){re.escape(m)}(\.|$)" for m in keep)) if keep else None

    def loaded(name: str, tensor: Any, is_buffer: bool) -> int:
        if not is_buffer and tensor.is_floating_point() and pattern is not None and pattern.search(name):
            return 4
        return int(tensor.element_size())

    return loaded


def checkpoint_key_renamer(model: Any) -> Any:
    """A function checkpoint key -> (the model's key transformers loads it into, whether a converter fuses or splits
    it on the way): transformers 5's own conversion rules for the model (get_model_conversion_mapping and
    rename_source_key, e.g. per-expert weights fused into one tensor), with its base-model prefix handling. Before
    5.0 transformers renames nothing but that prefix."""
    import re

    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:

        def by_prefix(key: str) -> tuple[str, bool]:
            if key in state or prefix is None:
                return key, False
            if f"{prefix}.{key}" in state:
                return f"{prefix}.{key}", False
            stripped = re.sub(f"^{re.escape(prefix)}\\.", "", key, count=1)
            return (stripped if stripped in state else key), False

        return by_prefix

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]

    def rename(key: str) -> tuple[str, bool]:
        target, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if target not in state and key in state:  # as from_pretrained: the name was right, only a prefix may differ
            target, pattern = rename_source_key(key, [], [], prefix, state)
        return target, pattern is not None

    return rename


@cache
def measures_on_meta() -> bool:
    """Whether this transformers' models run their forward on the meta device. Before 5.0 rotary embeddings open
    `torch.autocast(device_type=x.device.type)`, which refuses "meta": their forward runs on fake CPU tensors
    (torch's FakeTensorMode, no memory either), about three times slower."""

    return transformers_at_least("5.0")


def offload_writes_weights(pickled: bool) -> bool:
    """Whether from_pretrained writes disk-offloaded weights into the offload folder: it reads them in place from a
    safetensors checkpoint instead (transformers 5 rewrites only tensors it converts on load)."""
    return pickled
