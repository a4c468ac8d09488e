"""Load a model as a profile says: check the tokenizer, the checkpoint and the device_map, then meta init,
tie_weights, load and dispatch; then check it computes finite numbers.

The order matters and is the fix for the published multi-GPU snippet: the model is built as
AutoModelForCausalLM (whose parameter names match a causal-LM checkpoint), tied, and its names are compared with
the checkpoint's *before* anything is loaded, so dispatch never meets a parameter still on the meta device.

Whether the machine matches the profile is machine.py; what the loaded weights take per device, loaded_weights.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput, DoesNotFit
from oneke_plan.core.sizes import format_bytes
from oneke_plan.io import jsonfile
from oneke_plan.io.files import os_error
from oneke_plan.load.machine import check_gpus_present
from oneke_plan.load.tokenizer_files import check_sentencepiece_model, check_tokenizer_files, check_tokenizer_size
from oneke_plan.measure.adapter import Adapter, check_base, load_onto
from oneke_plan.measure.checkpoint import Checkpoint, explain_mismatch, key_mismatch, read_checkpoint
from oneke_plan.measure.compat import (
    TRANSFORMERS_BNB_CPU,
    bnb_quantizes_on_cpu,
    dtype_kwarg,
    offload_writes_weights,
    quiet,
    tokenizer_libraries,
)
from oneke_plan.measure.gguf import gguf_key_mismatch, load_kwargs
from oneke_plan.measure.layout import device_map_problem, load_config
from oneke_plan.plan.fit import device_owner, quantized_on_cpu, stays_quantized
from oneke_plan.plan.inventory import Gpu, detect_gpus
from oneke_plan.plan.model_source import ModelSource
from oneke_plan.plan.profile import Profile

# -- before the weights: everything that can be checked cheaply -----------------------------------------------------
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")
"""The tokenizer files transformers parses as JSON: read first with our bounded reader, so that a truncated or
hostile one is refused in one line naming it (transformers would raise from deep inside, or recurse away)."""


def check_before_load(profile: Profile, source: ModelSource, trust_remote_code: bool = False) -> Any:
    """Everything about the run that can be checked without reading weights, in one line each: the device_map
    can run, the offload folder is usable, the tokenizer loads. Returns the tokenizer.

    oneke-run calls this before load_model, whose own checks (checkpoint files, tensor names) come next, so that a
    problem found in seconds never waits behind a load of minutes.
    """
    check_device_map_runs(profile)
    if profile.offload_dir:
        check_offload_dir(profile.offload_dir)
    return load_tokenizer(source, trust_remote_code)


def check_device_map_runs(profile: Profile) -> None:
    """Refuse a (hand-edited) device_map that accelerate cannot run: a 16-bit model with every module on disk
    (accelerate computes on the device of a module that is not offloaded, and here there is none)."""
    devices = set(profile.device_map.values())
    if devices == {"disk"} and profile.quantization.mode == "none":
        raise BadInput(
            "profile device_map: every module is on disk, so nothing is left to compute on (accelerate runs "
            "offloaded modules on the CPU or a GPU that holds other modules); put at least one module, e.g. "
            "lm_head, on 'cpu' or a GPU, or re-create the profile with oneke-plan"
        )


def check_offload_dir(folder: str) -> None:
    """The folder disk-offloaded weights are written to is a folder (or can become one) where files can be
    created: probed with a temporary file, since permissions alone say nothing for root or a read-only mount."""
    path = Path(folder)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(
            f"offload folder {folder}: {existing} is a file, not a folder; pass --offload-dir with another folder"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".oneke-run-probe.", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise os_error(
            existing, "hold the offloaded weights (no file can be created there)", exc, "pass another --offload-dir"
        ) from None


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, loaded before any weight: its files regular files, its JSON files read with the
    bounded reader, code it ships (an `auto_map` entry) refused unless trust_remote_code, a tokenizer.model it is
    built from a complete SentencePiece model of the config's vocabulary (load.tokenizer_files), then AutoTokenizer,
    whose failures (missing or damaged files) become one line naming the folder, and whose tokenizer must cover the
    model's embedding."""
    from transformers import AutoTokenizer

    directory = source.directory
    if directory is None:
        raise BadInput(f"{source.name}: a built-in config has no tokenizer; pass --model DIR with the checkpoint")
    if source.gguf_file is not None:
        return _load_gguf_tokenizer(source.gguf_file)
    damaged = "the tokenizer files are damaged: copy them again from the model's release"
    check_tokenizer_files(directory)  # regular files all: a FIFO would block transformers for ever
    found: dict[str, Any] = {"tokenizer_config.json": {}}
    for name in TOKENIZER_JSON_FILES:
        if (directory / name).is_file():
            found[name] = jsonfile.read_json_file(directory / name, damaged)
    tokenizer_config = found["tokenizer_config.json"]
    if not isinstance(tokenizer_config, dict):
        raise BadInput(f"{directory / 'tokenizer_config.json'}: must hold a JSON object; {damaged}")
    model_map = source.config.get("auto_map")
    shipped_code = (
        bool(tokenizer_config.get("auto_map")) or isinstance(model_map, dict) and "AutoTokenizer" in model_map
    )
    if not trust_remote_code:
        _refuse_tokenizer_code(directory / "tokenizer_config.json", tokenizer_config.get("auto_map"))
        if isinstance(model_map, dict) and "AutoTokenizer" in model_map:
            _refuse_tokenizer_code(directory / "config.json", {"AutoTokenizer": model_map["AutoTokenizer"]})
    if not shipped_code:  # a model's own tokenizer code reads its tokenizer.model as it likes (tiktoken, say)
        check_sentencepiece_model(directory, source.config, tokenizer_config, found.get("added_tokens.json"))
    _check_tokenizer_libraries(directory, tokenizer_config)
    # 4.x picks the slow or fast class from this argument only, not from the config; OneKE's config asks for the
    # slow SentencePiece LlamaTokenizer (`use_fast: false`), the route its authors load it by. 5.x has one class.
    use_fast = tokenizer_config.get("use_fast") is not False
    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(
                str(directory), trust_remote_code=trust_remote_code, use_fast=use_fast
            )
            ids = tokenizer("[INST] test [/INST]", add_special_tokens=True)["input_ids"]
    except Exception as exc:  # transformers, tokenizers and sentencepiece each raise their own kinds
        first = next((line.strip().rstrip(":") for line in str(exc).splitlines() if line.strip()), "")
        if isinstance(exc, ImportError) or "pip install" in str(exc):
            raise BadInput(
                f"{directory}: the tokenizer needs a Python package that is not installed ({type(exc).__name__}: "
                f"{first}); install it, then run again"
            ) from None
        raise BadInput(
            f"{directory}: the tokenizer cannot be loaded ({type(exc).__name__}: {first}); its files (tokenizer.json "
            "or tokenizer.model, and tokenizer_config.json) are missing or damaged: copy them again from the model's "
            "release"
        ) from None
    if not ids:
        raise BadInput(f"{directory}: the tokenizer turns text into no tokens; {damaged}")
    check_tokenizer_size(directory, source.config, tokenizer)
    return tokenizer


