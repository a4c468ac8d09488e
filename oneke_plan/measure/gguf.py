"""A GGUF file as a model source, read and loaded the way transformers' own GGUF support does it.

transformers builds the config (`AutoConfig.from_pretrained(folder, gguf_file=NAME)`), the tokenizer and its chat
template from the file's metadata, and from_pretrained dequantizes the weights to the dtype it is given. Everything
here asks transformers (and the `gguf` package it reads files with): its config reader, its list of architectures,
its `dtype="auto"` rule, its GGUF-to-transformers tensor-name map. Nothing of its mapping logic is copied.

Refused in one line (BadInput): a file without the GGUF magic, a truncated or damaged one, an architecture
transformers cannot load (naming those it can), and an environment whose gguf package cannot read any file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.measure.checkpoint import Mismatch
from oneke_plan.measure.compat import quiet

GGUF_MAGIC = b"GGUF"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
_NOT_ARCHITECTURES = {"general", "tokenizer"}  # sections of transformers' GGUF mapping that are not architectures

# AutoConfig parses the whole metadata (the vocabulary too: seconds): one config per file and version of it
_CONFIGS: dict[tuple[str, int, int], Any] = {}


def _versions() -> str:
    import numpy
    import transformers

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # noqa: BLE001 - not installed
        gguf_version = "not installed"
    return f"transformers {transformers.__version__}, gguf {gguf_version}, numpy {numpy.__version__}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers loads: its GGUF mapping's (modeling_gguf_pytorch_utils), and on
    5.x those its GGUF quantizer converts itself (integrations.gguf)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:
        pass
    else:
        names |= set(GGUF_ARCHS)
    return sorted(names - _NOT_ARCHITECTURES)


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


_READERS: dict[tuple[str, int, int], Any] = {}  # one GGUFReader (a memory map and the parsed metadata) per file


def _reader(path: Path) -> Any:
    """gguf's GGUFReader of the file (what transformers reads it with), after the magic bytes; BadInput for a file
    that is not a GGUF or is damaged, or for a gguf package that cannot read files here."""
    try:
        key = _file_key(path)
    except OSError as exc:
        raise BadInput(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if key not in _READERS:
        _READERS.clear()  # keep one: each maps its whole file
        _READERS[key] = _read(path)
    return _READERS[key]


def _read(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise BadInput(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if magic != GGUF_MAGIC:
        raise BadInput(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise BadInput(f"{path}: reading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        with quiet():
            reader = GGUFReader(str(path))
    except (AttributeError, ImportError) as exc:  # the library, not the file (a gguf calling numpy APIs now gone)
        raise BadInput(
            f"{path}: the installed gguf package cannot read GGUF files here ({_first_line(exc)}; {_versions()}): "
            "upgrade gguf (pip install -U gguf)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - struct, value and index errors from a short or damaged file
        raise BadInput(
            f"{path}: not a complete GGUF file ({_first_line(exc)}); it is truncated or corrupt: copy it again"
        ) from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise BadInput(
            f"{path}: not a complete GGUF file ({size:,} bytes, its tensors end at byte {end:,}); it is truncated: "
            "copy it again"
        )
    return reader


def _field(reader: Any, key: str) -> Any:
    """A metadata value as transformers reads it (its read_field), or None."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    values = read_field(reader, key) if key in reader.fields else []
    return values[0] if values else None


GGUF_NAME_MAP_SINCE = "4.47"


def _require_name_map(path: Path) -> None:
    """GGUF files need a transformers with its GGUF-to-model tensor-name map (get_gguf_hf_weights_map, 4.47): the
    key check before loading is made with it. 4.46 has none, and it loads a GGUF with tied embeddings (no
    output.weight, e.g. SmolLM2) into an untied model whose lm_head keeps its random initialization."""
    try:
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map  # noqa: F401
    except ImportError:
        raise BadInput(
            f"{path}: GGUF files need transformers {GGUF_NAME_MAP_SINCE} or later, which maps a GGUF's tensors to "
            f"the model's by name (this is transformers {_transformers_version()}, whose GGUF loading leaves tied "
            "output layers at random values); upgrade transformers, or convert the GGUF to a safetensors checkpoint"
        ) from None


def _auto_config(path: Path) -> Any:
    """transformers' config for the GGUF (AutoConfig, as from_pretrained builds it), read once per file."""
    from transformers import AutoConfig

    key = _file_key(path)
    if key not in _CONFIGS:
        with quiet():
            _CONFIGS[key] = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return copy.deepcopy(_CONFIGS[key])


