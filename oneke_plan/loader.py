"""Apply a profile: check the machine and the checkpoint, then meta init, tie_weights, load and dispatch.

The order matters and is the fix for the published multi-GPU snippet: the model is built as
AutoModelForCausalLM (whose parameter names match a causal-LM checkpoint), tied, and its names are compared with
the checkpoint's *before* anything is loaded, so dispatch never meets a parameter still on the meta device.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from oneke_plan import jsonfile
from oneke_plan.checkpoint import explain_mismatch, key_mismatch, read_checkpoint
from oneke_plan.compat import TRANSFORMERS_BNB_CPU, bnb_quantizes_on_cpu, dtype_kwarg, offload_writes_weights
from oneke_plan.errors import BadInput, DoesNotFit
from oneke_plan.files import os_error
from oneke_plan.inventory import Gpu, detect_gpus, detected_cpu_bytes, runs_bf16
from oneke_plan.layout import load_config
from oneke_plan.model_source import ModelSource
from oneke_plan.profile import Profile
from oneke_plan.sizes import format_bytes


# -- the machine ---------------------------------------------------------------------------------------------------
def replan_command(profile: Profile, model: str, gpus: tuple[Gpu, ...]) -> str:
    """The oneke-plan command that plans the same model and workload for the GPUs found here."""
    w = profile.workload
    # Whole MiB, rounded down: a plan for slightly more than is free would be refused again.
    parts = ["oneke-plan", shlex.quote(model), *(f"--gpu {g.free_bytes // 2**20}MiB" for g in gpus)]
    parts += [
        f"--max-input-tokens {w['max_input_tokens']}",
        f"--max-new-tokens {w['max_new_tokens']}",
        f"--batch-size {w['batch_size']}",
    ]
    quant = profile.quantization
    if quant.get("mode", "none") != "none":
        parts.append(f"--quantize {quant['mode']}")
        if quant["mode"] == "4bit" and quant.get("quant_type", "nf4") != "nf4":
            parts.append(f"--quant-type {quant['quant_type']}")
        if quant["mode"] == "4bit" and quant.get("double_quant", True) is False:
            parts.append("--no-double-quant")
    if profile.dtype == "bfloat16" and any(not runs_bf16(g) for g in gpus):
        parts.append("--dtype float16")
    elif profile.dtype != "bfloat16":
        parts.append(f"--dtype {profile.dtype}")
    if profile.attn_implementation == "eager":
        parts.append("--eager-attention")
    cpu = next((d for d in profile.devices if d.id == "cpu"), None)
    if gpus and cpu is not None and cpu.usable_bytes:
        parts.append(f"--cpu-memory {cpu.usable_bytes // 2**20}MiB")
    if profile.offload_dir:
        parts.append(f"--offload-dir {shlex.quote(profile.offload_dir)}")
    return " ".join(parts) + " -o PROFILE.yaml"


def machine_problems(profile: Profile, source: ModelSource, gpus: tuple[Gpu, ...], cpu_bytes: int) -> list[str]:
    """Why this machine (or model) does not match the profile; empty when it does."""
    problems = []
    planned_for = profile.model.get("config_fingerprint")
    if planned_for and planned_for != source.fingerprint:
        problems.append(
            f"the model's config.json differs from the one the profile was planned for ({profile.model.get('source')})"
        )
    by_index = {g.index: g for g in gpus}
    for device in profile.devices:
        estimate = profile.estimate.get(device.id, {})
        # The reserve covers this process's own CUDA context and host libraries, which already exist when free
        # memory is read here, so free memory must cover the rest of the plan. Nominal sizes are not compared:
        # a "24 GiB" card reports a little less, and free memory is what decides.
        needed = int(estimate.get("total_bytes", 0)) - int(estimate.get("reserve_bytes", 0))
        if isinstance(device.id, int):
            gpu = by_index.get(device.id)
            if gpu is None:
                have = f"{len(gpus)} GPU(s)" if gpus else "no CUDA GPU"
                problems.append(f"the profile places modules on GPU {device.id}, but this machine has {have}")
            elif profile.dtype == "bfloat16" and not runs_bf16(gpu):
                cc = ".".join(map(str, gpu.compute_capability or ()))
                problems.append(
                    f"GPU {device.id} ({gpu.name}, compute capability {cc}) cannot run bfloat16, the profile's dtype; "
                    "re-plan (float16 there)"
                )
            elif gpu.free_bytes < needed:
                problems.append(
                    f"GPU {device.id} ({gpu.name}, {format_bytes(gpu.total_bytes)}) has {format_bytes(gpu.free_bytes)} "
                    f"free, the plan needs {format_bytes(needed)} besides the CUDA context (other processes using it?)"
                )
        elif device.id == "cpu" and cpu_bytes < needed:
            problems.append(
                f"the plan needs {format_bytes(needed)} of host memory, {format_bytes(cpu_bytes)} is available"
            )
        elif device.id == "disk" and profile.offload_dir:
            target = Path(profile.offload_dir)
            probe = target if target.exists() else target.parent
            if probe.exists() and shutil.disk_usage(probe).free < needed:
                problems.append(
                    f"{profile.offload_dir}: {format_bytes(shutil.disk_usage(probe).free)} free, "
                    f"disk offload needs {format_bytes(needed)}"
                )
    return problems


def check_machine(profile: Profile, source: ModelSource, force: bool = False) -> list[str]:
    """Refuse (DoesNotFit, exit 3) when the machine or model does not match; with force, return the problems."""
    gpus = detect_gpus()
    problems = machine_problems(profile, source, gpus, detected_cpu_bytes())
    if problems and not force:
        raise DoesNotFit(
            "this machine does not match the profile:\n  - "
            + "\n  - ".join(problems)
            + f"\nre-plan for it with:\n  {replan_command(profile, source.name, gpus)}\n(or pass --force to try anyway)"
        )
    return problems


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
    if devices == {"disk"} and profile.quantization.get("mode", "none") == "none":
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
    """The model's tokenizer, loaded before any weight: its JSON files read with the bounded reader, code it ships
    (an `auto_map` entry) refused unless trust_remote_code, then AutoTokenizer, whose failures (missing or damaged
    files) become one line naming the folder."""
    from transformers import AutoTokenizer

    directory = source.directory
    if directory is None:
        raise BadInput(f"{source.name}: a built-in config has no tokenizer; pass --model DIR with the checkpoint")
    damaged = "the tokenizer files are damaged: copy them again from the model's release"
    tokenizer_config: Any = {}
    for name in TOKENIZER_JSON_FILES:
        if (directory / name).is_file():
            data = jsonfile.read_json_file(directory / name, damaged)
            if name == "tokenizer_config.json":
                tokenizer_config = data
    if not isinstance(tokenizer_config, dict):
        raise BadInput(f"{directory / 'tokenizer_config.json'}: must hold a JSON object; {damaged}")
    if not trust_remote_code:
        _refuse_tokenizer_code(directory / "tokenizer_config.json", tokenizer_config.get("auto_map"))
        model_map = source.config.get("auto_map")
        if isinstance(model_map, dict) and "AutoTokenizer" in model_map:
            _refuse_tokenizer_code(directory / "config.json", {"AutoTokenizer": model_map["AutoTokenizer"]})
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
            ids = tokenizer("[INST] test [/INST]", add_special_tokens=True)["input_ids"]
    except Exception as exc:  # transformers, tokenizers and sentencepiece each raise their own kinds
        first = next((line.strip().rstrip(":") for line in str(exc).splitlines() if line.strip()), "")
        raise BadInput(
            f"{directory}: the tokenizer cannot be loaded ({type(exc).__name__}: {first}); its files (tokenizer.json "
            "or tokenizer.model, and tokenizer_config.json) are missing or damaged: copy them again from the model's "
            "release"
        ) from None
    if not ids:
        raise BadInput(f"{directory}: the tokenizer turns text into no tokens; {damaged}")
    return tokenizer


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
    from oneke_plan.layout import build_meta_model

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
    devices = set(profile.device_map.values())
    offload_unquantized = bool(devices & {"cpu", "disk"}) and devices != {"cpu"}
    if quant["mode"] == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload_unquantized)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
        bnb_4bit_compute_dtype=_torch_dtype(profile.dtype),
        llm_int8_enable_fp32_cpu_offload=offload_unquantized,
    )


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence library chatter (progress bars, dtype cast notices) while loading; errors still raise."""
    names = ["transformers", "accelerate", "bitsandbytes"]
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