def _load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer (and its chat template) transformers builds from a GGUF's metadata; one line if it cannot."""
    from transformers import AutoTokenizer

    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            ids = tokenizer("[INST] test [/INST]", add_special_tokens=True)["input_ids"]
    except Exception as exc:  # transformers' GGUF tokenizer converters raise their own kinds
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:200]
        raise BadInput(
            f"{path}: transformers cannot build the tokenizer from this GGUF's metadata ({type(exc).__name__}: {first})"
        ) from None
    if not ids:
        raise BadInput(f"{path}: the GGUF's tokenizer turns text into no tokens; the file is damaged")
    return tokenizer


def _check_tokenizer_libraries(directory: Path, tokenizer_config: dict[str, Any]) -> None:
    """A tokenizer shipped as SentencePiece's tokenizer.model alone (OneKE's release) loads only with the packages
    compat.tokenizer_libraries names: refuse in one line naming them, before transformers fails in a way that
    reads like damaged files (5.x, lacking them, tries tiktoken and says that is required)."""
    if (directory / "tokenizer.json").is_file() or not (directory / "tokenizer.model").is_file():
        return
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    installed = {"sentencepiece": is_sentencepiece_available(), "protobuf": is_protobuf_available()}
    missing = [name for name in tokenizer_libraries(tokenizer_config) if not installed[name]]
    if missing:
        raise BadInput(
            f"{directory}: the tokenizer is SentencePiece's tokenizer.model (no tokenizer.json), and loading it needs "
            f"{' and '.join(missing)}, not installed here: pip install {' '.join(missing)} (oneke-plan's own "
            "install brings them); the files themselves are fine"
        )


