"""A LoRA adapter on disk (peft's adapter_config.json + adapter_model.safetensors): read, fingerprinted, checked
against the base model's modules, and built by peft itself on the meta device.

What an adapter is made of is read from its files, never assumed: the tensors, their shapes and their bytes from
the safetensors header; the module each pair wraps from peft's own naming (`base_model.model.<module>.lora_A.weight`
and `.lora_B.weight`). Whether it belongs to a base model is decided by shapes (lora_A's in_features and lora_B's
out_features against the module it wraps), not by `base_model_name_or_path`, which names a folder users rename.

Nothing in the files is trusted before it is checked, and all of it is checked before peft builds anything (a
config field peft reads unchecked can end in a TypeError deep inside it, and a rank peft believes allocates that
rank's matrices): `read_adapter` checks what the files say on their own (`check_config`: every field's type and
range; `safetensors_entries`: the header, read with bounds; the tensors against the config), `check_base` what
needs the base model (the layers the config makes peft wrap, by peft's own matching, against those the tensors
are for; each layer's rank against its shape). Each refusal is one BadInput naming the file and the key.

Reading, validating and fingerprinting need no torch; `check_base` and `attach_meta` take a (meta) model and
import peft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput, DoesNotFit
from oneke_plan.io import jsonfile
from oneke_plan.measure.checkpoint import safetensors_entries
from oneke_plan.plan.profile import AdapterRecord

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft saves a PeftModel's tensors under its wrapper's names, adapter name dropped
LORA_KINDS = ("lora_A", "lora_B")
LORA_DTYPES = ("F16", "BF16", "F32", "F64")  # what peft saves LoRA weights as
PEFT_MISSING = "--adapter needs peft: pip install 'oneke-plan[lora]'"
MAX_CONFIG_BYTES = 2**20
"""Largest adapter_config.json read (1 MiB): peft writes a few KB; a rank_pattern naming each layer of a 100-layer
model is under 100 KB."""
MAX_HEADER_BYTES = 8 * 2**20
"""Largest safetensors header of an adapter read (8 MiB: about 60,000 tensors; a LoRA on every Linear layer of a
400B dense model has under 2,000). Parsed, JSON takes up to about 25 times its size in memory: 200 MB at most."""
MAX_TEXT = 4096  # longest base_model_name_or_path, revision or version string: a path
_BYTES_PER_CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterTensor:
    module: str  # the base model's module it wraps, e.g. model.layers.0.self_attn.q_proj
    kind: str  # lora_A or lora_B
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. F32, BF16
    nbytes: int  # as stored: the header's data_offsets


@dataclass(frozen=True)
class Adapter:
    directory: Path
    config: dict[str, Any]  # adapter_config.json as written (check_config has accepted it)
    tensors: dict[str, AdapterTensor]  # by the name stored in the file
    fingerprint: str  # sha256 of adapter_config.json and adapter_model.safetensors, both whole

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def file_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """module -> {"lora_A": shape, "lora_B": shape}."""
        found: dict[str, dict[str, tuple[int, ...]]] = {}
        for tensor in self.tensors.values():
            found.setdefault(tensor.module, {})[tensor.kind] = tensor.shape
        return found

    def record(self, merged: bool) -> AdapterRecord:
        """What a profile keeps of the adapter (docs/profile-format.md, `adapter`)."""
        targets = self.config.get("target_modules")
        return AdapterRecord(
            path=str(self.directory),
            fingerprint=self.fingerprint,
            r=self.r,
            lora_alpha=self.config.get("lora_alpha"),
            target_modules=sorted(targets) if isinstance(targets, list) else targets,
            base_model_name_or_path=self.config.get("base_model_name_or_path"),
            modules=len(self.modules),
            file_tensor_bytes=self.file_tensor_bytes,
            on_load="merged" if merged else "unmerged",
        )


def _remedy(directory: Path) -> str:
    return f"{directory} must be a LoRA adapter saved by peft (save_pretrained): copy it again"


def read_adapter(directory: Path) -> Adapter:
    """Read an adapter folder; every problem is one BadInput naming the file. Only what oneke-run can apply
    honestly is accepted: plain LoRA on Linear layers (no DoRA, no extra trained modules, no bias). Both files are
    read with bounds (the config's size, the header's length) before they are parsed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInput(f"--adapter {directory}: not a folder; give the folder peft's save_pretrained wrote")
    config_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise BadInput(f"{config_path}: missing; {_remedy(directory)}")
    config = jsonfile.read_json_file(config_path, _remedy(directory), limit=MAX_CONFIG_BYTES)
    check_config(config, config_path)
    if not weights.is_file():
        pickled = " (adapter_model.bin, a pickle, is not read: save it again with safe_serialization)"
        raise BadInput(f"{weights}: missing{pickled if (directory / 'adapter_model.bin').exists() else ''}")
    try:
        meta = safetensors_entries(weights, MAX_HEADER_BYTES)
    except OSError as exc:
        raise BadInput(f"{weights}: cannot be read ({exc.strerror or exc}); {_remedy(directory)}") from None
    except ValueError as exc:  # the header lies, or is no JSON object: safetensors_entries says which tensor and how
        raise BadInput(f"{weights}: not a valid safetensors file: {exc}; {_remedy(directory)}") from None
    tensors = {name: _tensor(weights, name, entry) for name, entry in meta.items()}
    if not tensors:
        raise BadInput(f"{weights}: holds no tensor; {_remedy(directory)}")
    adapter = Adapter(directory, config, tensors, _fingerprint(config_path, weights))
    for module, pair in adapter.modules.items():
        if set(pair) != set(LORA_KINDS):
            raise BadInput(
                f"{weights}: {module} has {sorted(pair)} but not both lora_A and lora_B; {_remedy(directory)}"
            )
        if pair["lora_A"][0] != pair["lora_B"][1]:
            raise BadInput(
                f"{weights}: {module}'s lora_A {pair['lora_A']} has rank {pair['lora_A'][0]} and its lora_B "
                f"{pair['lora_B']} rank {pair['lora_B'][1]}: they are not one LoRA pair; {_remedy(directory)}"
            )
    return adapter


