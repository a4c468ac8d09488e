"""The API's checks of what it is given, before any work: choices, sizes, output paths, limits against the profile,
the checkpoint to load, the offload folder, the adapter, the workers' replica. Each refuses with one BadInput line
that says what to do (DoesNotFit for an adapter that is not the planned one); a few also put what passed into the
form the flows use (a repeated flag as a list, a schema as JSON text, the profile of this worker's replica)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.options import PathLike, Report
from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import SizeError, parse_size
from oneke_plan.formats.templates import TEMPLATES
from oneke_plan.plan.profile import Profile

if TYPE_CHECKING:
    from oneke_plan.extract.workers import Worker
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.model_source import ModelSource


def one_of(flag: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise BadInput(f"{flag} {value!r}: give one of {', '.join(repr(a) for a in allowed if a is not None)}")


def listed(value: Any) -> list[Any]:
    """A flag that may be given once or repeated: None -> [], one value -> [value], a list as it is."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def size_bytes(flag: str, value: str | int) -> int:
    """`value` in bytes: an int as it is, a string such as "24GiB" parsed (BadInput naming `flag` otherwise)."""
    try:
        return parse_size(value)
    except SizeError as exc:
        raise BadInput(f"{flag}: {exc}") from None


def replica_count(replicas: int | str) -> int | str:
    """A number of replicas, or "auto"."""
    if replicas == "auto" or isinstance(replicas, int):
        return replicas
    try:
        return int(replicas)
    except ValueError:
        raise BadInput(f"--replicas {replicas!r}: give a number of replicas, or auto") from None


def output_target(
    path: Path,
    flag: str,
    overwrite: bool,
    model_dir: Path | None,
    ours: Callable[[Path], bool],
    what: str,
    suffix: str,
) -> os.stat_result | None:
    """Check an output path (`-o`, `--plot`) before planning; return what it is now (None: absent) for the write
    to confirm.

    Replaced only if it is a regular single-link file (oneke_plan.io.files) and `ours` (a `what` oneke-plan wrote), or
    --overwrite says so; a file of the model's own directory never. `suffix`: the file kind's, for the example name.
    """
    from oneke_plan.io.files import replaceable_stat

    if path.is_dir():
        raise BadInput(f"{flag} {path}: is a folder; give a file name such as {path}/machine{suffix}")
    existing = replaceable_stat(path, flag)
    if existing is None:
        return None
    if model_dir is not None and Path(model_dir).resolve() in path.resolve().parents:
        raise BadInput(
            f"{flag} {path}: is a file of the model {model_dir}; oneke-plan never replaces it: choose another path"
        )
    if not overwrite and not ours(path):
        raise BadInput(
            f"{flag} {path}: exists and is not {what} written by oneke-plan; choose another path, or pass --overwrite "
            "to replace it"
        )
    return existing


def json_text(value: str | list[Any] | dict[str, Any]) -> str:
    """A schema or example as oneke-run's flags give it: text (inline JSON or a file name) as it is, else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def planned(flag: str, value: int | None, planned: int) -> int:
    """`value` (default: the profile's `planned`), a positive integer no larger than what the profile planned."""
    if value is None:
        return planned
    if value <= 0:
        raise BadInput(f"{flag} must be a positive integer, not {value}")
    if value > planned:
        raise BadInput(
            f"{flag} {value} is more than the profile planned for ({planned}); re-plan with "
            f"oneke-plan ... {flag} {value}"
        )
    return value


def output_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise BadInput("--resume keeps the answers in --output, --overwrite replaces them: give one of them")
    return "resume" if resume else "overwrite" if overwrite else "new"


def model_source(name: str) -> ModelSource:
    """plan.model_source.resolve_model, with GGUF files read through transformers (measure.gguf.read_gguf)."""
    from oneke_plan.measure.gguf import read_gguf
    from oneke_plan.plan.model_source import resolve_model

    return resolve_model(name, read_gguf)


def checkpoint_source(profile: Profile, model: PathLike | None, trust_remote_code: bool) -> ModelSource:
    """The checkpoint to load: `model`, else the profile's source; never the built-in config (it has no weights)."""
    if trust_remote_code and not model:
        raise BadInput("--trust-remote-code runs code from the model directory: name it yourself with --model")
    model_name = model or profile.model.source
    if not model_name or model_name == "oneke":
        raise BadInput(
            "the profile was planned from the built-in OneKE config, which has no weights: pass "
            "--model DIR (OneKE's checkpoint directory) or --model zjunlp/OneKE (from the local cache)"
        )
    try:
        return model_source(str(model_name))
    except BadInput:
        if model or Path(str(model_name)).expanduser().exists():
            raise
        # oneke-plan records a model directory as it was typed: a relative one is relative to where it ran
        raise BadInput(
            f"the profile's model.source {model_name!r} (the default --model) is neither a folder here "
            f"({Path.cwd()}) nor a repo id in the local Hugging Face cache; pass --model with the model's directory"
        ) from None


def offload_folder(from_profile: str | None, from_caller: str | None) -> str | None:
    """The folder disk-offloaded weights are written to. A profile is data from elsewhere: it may name a relative
    folder under the current one, but writing anywhere else takes the user's own --offload-dir."""
    if from_caller is not None:
        return from_caller
    if from_profile is None:
        return None
    path = Path(from_profile)
    inside = not path.is_absolute() and Path.cwd() in (Path.cwd() / path).resolve().parents
    # Only a new folder, or one that holds nothing but an earlier offload (accelerate's index.json and .dat files).
    ours = not path.exists() or (
        path.is_dir() and all(f.name == "index.json" or f.suffix == ".dat" for f in path.iterdir())
    )
    if not (inside and ours):
        raise BadInput(
            f"the profile offloads weights to {from_profile!r}, which is outside the current folder or holds other "
            f"files; pass --offload-dir {from_profile} to confirm, or another folder"
        )
    return from_profile


def read_adapter(directory: PathLike) -> Adapter:
    """The adapter folder, read and fingerprinted, once peft is known to be there (BadInput otherwise)."""
    from oneke_plan.measure.adapter import read_adapter, require_peft

    require_peft()
    return read_adapter(Path(directory))


def run_adapter(profile: Profile, adapter: PathLike | None) -> Adapter | None:
    """The adapter oneke-run applies: `adapter`, else the one the profile was planned with; it must be that one
    (adapter.check_recorded: DoesNotFit)."""
    from oneke_plan.measure.adapter import check_recorded

    if adapter is None and profile.adapter is None:
        return None
    found = read_adapter(adapter if adapter is not None else profile.adapter.path)  # type: ignore[union-attr]
    check_recorded(found, profile.adapter)
    return found


def workers_profile(profile: Profile, worker: Worker) -> Profile:
    """The profile this process runs: under torchrun (or with a profile of several replicas) the workers must be
    the profile's replicas on its nodes, and each runs its own replica."""
    if worker.distributed or profile.replicas:
        worker.check(profile.replica_count, profile.nodes)
        return profile.replica(worker.local_rank)
    return profile


def with_template(profile: Profile, template: str | None, report: Report) -> Profile:
    """The profile with `template` (oneke-run's --template) for its prompts instead of the one it records."""
    if template is None or template == profile.template:
        return profile
    one_of("--template", template, tuple(TEMPLATES))
    report.note(f"--template {template}: prompts use it instead of the profile's {profile.template}")
    return replace(profile, template=template)