def _refuse_tokenizer_code(path: Path, auto_map: Any) -> None:
    if auto_map:
        raise BadInput(
            f"{path}: auto_map names tokenizer code shipped with the model ({json.dumps(auto_map)[:120]}); oneke-run "
            "runs no code from a model folder unless you pass --trust-remote-code (OneKE does not need it)"
        )


# -- loading -------------------------------------------------------------------------------------------------------
def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def build_empty_model(
    source: ModelSource, dtype: str, trust_remote_code: bool = False, attn_implementation: str | None = None
) -> Any:
    """AutoModelForCausalLM on meta, tied: the model the checkpoint is loaded into."""
    from oneke_plan.measure.layout import build_meta_model

    return build_meta_model(load_config(source, trust_remote_code), dtype, trust_remote_code, attn_implementation)


def _quantization_config(profile: Profile) -> Any:
    """The bitsandbytes config for the profile's quantization.

    `llm_int8_enable_fp32_cpu_offload` keeps every module mapped to cpu or disk *unquantized* (transformers adds
    them to modules_to_not_convert). It is needed only when GPU modules are mixed with offloaded ones (transformers
    refuses that mix without it); on a CPU-only map it must stay off, or nothing would be quantized at all
    (bitsandbytes quantizes on CPU).
    """
    from transformers import BitsAndBytesConfig

    quant = profile.quantization
    # the flag is wanted exactly where the planner charged offloaded blocks unquantized: one rule, fit's
    offload_unquantized = any(not stays_quantized(d, profile.device_map) for d in set(profile.device_map.values()))
    if quant.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload_unquantized)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(profile.dtype),
        llm_int8_enable_fp32_cpu_offload=offload_unquantized,
    )