def _tensor(weights: Path, name: str, entry: dict[str, Any]) -> AdapterTensor:
    """One header entry (safetensors_entries has checked it), with the module it wraps from peft's naming; BadInput
    for tensors that are not LoRA's."""
    stem = name.removeprefix(PEFT_PREFIX)
    parts = stem.split(".")
    shown = jsonfile.shown(name, 120)
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in LORA_KINDS or stem == name:
        raise BadInput(
            f"{weights}: tensor {shown} is not a LoRA weight (base_model.model.<module>.lora_A.weight or "
            "lora_B.weight); oneke-plan plans plain LoRA adapters on Linear layers only"
        )
    start, stop = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if len(shape) != 2 or 0 in shape:
        raise BadInput(
            f"{weights}: tensor {shown} has shape {jsonfile.shown(list(shape))}, not a matrix of rank and features; "
            f"{_remedy(weights.parent)}"
        )
    if entry["dtype"] not in LORA_DTYPES:
        raise BadInput(
            f"{weights}: tensor {shown} is {entry['dtype']}, not a floating-point dtype peft saves LoRA weights in "
            f"({', '.join(LORA_DTYPES)}); {_remedy(weights.parent)}"
        )
    return AdapterTensor(".".join(parts[:-2]), parts[-2], shape, str(entry["dtype"]), stop - start)


# ---------------------------------------------------------------- adapter_config.json, field by field

_FIX = "fix it, or save the adapter again with peft (save_pretrained)"