def load_model(profile: Profile, source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The model, loaded into exactly the profile's device_map, ready for generate.

    First everything that can be checked without loading: the checkpoint's names and shapes against the model
    built as AutoModelForCausalLM on the meta device and tied (renamed and fused as transformers will load them),
    the device_map against its modules, the GPUs it names, the room for what disk offload writes. Then
    transformers' own from_pretrained with the profile's device_map, dtype and attention implementation (and a
    bitsandbytes config for 8/4-bit, which quantizes each Linear as it is loaded; bitsandbytes runs on the CPU
    too): it renames and fuses weights, ties them, offloads to CPU and disk, and dispatches.
    """
    if source.directory is None:
        raise BadInput(f"{source.name}: a built-in config has no weights; pass --model DIR with the checkpoint")
    checkpoint = read_checkpoint(source.directory)
    model = build_empty_model(source, profile.dtype, trust_remote_code, profile.attn_implementation)
    mismatch = key_mismatch(model, checkpoint)
    if mismatch:
        raise BadInput(explain_mismatch(mismatch, checkpoint.path))
    _check_device_map_modules(model, profile)
    _check_gpus_present(profile, source)
    if profile.offload_dir and "disk" in profile.device_map.values() and offload_writes_weights(checkpoint.pickled):
        _check_offload_space(model, profile, source.directory)
    del model
    device_map = dict(profile.device_map)
    offload = profile.offload_dir
    try:
        return _load_weights(profile, source, device_map, offload, trust_remote_code)
    except OSError as exc:  # a full or read-only offload folder, an unreadable shard: the path, not a traceback
        where = exc.filename or (offload if offload and "disk" in device_map.values() else checkpoint.path)
        raise os_error(where, "be used while loading the weights", exc, "free space or fix permissions there") from None


def _load_weights(
    profile: Profile, source: ModelSource, device_map: dict[str, Any], offload: str | None, trust_remote_code: bool
) -> Any:
    """load_model's second half: transformers' from_pretrained with the profile's map, dtype and attention."""
    if offload:
        Path(offload).mkdir(parents=True, exist_ok=True)
    quantized = profile.quantization["mode"] != "none"
    if quantized and not any(isinstance(d, int) for d in device_map.values()) and not bnb_quantizes_on_cpu():
        import transformers

        raise BadInput(
            f"the profile quantizes ({profile.quantization['mode']}) a model that sits on the CPU alone, which "
            f"transformers {transformers.__version__} cannot do with bitsandbytes (it needs {TRANSFORMERS_BNB_CPU} "
            "or later); upgrade transformers, or re-plan without --quantize"
        )
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": _quantization_config(profile)} if quantized else {}
    with _quiet():
        loaded = AutoModelForCausalLM.from_pretrained(
            str(source.directory),
            device_map=device_map,
            **{dtype_kwarg(): _torch_dtype(profile.dtype)},
            attn_implementation=profile.attn_implementation,
            offload_folder=offload,
            trust_remote_code=trust_remote_code,
            **extra,
        )
    _refuse_meta(loaded, device_map)
    loaded.eval()
    return loaded


SANITY_PROMPT = "[INST] Extract the entities: OneKE was released in 2024. [/INST]"


def check_finite_outputs(model: Any, tokenizer: Any, where: str) -> None:
    """One forward pass of a short prompt right after loading: every logit must be a finite number.

    Why stop the run (BadInput, exit 2) rather than warn: a model that computes NaN or inf from the start (weights
    that are NaN after a damaged download or a failed conversion, or a float16 run of weights that overflow in it)
    answers every prompt with nothing. A warning would scroll away while the run spends hours writing lines that
    look answered and score zero; one forward of a dozen tokens costs far less than the load that preceded it.
    """
    import torch

    from oneke_plan.generation import input_device

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


def _check_device_map_modules(model: Any, profile: Profile) -> None:
    """Every device_map key names a module or parameter of the model, and tied weights share a device."""
    from accelerate.utils import find_tied_parameters

    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for key in profile.device_map:
        if key != "" and key not in names:
            raise BadInput(
                f"profile device_map: {key!r} is not a module of {type(model).__name__}; "
                "re-create the profile with oneke-plan for this model"
            )
    for group in find_tied_parameters(model):
        devices = {_device_of(name, profile.device_map) for name in group}
        if len(devices) > 1:
            raise BadInput(
                f"profile device_map: tied weights {', '.join(group)} are split across devices "
                f"{sorted(map(str, devices))}; they must share one: re-create the profile"
            )


def _check_gpus_present(profile: Profile, source: ModelSource) -> None:
    """With --force the machine check is skipped, but weights still cannot go to a GPU torch does not see: say so
    in one line (DoesNotFit, exit 3) instead of letting torch fail deep inside the load."""
    wanted = sorted({d for d in profile.device_map.values() if isinstance(d, int)})
    if not wanted:
        return
    gpus = detect_gpus()
    have = {g.index for g in gpus}
    absent = [d for d in wanted if d not in have]
    if absent:
        seen = f"torch sees {len(gpus)} CUDA GPU(s)" if gpus else "torch sees no CUDA GPU here"
        raise DoesNotFit(
            f"cannot load: the profile puts weights on GPU {', '.join(map(str, absent))} and {seen} (--force skips "
            f"the machine check, not the hardware); re-plan with: {replan_command(profile, source.name, gpus)}"
        )


def _check_offload_space(model: Any, profile: Profile, directory: Path) -> None:
    """Refuse (DoesNotFit, exit 3) an offload folder without room for the weights mapped to disk: accelerate
    writes them through numpy memmaps, and a memmap on a full filesystem ends the process with SIGBUS, no message.

    The need is counted from the meta model at the larger of the profile's and the checkpoint's dtype (accelerate
    writes the checkpoint's), tied tensors once; room is the free space plus the .dat files an earlier offload
    left there (they are truncated and rewritten). Not --force-able: --force skips the machine check, not this.
    """
    from oneke_plan.checkpoint import checkpoint_dtype
    from oneke_plan.memory import DTYPE_BYTES

    folder = Path(str(profile.offload_dir))
    float_bytes = max(DTYPE_BYTES[profile.dtype], DTYPE_BYTES.get(checkpoint_dtype(directory) or "", 0))
    seen: set[int] = set()
    need = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or _device_of(name, profile.device_map) != "disk":
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


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise BadInput(f"profile device_map: no entry covers {name!r}; re-create the profile with oneke-plan")
    return device_map[best]


def _refuse_meta(model: Any, device_map: dict[str, Any]) -> None:
    """A parameter left on meta with no offload hook behind it would crash inside generate: stop here instead."""
    for name, param in model.named_parameters():
        if param.device.type == "meta" and _device_of(name, device_map) not in ("cpu", "disk"):
            raise BadInput(f"{name} was not loaded (still on the meta device); the checkpoint does not cover it")


# -- what landed where ---------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: Any) -> int:
    """A parameter's bytes with its 4-bit quantization state (8-bit scales are counted per module: _int8_scales)."""
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        for part in (state.absmax, state.code, getattr(state, "offset", None)):
            if part is not None:
                total += part.numel() * part.element_size()
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += nested.absmax.numel() * nested.absmax.element_size()
            total += nested.code.numel() * nested.code.element_size()
    return total


def _offload_index(offload_dir: str | None) -> dict[str, Any]:
    """accelerate's index.json in the offload folder (name -> dtype, shape); {} if there is none."""
    if not offload_dir:
        return {}
    try:
        index = jsonfile.loads((Path(offload_dir) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def measured_weight_bytes(
    model: Any,
    device_map: dict[str, Any],
    dtype: str,
    offload_dir: str | None = None,
    stored_dtypes: dict[str, str] | None = None,
) -> dict[Any, int]:
    """Bytes of parameters and buffers per profile device, as loaded (tied tensors once).

    Tensors on a real device count there. Tensors left on meta by accelerate's offload count on their device_map
    device (cpu or disk): a disk tensor at the dtype it is stored in, as `offload_dir`'s index.json records it
    (transformers 4.x writes the checkpoint's dtype there) or else as the checkpoint stores it (`stored_dtypes`:
    transformers 5 reads offloaded weights straight from the checkpoint's safetensors), and cast on every fetch, so
    an fp32 profile of a bf16 checkpoint keeps bf16 on disk; any other at the profile's dtype.
    """
    import torch

    from oneke_plan.memory import DTYPE_BYTES

    index = {name: entry.get("dtype", "") for name, entry in _offload_index(offload_dir).items()}
    index = {**(stored_dtypes or {}), **index}
    seen: set[Any] = set()
    totals: dict[Any, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta":
            key: Any = ("meta", name)
            device = _device_of(name, device_map)
            stored = getattr(torch, str(index.get(name, "")), None) if device == "disk" else None
            if isinstance(stored, torch.dtype):
                size = tensor.numel() * stored.itemsize
            else:
                size = tensor.numel() * (DTYPE_BYTES[dtype] if tensor.is_floating_point() else tensor.element_size())
        else:
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            device = tensor.device.index if tensor.device.type == "cuda" else _device_of(name, device_map)
            size = _tensor_bytes(tensor)
        if key in seen:
            continue
        seen.add(key)
        totals[device] = totals.get(device, 0) + size
    for name, scales in _int8_scales(model):
        key = (scales.device, scales.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            device = scales.device.index if scales.device.type == "cuda" else _device_of(name, device_map)
            totals[device] = totals.get(device, 0) + scales.numel() * scales.element_size()
    return totals


def _int8_scales(model: Any) -> list[tuple[str, Any]]:
    """bitsandbytes 8-bit row scales (SCB): on the weight after loading, moved to the module's `state` by the first
    forward pass (the weight's SCB is then None), so both places are looked at."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        for scales in (getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)):
            if scales is not None and hasattr(scales, "untyped_storage") and scales.device.type != "meta":
                found.append((f"{name}.weight" if name else "weight", scales))
    return found