def load_model(
    profile: Profile,
    source: ModelSource,
    trust_remote_code: bool = False,
    checkpoint: Checkpoint | None = None,
    adapter: Adapter | None = None,
    gpus: tuple[Gpu, ...] | None = None,
    checked: Callable[[], None] = lambda: None,
) -> Any:
    """The model, loaded into exactly the profile's device_map, ready for generate. `checkpoint`: read_checkpoint of
    the source's directory, and `gpus`: the GPUs detected here, when the caller has them already (else they are read
    here). `checked` is called once every check has passed, as the weights start to load.

    First everything that can be checked without loading: the checkpoint's names and shapes against the model
    built as AutoModelForCausalLM on the meta device and tied (renamed and fused as transformers will load them),
    the device_map against its modules, the GPUs it names, the room for what disk offload writes. Then
    transformers' own from_pretrained with the profile's device_map, dtype and attention implementation (and a
    bitsandbytes config for 8/4-bit, which quantizes each Linear as it is loaded; bitsandbytes runs on the CPU
    too): it renames and fuses weights, ties them, offloads to CPU and disk, and dispatches. With a LoRA
    `adapter`, its layers are checked against the model's before anything is loaded (DoesNotFit for another base's),
    and peft applies it after the load: merged into the weights (profile adapter.on_load "merged") or not.
    """
    if source.directory is None:
        raise BadInput(f"{source.name}: a built-in config has no weights; pass --model DIR with the checkpoint")
    gguf = source.gguf_file
    if gguf is None:
        checkpoint = checkpoint or read_checkpoint(source.directory)
    model = build_empty_model(source, profile.dtype, trust_remote_code, profile.attn_implementation)
    if gguf is not None:  # transformers' GGUF name map (or, where it has none, its missing keys after the load)
        mismatch = gguf_key_mismatch(model, gguf)
        if mismatch:
            raise BadInput(explain_mismatch(mismatch, gguf))
    else:
        assert checkpoint is not None
        mismatch = key_mismatch(model, checkpoint)
        if mismatch:
            raise BadInput(explain_mismatch(mismatch, checkpoint.path))
    if adapter is not None:
        check_base(adapter, model)
    problem = device_map_problem(model, profile.device_map)
    if problem:
        raise BadInput(f"profile device_map: {problem}; re-create the profile with oneke-plan for this model")
    check_gpus_present(profile, source, detect_gpus() if gpus is None else gpus)
    if gguf is not None and "disk" in profile.device_map.values():
        raise BadInput(
            f"profile device_map: {gguf} is a GGUF file, and transformers does not offload a GGUF's weights to disk; "
            "re-plan without --offload-dir"
        )
    if (
        checkpoint is not None
        and profile.offload_dir
        and "disk" in profile.device_map.values()
        and offload_writes_weights(checkpoint.pickled)
    ):
        _check_offload_space(model, profile, source.directory)
    del model
    checked()
    device_map = dict(profile.device_map)
    offload = profile.offload_dir
    try:
        loaded = _load_weights(profile, source, device_map, offload, trust_remote_code)
        if adapter is None:
            return loaded
        with quiet():
            return load_onto(loaded, adapter, merge=profile.adapter is not None and profile.adapter.on_load == "merged")
    except OSError as exc:  # a full or read-only offload folder, an unreadable shard: the path, not a traceback
        weights = gguf if gguf is not None else checkpoint.path if checkpoint is not None else source.directory
        where = exc.filename or (offload if offload and "disk" in device_map.values() else weights)
        raise os_error(where, "be used while loading the weights", exc, "free space or fix permissions there") from None


def _load_weights(
    profile: Profile, source: ModelSource, device_map: dict[str, Any], offload: str | None, trust_remote_code: bool
) -> Any:
    """load_model's second half: transformers' from_pretrained with the profile's map, dtype and attention."""
    if offload:
        Path(offload).mkdir(parents=True, exist_ok=True)
    quantized = profile.quantization.mode != "none"
    if quantized and not any(isinstance(d, int) for d in device_map.values()) and not bnb_quantizes_on_cpu():
        import transformers

        raise BadInput(
            f"the profile quantizes ({profile.quantization.mode}) a model that sits on the CPU alone, which "
            f"transformers {transformers.__version__} cannot do with bitsandbytes (it needs {TRANSFORMERS_BNB_CPU} "
            "or later); upgrade transformers, or re-plan without --quantize"
        )
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": _quantization_config(profile)} if quantized else {}
    if source.gguf_file is not None:
        if quantized:  # the planner refuses it: a hand-edited profile
            raise BadInput(
                f"{source.gguf_file}: the profile quantizes ({profile.quantization.mode}), and transformers "
                "cannot quantize a GGUF with bitsandbytes; re-plan without --quantize"
            )
        extra = {**load_kwargs(source.gguf_file), "output_loading_info": True}
    with quiet():
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(source.directory),
            device_map=device_map,
            **{dtype_kwarg(): _torch_dtype(profile.dtype)},
            attn_implementation=profile.attn_implementation,
            offload_folder=offload,
            trust_remote_code=trust_remote_code,
            **extra,
        )
    if source.gguf_file is not None:
        loaded, info = loaded  # output_loading_info=True: (model, loading info)
        _refuse_gguf_missing(loaded, info, source.gguf_file)
    _refuse_meta(loaded, device_map)
    loaded.eval()
    if quantized and quantized_on_cpu("cpu", device_map):
        release_freed_heap()
    return loaded


