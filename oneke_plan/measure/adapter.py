"""A LoRA adapter on disk (peft's adapter_config.json + adapter_model.safetensors): read, fingerprinted, checked
against the base model's modules, and built by peft itself on the meta device.

What an adapter is made of is read from its files, never assumed: the tensors, their shapes and their bytes from
the safetensors header; the module each pair wraps from peft's own naming (`base_model.model.<module>.lora_A.weight`
and `.lora_B.weight`). Whether it belongs to a base model is decided by shapes (lora_A's in_features and lora_B's
out_features against the module it wraps), not by `base_model_name_or_path`, which names a folder users rename.

Reading and fingerprinting need no torch; `check_base` and `attach` take a (meta) model and import peft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
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
PEFT_MISSING = "--adapter needs peft: pip install 'oneke-plan[lora]'"
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
    config: dict[str, Any]  # adapter_config.json as written
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
    honestly is accepted: plain LoRA on Linear layers (no DoRA, no extra trained modules, no bias)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInput(f"--adapter {directory}: not a folder; give the folder peft's save_pretrained wrote")
    config_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise BadInput(f"{config_path}: missing; {_remedy(directory)}")
    config = jsonfile.read_json_file(config_path, _remedy(directory))
    if not isinstance(config, dict):
        raise BadInput(f"{config_path}: must hold a JSON object; {_remedy(directory)}")
    if config.get("peft_type") != "LORA":
        raise BadInput(f"{config_path}: peft_type is {config.get('peft_type')!r}; oneke-run applies LoRA adapters only")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "extra trained modules (modules_to_save)"),
                     ("lora_bias", "LoRA bias terms"), ("layer_replication", "layer replication")):  # fmt: skip
        if config.get(key):
            raise BadInput(f"{config_path}: the adapter uses {why}, which oneke-plan does not plan for")
    if config.get("bias", "none") != "none":
        raise BadInput(f"{config_path}: bias is {config.get('bias')!r}; oneke-plan plans adapters with bias 'none'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise BadInput(f"{config_path}: r must be a positive integer, not {r!r}; {_remedy(directory)}")
    if not weights.is_file():
        pickled = " (adapter_model.bin, a pickle, is not read: save it again with safe_serialization)"
        raise BadInput(f"{weights}: missing{pickled if (directory / 'adapter_model.bin').exists() else ''}")
    try:
        meta = safetensors_entries(weights)
        tensors = {name: _tensor(weights, name, entry) for name, entry in meta.items()}
    except BadInput:
        raise
    except Exception as exc:  # a damaged header: json, key, type and value errors alike
        raise BadInput(f"{weights}: not a complete safetensors file ({exc}); {_remedy(directory)}") from None
    if not tensors:
        raise BadInput(f"{weights}: holds no tensor; {_remedy(directory)}")
    adapter = Adapter(directory, config, tensors, _fingerprint(config_path, weights))
    for module, pair in adapter.modules.items():
        if set(pair) != set(LORA_KINDS):
            raise BadInput(
                f"{weights}: {module} has {sorted(pair)} but not both lora_A and lora_B; {_remedy(directory)}"
            )
    return adapter


def _tensor(weights: Path, name: str, entry: dict[str, Any]) -> AdapterTensor:
    """One header entry, with the module it wraps from peft's naming; BadInput for tensors that are not LoRA's."""
    stem = name.removeprefix(PEFT_PREFIX)
    parts = stem.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in LORA_KINDS or stem == name:
        raise BadInput(
            f"{weights}: tensor {name!r} is not a LoRA weight (base_model.model.<module>.lora_A.weight or "
            "lora_B.weight); oneke-plan plans plain LoRA adapters on Linear layers only"
        )
    start, stop = entry["data_offsets"]
    shape = tuple(entry["shape"])
    # JSON integers only: int() would read the string "３" (any script's digits) as 3
    if not all(type(n) is int for n in (*shape, start, stop)):
        raise ValueError(f"{name}: shape and data_offsets must be integers, not {shape!r} and {[start, stop]!r}")
    if len(shape) != 2:
        raise ValueError(f"{name} has shape {shape}, not a matrix")
    return AdapterTensor(".".join(parts[:-2]), parts[-2], shape, str(entry["dtype"]), stop - start)


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
    """The adapter wraps modules the model has, as Linear layers of the shapes it was trained on: lora_A is
    (r, in_features), lora_B (out_features, r). DoesNotFit (exit 3) naming the first few that do not."""
    modules = dict(model.named_modules())
    problems = []
    for name, pair in sorted(adapter.modules.items()):
        module = modules.get(name)
        a, b = pair["lora_A"], pair["lora_B"]
        if module is None:
            problems.append(f"{name}: not a module of {type(model).__name__}")
        elif not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            problems.append(f"{name}: a {type(module).__name__}, not a Linear layer")
        elif (a[1], b[0]) != (module.in_features, module.out_features) or a[0] != b[1]:
            problems.append(
                f"{name}: lora_A {a} and lora_B {b} wrap {a[1]} -> {b[0]} features, the model's layer "
                f"{module.in_features} -> {module.out_features}"
            )
    if problems:
        hint = adapter.config.get("base_model_name_or_path")
        raise DoesNotFit(
            f"--adapter {adapter.directory}: made for another base model"
            + (f" (it names {hint!r})" if hint else "")
            + f"; {len(problems)} of its {len(adapter.modules)} modules do not match this one: "
            + "; ".join(problems[:3])
            + (" ..." if len(problems) > 3 else "")
            + "; nothing was loaded"
        )


def require_peft() -> Any:
    """peft, or one line saying how to install it (BadInput, exit 2)."""
    try:
        import peft
    except ImportError:
        raise BadInput(PEFT_MISSING) from None
    return peft


def lora_config(adapter: Adapter) -> Any:
    """peft's LoraConfig from the adapter_config.json read above (not re-read by peft). A key this peft does not
    know is refused: it may change what the adapter computes."""
    peft = require_peft()
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(k for k, v in adapter.config.items() if k not in known and v not in (None, False, {}, []))
    if unknown:
        raise BadInput(
            f"{adapter.directory / ADAPTER_CONFIG}: {', '.join(unknown)} unknown to peft {peft.__version__}, which "
            "may change what the adapter computes; upgrade peft"
        )
    return peft.LoraConfig(**{k: v for k, v in adapter.config.items() if k in known and k != "peft_type"})


def lora_module(parameter: str) -> str:
    """The module a LoRA parameter's lora_A wraps, by peft's naming: `...q_proj.lora_A.default.weight` ->
    `...q_proj`."""
    return parameter.rsplit(".lora_A.", 1)[0]


def attach_meta(model: Any, adapter: Adapter) -> Any:
    """`model` (on meta) with the adapter's LoRA layers, built by peft as PeftModel.from_pretrained builds them
    (adapter dtype autocast as its default does); returns the transformers model inside, whose module names are the
    base model's. Modifies `model`."""
    peft = require_peft()
    config = lora_config(adapter)
    with warnings.catch_warnings():  # peft notes that the meta model's name is not base_model_name_or_path
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    inner = wrapped.base_model.model
    built = {lora_module(name) for name in lora_parameters(inner) if ".lora_A." in name}
    stored = set(adapter.modules)
    if built != stored:  # peft would leave layers at their initial values, or ignore stored tensors, silently
        where = adapter.directory / ADAPTER_CONFIG
        extra, missing = sorted(built - stored), sorted(stored - built)
        raise BadInput(
            f"{where}: target_modules make peft wrap "
            + (f"{len(extra)} layers the file has no tensors for (e.g. {extra[0]})" if extra else "")
            + (" and " if extra and missing else "")
            + (f"not wrap {len(missing)} layers the file has tensors for (e.g. {missing[0]})" if missing else "")
            + f"; the config and {ADAPTER_WEIGHTS} do not belong together: {_remedy(adapter.directory)}"
        )
    return inner


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