def read_gguf(path: Path) -> tuple[dict[str, Any], bool]:
    """(transformers' config for the GGUF as a plain dict, whether the file carries a chat template): the
    model_source.GgufReader the api layer passes to resolve_model. BadInput for a file that is not a complete GGUF,
    for an architecture transformers cannot load, and for a transformers without the GGUF name map."""
    reader = _reader(path)
    _require_name_map(path)
    architecture = _field(reader, "general.architecture")
    supported = supported_architectures()
    try:
        config = _auto_config(path)
    except Exception as exc:  # noqa: BLE001 - whatever transformers' reader raises is about this file
        if architecture not in supported:
            raise BadInput(
                f"{path}: a GGUF of architecture {architecture!r}, which transformers {_transformers_version()} "
                f"cannot load; it loads GGUF files of: {', '.join(supported)}"
            ) from None
        raise BadInput(f"{path}: transformers cannot read this GGUF's config ({_first_line(exc)})") from None
    data = json.loads(json.dumps(config.to_dict(), default=str))
    return data, bool(_field(reader, CHAT_TEMPLATE_KEY))


def load_gguf_config(path: Path) -> Any:
    """The transformers config object for the GGUF (measure.layout.load_config's route for a GGUF source)."""
    try:
        return _auto_config(path)
    except Exception as exc:  # noqa: BLE001 - resolve_model read it already; only a file changed since lands here
        raise BadInput(f"{path}: transformers cannot read this GGUF's config ({_first_line(exc)})") from None


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def auto_dtype(path: Path, config_dtype: str | None) -> str:
    """The dtype from_pretrained(gguf_file=..., dtype="auto") loads: the config's if it names one, else, on
    transformers with a GGUF quantizer (5.x), what that quantizer's update_dtype settles on (the file's own float
    type for a plain-float file of an architecture it converts itself, else torch's default, float32); before it,
    the dtype of the dequantized tensors (gguf dequantizes to float32)."""
    import torch

    try:
        from transformers import GgufConfig
        from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    except ImportError:
        return config_dtype or "float32"
    quantizer = GgufHfQuantizer(GgufConfig(gguf_file=str(path), dequantize=True))
    with quiet():
        quantizer.read_header(str(path))
        dtype = quantizer.update_dtype(getattr(torch, config_dtype) if config_dtype else None)
    return str(dtype).removeprefix("torch.")


def load_kwargs(path: Path) -> dict[str, Any]:
    """from_pretrained's arguments for the GGUF beside the folder: the file's name, and where transformers has a
    GGUF quantizer (5.x), its config asking to dequantize every weight (else it keeps weights packed where a
    kernel is found, which the plan, made for dequantized weights, does not describe)."""
    kwargs: dict[str, Any] = {"gguf_file": path.name}
    try:
        from transformers import GgufConfig
    except ImportError:
        return kwargs
    kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def tensor_names(path: Path) -> list[str]:
    """The GGUF's tensor names, as stored (its tensor table; no data read)."""
    return [str(t.name) for t in _reader(path).tensors]


def gguf_weight_map(model: Any, path: Path) -> dict[str, str] | None:
    """GGUF tensor name -> the model's parameter name, by transformers' own map (get_gguf_hf_weights_map with the
    architecture's tensor processor, as load_gguf_checkpoint builds it for the model it loads into). None where
    this transformers has no such map (4.46), or converts the architecture by its GGUF quantizer's own
    rules (5.x: integrations.gguf), which are checked by the load itself."""
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )
    except ImportError:
        return None
    reader = _reader(path)
    architecture = _field(reader, "general.architecture")
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported

        if is_gguf_arch_supported(architecture):
            return None
    except ImportError:
        pass
    with quiet():
        # the processor's config: what the map reads of it (names) is the same in AutoConfig's dict of the file
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=load_gguf_config(path).to_dict())
        return dict(get_gguf_hf_weights_map(model, processor))


def gguf_key_mismatch(model: Any, path: Path) -> Mismatch | None:
    """checkpoint.key_mismatch for a GGUF: its tensor names through transformers' GGUF-to-transformers map for the
    meta model (tied weights need one name of their group; names the model says to ignore are ignored).

    transformers skips GGUF tensors its map does not name (e.g. LLaMA-3's rope_freqs) and starts a parameter no
    tensor fills from its initializer, so what matters is the model's side: `missing`. A tensor processor may
    rename unmapped tensors as it dequantizes them (MoE experts): when the file has such tensors and something is
    missing, that is decided after the load (loader: transformers' missing keys); None then, and where
    gguf_weight_map is None."""
    import re

    from accelerate.utils import find_tied_parameters

    mapping = gguf_weight_map(model, path)
    if mapping is None:
        return None
    names = tensor_names(path)
    loaded = {mapping[name] for name in names if name in mapping}
    unmapped = sorted(name for name in names if name not in mapping)
    state = model.state_dict()
    tied_extra = {n for group in find_tied_parameters(model) for n in group if any(o in loaded for o in group)}
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = sorted(k for k in set(state) - loaded if k not in tied_extra and not any(p.search(k) for p in ignore))
    if missing and unmapped:
        return None
    return Mismatch(missing, [], [])