def release_freed_heap() -> None:
    """glibc's malloc_trim(0): hand back to the system the heap that bitsandbytes' quantizing on the CPU freed (the
    float16 copy of each weight and its temporaries, which glibc otherwise keeps: 216 MiB of SmolLM2-135M's 8-bit
    load, docs/memory-model.md). Only where the C library is glibc (Linux); nothing elsewhere."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # no libc to load, or one without malloc_trim
        return


def input_device(model: Any) -> Any:
    """Where input ids must be: the embeddings' device (accelerate's hooks move them on from there)."""
    import torch

    weight = model.get_input_embeddings().weight
    if weight.device.type != "meta":
        return weight.device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


SANITY_PROMPT = "[INST] Extract the entities: OneKE was released in 2024. [/INST]"


def check_finite_outputs(model: Any, tokenizer: Any, where: str) -> None:
    """One forward pass of a short prompt right after loading: every logit must be a finite number.

    Why stop the run (BadInput, exit 2) rather than warn: a model that computes NaN or inf from the start (weights
    that are NaN after a damaged download or a failed conversion, or a float16 run of weights that overflow in it)
    answers every prompt with nothing. A warning would scroll away while the run spends hours writing lines that
    look answered and score zero; one forward of a dozen tokens costs far less than the load that preceded it.
    """
    import torch

    ids = tokenizer(SANITY_PROMPT, add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=input_device(model))).logits
    finite = torch.isfinite(logits.float())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise BadInput(
            f"{where}: the loaded model computes NaN or inf ({bad:,} of {finite.numel():,} logits of a "
            f"{len(ids)}-token test prompt, in {str(logits.dtype).removeprefix('torch.')}): its weights hold NaN/inf "
            "values (a damaged or badly converted checkpoint: copy it again) or overflow in this dtype (re-plan with "
            "--dtype bfloat16 "
            "or float32); nothing was run"
        )


def _check_offload_space(model: Any, profile: Profile, directory: Path) -> None:
    """Refuse (DoesNotFit, exit 3) an offload folder without room for the weights mapped to disk: accelerate
    writes them through numpy memmaps, and a memmap on a full filesystem ends the process with SIGBUS, no message.

    The need is counted from the meta model at the larger of the profile's and the checkpoint's dtype (accelerate
    writes the checkpoint's), tied tensors once; room is the free space plus the .dat files an earlier offload
    left there (they are truncated and rewritten). Not --force-able: --force skips the machine check, not this.
    """
    from oneke_plan.measure.checkpoint import checkpoint_dtype
    from oneke_plan.plan.memory import DTYPE_BYTES

    folder = Path(str(profile.offload_dir))
    float_bytes = max(DTYPE_BYTES[profile.dtype], DTYPE_BYTES.get(checkpoint_dtype(directory) or "", 0))
    seen: set[int] = set()
    need = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or device_owner(name, profile.device_map) != "disk":
            continue
        seen.add(id(tensor))
        need += tensor.numel() * (float_bytes if tensor.is_floating_point() else tensor.element_size())
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    room = shutil.disk_usage(existing).free
    if folder.is_dir():
        room += sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".dat" and f.is_file())
    if room < need:
        raise DoesNotFit(
            f"offload folder {folder}: {format_bytes(room)} free, the weights the profile puts on disk need "
            f"{format_bytes(need)}; free space there or pass --offload-dir with a larger disk"
        )


def _refuse_gguf_missing(model: Any, info: dict[str, Any], path: Path) -> None:
    """After a GGUF load: a parameter no tensor of the file filled (transformers' missing keys; it would start from
    its initializer, and the model would answer nonsense) is refused, as a checkpoint's missing names are before."""
    from accelerate.utils import find_tied_parameters

    tied = {name for group in find_tied_parameters(model) for name in group}
    missing = sorted(k for k in info.get("missing_keys") or [] if k not in tied)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise BadInput(
            f"{path}: no tensor of this GGUF fills {len(missing)} of the model's tensors ({shown}); transformers "
            "would start them from random values, so nothing was run: the file is incomplete or of another model"
        )


def _refuse_meta(model: Any, device_map: dict[str, Any]) -> None:
    """A parameter left on meta with no offload hook behind it would crash inside generate: stop here instead."""
    for name, param in model.named_parameters():
        if param.device.type == "meta" and device_owner(name, device_map) not in ("cpu", "disk"):
            raise BadInput(f"{name} was not loaded (still on the meta device); the checkpoint does not cover it")