class _Remedied(str):
    """A problem whose message already says what to do (the others get _FIX)."""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _described(value: Any) -> str:
    return "null" if value is None else f"{jsonfile.shown(value)} ({_kind(value)})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite float, or an int a float can hold (peft divides by it: JSON's NaN and Infinity, and 10**400, are no
    numbers here); a bool is not a number."""
    return (_is_int(value) and abs(value) <= sys.float_info.max) or (isinstance(value, float) and math.isfinite(value))


def _regex_problem(pattern: str, *forms: str) -> str | None:
    """Why `pattern` is not a regular expression, alone or in the `forms` peft puts it in ({} for it), or None."""
    for form in ("{}", *forms):
        try:
            re.compile(form.replace("{}", pattern))
        except (re.error, RecursionError, OverflowError) as exc:
            return f"{jsonfile.shown(pattern)} is not a regular expression ({exc})"
    return None


def _rank(value: Any) -> str | None:
    return None if _is_int(value) and value >= 1 else f"must be a whole number of at least 1, not {_described(value)}"


def _alpha(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else f"must be a number above 0, not {_described(value)}"


def _fraction(value: Any) -> str | None:
    ok = _is_number(value) and 0 <= value <= 1
    return None if ok else f"must be a number from 0 to 1, not {_described(value)}"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, not {_described(value)}"


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and len(value) <= MAX_TEXT):
        return None
    if isinstance(value, str):
        return f"is {len(value)} characters long, more than any name or path ({MAX_TEXT})"
    return f"must be a string or null, not {_described(value)}"


def _object(value: Any) -> str | None:
    return None if value is None or isinstance(value, dict) else f"must be an object or null, not {_described(value)}"


def _names(value: Any, what: str) -> str | None:
    """A non-empty list of non-empty strings."""
    if not isinstance(value, list) or not value:
        return f"must be a list of {what}s, not {_described(value)}"
    for item in value:
        if not isinstance(item, str) or not item:
            return f"holds {_described(item)}, not {what}"
    return None


def _layers(value: Any) -> str | None:
    """target_modules and exclude_modules, as peft reads them: a regular expression a layer's whole name must match,
    or a list of layer names (a layer's name, or its last parts)."""
    if isinstance(value, str):
        if not value:
            return "is an empty string, which matches no layer"
        problem = _regex_problem(value)
        return f"is {problem}" if problem else None
    if isinstance(value, list):
        return _names(value, "layer name")
    return f"must be a list of layer names or a regular expression, not {_described(value)}"


_EXAMPLE_TARGETS = 'as peft\'s save_pretrained writes them (e.g. ["q_proj", "v_proj"])'


def _target_modules(value: Any) -> str | None:
    if value is None:
        return _Remedied(
            f"is null or missing (peft would choose layers by the model's type); list the layers the adapter wraps, "
            f"{_EXAMPLE_TARGETS}"
        )
    if isinstance(value, str) and value.lower() == "all-linear":
        return _Remedied(
            f"is 'all-linear', which peft expands while it trains; list the layers the adapter wraps, "
            f"{_EXAMPLE_TARGETS}"
        )
    if value == []:
        return _Remedied(f"is an empty list; list the layers the adapter wraps, {_EXAMPLE_TARGETS}")
    return _layers(value)


# peft matches rank_pattern and alpha_pattern keys against a layer's name in these regular expressions
_PATTERN_FORMS = (r"(.*\.)?({})$", r".*\.{}$")


def _pattern(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """rank_pattern, alpha_pattern: an object of layer-name patterns (regular expressions) and their values."""

    def checked(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be an object of layer-name patterns and values ({{}} for none), not {_described(value)}"
        for key, item in value.items():
            shown = jsonfile.shown(key)
            problem = "is empty" if not key else _regex_problem(key, *_PATTERN_FORMS)
            if problem:
                return f"key {shown}: {problem}"
            problem = check(item)
            if problem:
                return f"[{shown}] {problem}"
        return None

    return checked


def _layer_indexes(value: Any) -> str | None:
    items = [value] if _is_int(value) else value if isinstance(value, list) else None
    if value is None or (items is not None and all(_is_int(i) and i >= 0 for i in items)):
        return None
    return f"must be a layer index, a list of them, or null, not {_described(value)}"


def _layers_pattern(value: Any) -> str | None:
    """The name of the layer list layers_to_transform indexes (e.g. "layers"), or a list of them: peft puts each in
    a regular expression."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None:
        return f"must be a layer-list name, a list of them, or null, not {_described(value)}"
    for item in items:
        problem = _regex_problem(item, r".*\.{}\.(\d+)\.") if isinstance(item, str) else _described(item)
        if problem:
            return f"holds {problem}, not a layer-list name"
    return None


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else check(value)


def _equals(allowed: tuple[Any, ...], why: str) -> Callable[[Any], str | None]:
    """A field whose other values oneke-plan does not plan for: `why` says what they mean and what to do."""

    def checked(value: Any) -> str | None:
        if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            return None
        return _Remedied(f"is {_described(value)}: {why}")

    return checked


def _off(what: str) -> Callable[[Any], str | None]:
    """A feature oneke-plan does not plan for: the field must be false, null or empty."""

    def checked(value: Any) -> str | None:
        if _is_off(value):
            return None
        if not isinstance(value, (bool, list, dict)):
            return f"must be false, null or empty, not {_described(value)}"
        return _Remedied(f"is {_described(value)}: the adapter uses {what}, which {_NOT_PLANNED}")

    return checked


def _is_off(value: Any) -> bool:
    """A value that turns a feature off: null, false, an empty list or an object of such values."""
    if value is None or value is False or value == []:
        return True
    return isinstance(value, dict) and all(_is_off(v) for v in value.values())


_NOT_PLANNED = (
    "oneke-plan does not plan for (it plans plain LoRA on Linear layers); merge the adapter into the base model "
    "with peft (merge_and_unload, then save_pretrained) and plan the merged model"
)
_CONFIG_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "peft_type": _equals(("LORA",), "oneke-run applies LoRA adapters only"),
    "r": _rank,
    "lora_alpha": _alpha,
    "target_modules": _target_modules,
    "rank_pattern": _pattern(_rank),
    "alpha_pattern": _pattern(_alpha),
    "lora_dropout": _fraction,
    "fan_in_fan_out": _flag,
    "bias": _equals(("none",), "oneke-plan plans adapters with bias 'none'"),
    "use_rslora": _flag,
    "use_dora": _off("DoRA"),
    "modules_to_save": _off("extra trained modules (modules_to_save)"),
    "lora_bias": _off("LoRA bias terms"),
    "layer_replication": _off("layer replication"),
    "use_qalora": _off("QA-LoRA"),
    "megatron_config": _off("Megatron's parallel layers"),
    "loftq_config": _off("LoftQ"),
    "layers_to_transform": _layer_indexes,
    "layers_pattern": _optional(_layers_pattern),
    "exclude_modules": _optional(lambda value: None if value == [] else _layers(value)),
    "init_lora_weights": _equals(
        (True, False, "gaussian"),
        'plain LoRA has true, false or "gaussian" (how peft fills the layers before it loads the weights); '
        "PiSSA, OLoRA, CorDA, LoftQ and the like build the adapter from the base model's weights, and some change "
        "those weights, which oneke-plan does not plan for: convert the adapter to plain LoRA with peft "
        "(path_initial_model_for_weight_conversion)",
    ),
    "task_type": _equals(
        (None, "CAUSAL_LM"),
        "oneke-run generates text with a causal language model (task_type CAUSAL_LM, or null)",
    ),
    "inference_mode": _flag,
    "ensure_weight_tying": _flag,
    "qalora_group_size": _rank,
    "base_model_name_or_path": _text,
    "revision": _text,
    "peft_version": _text,
    "megatron_core": _text,
    "auto_mapping": _object,
}
_REQUIRED = ("peft_type", "r")
_INERT = ("peft_version", "qalora_group_size", "auto_mapping", "revision")  # nothing a peft that lacks them misses


def check_config(config: Any, path: Path) -> None:
    """adapter_config.json, every field checked before anything is built from it: its type (a bool is not a
    number, a number in a string is not one), its range (a rank of at least 1, a dropout from 0 to 1, regular
    expressions that compile), and the features oneke-plan does not plan for off; a field of a newer peft that the
    table does not know must be off too. One BadInput naming the file, the key, what is wrong and what to do."""
    if not isinstance(config, dict):
        raise BadInput(f"{path}: must hold a JSON object, not {_kind(config)}; {_remedy(path.parent)}")
    for key in _REQUIRED:
        if key not in config:
            raise BadInput(f"{path}: {key} is missing; {_remedy(path.parent)}")
    for key, check in _CONFIG_FIELDS.items():
        problem = check(config.get(key)) if key in config or key == "target_modules" else None
        if problem:
            raise BadInput(f"{path}: {key} {problem}" + ("" if isinstance(problem, _Remedied) else f"; {_FIX}"))
    for key, value in config.items():
        if key not in _CONFIG_FIELDS and not _is_off(value):
            raise BadInput(
                f"{path}: {jsonfile.shown(key)} is {_described(value)}: the adapter uses a peft feature that "
                f"{_NOT_PLANNED}"
            )


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_BYTES_PER_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def replan_hint(adapter_dir: Path | str) -> str:
    return f"re-plan with oneke-plan MODEL ... --adapter {adapter_dir}"


def check_recorded(adapter: Adapter, recorded: AdapterRecord | None) -> None:
    """The adapter given to oneke-run (or the profile's own, read again) is the one the profile was planned with
    (DoesNotFit, exit 3, otherwise)."""
    if recorded is None:
        raise DoesNotFit(
            f"--adapter {adapter.directory}: the profile was planned without an adapter, so its memory is not "
            f"counted; {replan_hint(adapter.directory)}"
        )
    if recorded.fingerprint != adapter.fingerprint:
        raise DoesNotFit(
            f"--adapter {adapter.directory}: its files are not those the profile was planned with (fingerprint "
            f"{adapter.fingerprint[:19]}..., planned {recorded.fingerprint[:19]}...); "
            f"{replan_hint(adapter.directory)}"
        )


def check_base(adapter: Adapter, model: Any) -> None:
    """The adapter against the base model (`model`, built on the meta device), before peft builds anything:

    - peft accepts the config (lora_config);
    - each layer the tensors are for is a layer of the model, of the shapes the adapter was trained on: lora_A is
      (r, in_features), lora_B (out_features, r); DoesNotFit (exit 3, an adapter of another base) naming the first
      few that are not;
    - and a Linear layer (BadInput: oneke-plan plans LoRA on Linear layers only);
    - the layers target_modules make peft wrap, by peft's own matching (check_target_module_exists), are Linear
      layers, and exactly those the tensors are for (else peft would leave layers at their initial values, or
      ignore tensors, silently);
    - each layer's rank, r or its rank_pattern's (by peft's own pattern matching), is that of its tensors and at
      most the smaller side of the layer (a larger one is no low-rank adapter, and peft would allocate it); every
      rank_pattern and alpha_pattern key applies to a wrapped layer.

    BadInput (exit 2) naming adapter_config.json, the key and what to do for all but the other base."""
    import torch

    config = lora_config(adapter)
    modules = dict(model.named_modules())
    problems = []
    for name, pair in sorted(adapter.modules.items()):
        module = modules.get(name)
        a, b = pair["lora_A"], pair["lora_B"]
        if module is None:
            problems.append(f"{name}: not a module of {type(model).__name__}")
        elif isinstance(module, torch.nn.Linear) and (a[1], b[0]) != (module.in_features, module.out_features):
            problems.append(
                f"{name}: lora_A {a} and lora_B {b} wrap {a[1]} -> {b[0]} features, the model's layer "
                f"{module.in_features} -> {module.out_features}"
            )
    if problems:
        hint = adapter.config.get("base_model_name_or_path")
        raise DoesNotFit(
            f"--adapter {adapter.directory}: made for another base model"
            + (f" (it names {jsonfile.shown(hint)})" if hint else "")
            + f"; {len(problems)} of its {len(adapter.modules)} modules do not match this one: "
            + "; ".join(problems[:3])
            + (" ..." if len(problems) > 3 else "")
            + "; nothing was loaded"
        )
    for name in sorted(adapter.modules):
        if not isinstance(modules[name], torch.nn.Linear):
            raise BadInput(
                f"{adapter.directory / ADAPTER_WEIGHTS}: holds LoRA tensors for {name} ("
                f"{type(modules[name]).__name__}, not a Linear layer), which {_NOT_PLANNED}"
            )
    _check_targets(adapter, config, model, modules)
    _check_ranks(adapter, modules)


def _check_targets(adapter: Adapter, config: Any, model: Any, modules: dict[str, Any]) -> None:
    """The layers peft wraps for target_modules (and exclude_modules, layers_to_transform) are Linear layers, and
    those the tensors are for."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    where = adapter.directory / ADAPTER_CONFIG
    targets = f"target_modules {jsonfile.shown(adapter.config.get('target_modules'))}"
    stored = set(adapter.modules)
    example = min(stored)
    names = adapter.config.get("target_modules")
    if isinstance(names, list) and len(set(names)) > len(modules):  # each is matched against each layer: bounded
        raise BadInput(
            f"{where}: target_modules names {len(set(names))} layers, more than {type(model).__name__} has "
            f"({len(modules)}); name the layers the adapter wraps (its tensors are for {len(stored)}, e.g. "
            f"{example!r})"
        )
    wrapped = [name for name in modules if check_target_module_exists(config, name)]
    if not wrapped:
        raise BadInput(
            f"{where}: {targets} match no layer of {type(model).__name__}; name the layers the adapter wraps (its "
            f"tensors are for {len(stored)}, e.g. {example!r}: target_modules [{example.rsplit('.', 1)[-1]!r}])"
        )
    for name in wrapped:
        if not isinstance(modules[name], torch.nn.Linear):
            what = "the whole model" if name == "" else f"{name} ({type(modules[name]).__name__})"
            raise BadInput(
                f"{where}: {targets} match {what}, which peft would wrap, and oneke-plan plans LoRA on Linear layers "
                f"only; name the Linear layers the adapter wraps (its tensors are for {len(stored)}, e.g. "
                f"{example!r})"
            )
    built = set(wrapped)
    if built != stored:
        extra, missing = sorted(built - stored), sorted(stored - built)
        raise BadInput(
            f"{where}: {targets} make peft wrap "
            + (f"{len(extra)} layers the file has no tensors for (e.g. {extra[0]})" if extra else "")
            + (" and " if extra and missing else "")
            + (f"not wrap {len(missing)} layers the file has tensors for (e.g. {missing[0]})" if missing else "")
            + f"; the config and {ADAPTER_WEIGHTS} do not belong together: {_remedy(adapter.directory)}"
        )


def _check_ranks(adapter: Adapter, modules: dict[str, Any]) -> None:
    """Each wrapped layer's rank (r, or its rank_pattern's) is its tensors' and at most min(in_features,
    out_features); each rank_pattern and alpha_pattern key applies to a wrapped layer."""
    where = adapter.directory / ADAPTER_CONFIG
    ranks: dict[str, int] = adapter.config.get("rank_pattern") or {}
    alphas: dict[str, Any] = adapter.config.get("alpha_pattern") or {}
    for field, keys in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if len(keys) > len(adapter.modules):  # each is matched against each layer: bounded before that
            raise BadInput(
                f"{where}: {field} has {len(keys)} keys, more than the {len(adapter.modules)} layers the adapter "
                "wraps, so some apply to none; remove those"
            )
    used: set[tuple[str, str]] = set()
    for name, pair in sorted(adapter.modules.items()):
        rank_key, alpha_key = pattern_keys(ranks, alphas, name)
        used |= {("rank_pattern", rank_key), ("alpha_pattern", alpha_key)}
        rank, field = (ranks[rank_key], f"rank_pattern[{rank_key!r}]") if rank_key in ranks else (adapter.r, "r")
        module = modules[name]
        largest = min(module.in_features, module.out_features)
        if rank > largest:
            raise BadInput(
                f"{where}: {field} is {rank}, more than {name} has features ({module.in_features} -> "
                f"{module.out_features}): a LoRA's rank is at most the smaller of the two ({largest}); "
                f"{_FIX}"
            )
        if rank != pair["lora_A"][0]:
            raise BadInput(
                f"{where}: {field} is {rank}, but the tensors for {name} in {ADAPTER_WEIGHTS} have rank "
                f"{pair['lora_A'][0]} (lora_A {pair['lora_A']}); the config and the tensors do not belong together "
                f"(peft would refuse to load them): {_remedy(adapter.directory)}"
            )
    for field, keys in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        unused = [key for key in keys if (field, key) not in used]
        if unused:
            raise BadInput(
                f"{where}: {field} key {jsonfile.shown(unused[0])} applies to none of the {len(adapter.modules)} "
                f"layers the adapter wraps (e.g. {min(adapter.modules)!r}), so peft would ignore it; remove it, or "
                "name a wrapped layer"
            )


def pattern_keys(ranks: dict[str, Any], alphas: dict[str, Any], module: str) -> tuple[str, str]:
    """The rank_pattern and alpha_pattern keys peft applies to the layer `module` (`module` itself where none
    does), by peft's own matching: peft.utils.other.get_pattern_key, or before peft had it (0.13), the rule of its
    LoraModel._create_and_replace, one key for both patterns."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:
        key = next((k for k in (*ranks, *alphas) if re.match(rf".*\.{k}$", module)), module)
        return key, key
    return get_pattern_key(list(ranks), module), get_pattern_key(list(alphas), module)


def require_peft() -> Any:
    """peft, or one line saying how to install it (BadInput, exit 2)."""
    try:
        import peft
    except ImportError:
        raise BadInput(PEFT_MISSING) from None
    return peft


def lora_config(adapter: Adapter) -> Any:
    """peft's LoraConfig from the adapter_config.json read above (not re-read by peft). A key this peft does not
    know is refused: it may change what the adapter computes (unless it changes nothing: _INERT). What peft's own
    LoraConfig refuses is one BadInput too."""
    peft = require_peft()
    where = adapter.directory / ADAPTER_CONFIG
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(k for k, v in adapter.config.items() if k not in known and k not in _INERT and not _is_off(v))
    if unknown:
        raise BadInput(
            f"{where}: {', '.join(unknown)} unknown to peft {peft.__version__}, which may change what the adapter "
            "computes; upgrade peft"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.LoraConfig(**{k: v for k, v in adapter.config.items() if k in known and k != "peft_type"})
    except (TypeError, ValueError) as exc:  # LoraConfig.__post_init__'s own checks (combinations of fields)
        reason = " ".join(str(exc).split())
        raise BadInput(f"{where}: peft {peft.__version__} refuses it ({reason[:300]}); {_FIX}") from None


def lora_module(parameter: str) -> str:
    """The module a LoRA parameter's lora_A wraps, by peft's naming: `...q_proj.lora_A.default.weight` ->
    `...q_proj`."""
    return parameter.rsplit(".lora_A.", 1)[0]


def attach_meta(model: Any, adapter: Adapter) -> Any:
    """`model` (on meta) with the adapter's LoRA layers, built by peft as PeftModel.from_pretrained builds them
    (adapter dtype autocast as its default does); returns the transformers model inside, whose module names are the
    base model's. Modifies `model`. check_base has accepted the adapter for this model. On meta, peft creates the
    LoRA layers' parameters on meta too (accelerate's init_empty_weights), so that building them allocates nothing;
    a model of fake tensors (compat.measures_on_meta) gets real ones, as large as the adapter's checked tensors
    (fake tensors cannot be moved onto), the adapter's own size."""
    import contextlib

    from accelerate import init_empty_weights

    peft = require_peft()
    config = lora_config(adapter)
    fake = getattr(next(model.parameters(), None), "fake_mode", None) is not None
    empty = contextlib.nullcontext() if fake else init_empty_weights()
    with warnings.catch_warnings(), empty:  # peft notes the meta model's name is not the config's
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    return wrapped.base_model.model


def lora_parameters(model: Any) -> dict[str, Any]:
    """The LoRA parameters peft added to a model, by name."""
    return {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def load_onto(model: Any, adapter: Adapter, merge: bool) -> Any:
    """The loaded (dispatched) model with the adapter applied by peft: merged into the weights
    (merge_and_unload), or kept as LoRA layers. The adapter file is read to host memory first (torch_device cpu),
    then copied onto each wrapped module's device."""
    peft = require_peft()
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter.directory), config=lora_config(adapter),
                                             torch_device="cpu")  # fmt: skip
    wrapped.eval()
    return wrapped.merge_and_unload() if merge else wrapped.base_model.model
