"""oneke-run's checks before anything slow, in one place and one order: api.run, api.load and api.extract all start
with `preflight`, which returns the RunContext the rest of the run reads.

Why one order, cheapest first: a run loads minutes of weights and then answers for hours, so every mistake that can
be found in milliseconds (a limit above the plan, both --resume and --overwrite, an adapter of another base) must be
found before anything that takes seconds (resolving the checkpoint reads its config; an adapter is hashed), and
everything before the output is locked and the machine is read. Each check runs once; each refuses in one line that
says what to do (BadInput, exit 2; DoesNotFit, exit 3, for a machine or adapter that is not the planned one).

    step                                        flags                               refuses with
    1  the engine is one oneke-run has          --engine                            BadInput
    2  the profile reads and validates          --profile                           BadInput
    3  batch and answer length within the plan  --batch-size, --max-new-tokens      BadInput
    4  the prompts' template                    --template                          (a note when it overrides)
    5  keep or replace the output, not both     --resume, --overwrite               BadInput
    6  the checkpoint: named, or the profile's  --model, --trust-remote-code        BadInput
    7  the adapter: valid, the planned one      --adapter                           BadInput, DoesNotFit
    8  where disk-offloaded weights may go      --offload-dir                       BadInput
    9  this worker's replica                    torchrun's variables                BadInput
    10 the engine can run this profile          --engine (vllm: its translation)    BadInput

api.extract, whose caller loaded the model, makes steps 3 and 5 with the same functions. After the
preflight, api.run reads the input, locks the output, checks the machine, and starts the engine (the tokenizer, the
checkpoint's tensor names, the adapter against the model's layers, the load, the weights per device, one finite
forward), in that order. (Step 7 checks what the adapter's files say on their own: adapter_config.json's fields, the
safetensors header, the tensors against the config; measure.adapter.check_base the rest before the load.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from oneke_plan.api.checks import model_reads, model_source, one_of
from oneke_plan.api.options import PathLike, Report
from oneke_plan.core.errors import BadInput
from oneke_plan.formats.templates import TEMPLATES
from oneke_plan.io.files import Reads
from oneke_plan.measure.compat import stay_offline
from oneke_plan.plan.profile import Profile, read_profile

if TYPE_CHECKING:
    from oneke_plan.extract.engines import CheckedEngine
    from oneke_plan.extract.workers import Worker
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.model_source import ModelSource


@dataclass(frozen=True)
class RunContext:
    """What a run is, once every cheap check has passed. `profile` is the one this process runs: its replica under
    torchrun, with the run's template and offload folder. `engine`: the engine whose check passed, with what the
    check prepared for its start. `output_mode`: "new" (refuse an existing output), "resume" or "overwrite".
    `reads`: the files and folders the run reads (the profile, the model, the adapter, the offload folder), which
    no output may be (api.run adds the input, schema and example files)."""

    profile: Profile
    source: ModelSource
    adapter: Adapter | None
    engine: CheckedEngine
    batch_size: int
    max_new_tokens: int
    output_mode: str
    worker: Worker
    trust_remote_code: bool = False
    force: bool = False
    reads: Reads = Reads()


def preflight(
    profile: Profile | PathLike,
    *,
    model: PathLike | None = None,
    adapter: PathLike | None = None,
    offload_dir: str | None = None,
    template: str | None = None,
    engine: str = "hf",
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    force: bool = False,
    report: Report,
) -> RunContext:
    """The module docstring's steps, in its order."""
    from oneke_plan.extract.engines import ENGINES, check_engine
    from oneke_plan.extract.workers import Worker

    stay_offline()  # local files only: no library may reach the network (compat.stay_offline)
    one_of("--engine", engine, ENGINES)
    profile_file = None if isinstance(profile, Profile) else Path(profile)
    profile = profile if isinstance(profile, Profile) else read_profile(Path(profile))
    batch = within_plan("--batch-size", batch_size, profile.workload.batch_size)
    max_new = within_plan("--max-new-tokens", max_new_tokens, profile.workload.max_new_tokens)
    profile = with_template(profile, template, report)
    mode = output_mode(resume, overwrite)
    source = checkpoint_source(profile, model, trust_remote_code)
    found = run_adapter(profile, adapter)
    profile = replace(profile, offload_dir=offload_folder(profile.offload_dir, offload_dir))
    worker = Worker.from_env(replicas=profile.replica_count, nodes=profile.nodes)
    profile = profile.replica(worker.local_rank)  # this worker's (one process: replica 0, or the whole profile)
    checked = check_engine(engine, profile, source, trust_remote_code)
    reads = model_reads(source, Reads().file(profile_file, "the profile"))
    reads = reads.folder(found.directory if found is not None else None, "the adapter's folder")
    reads = reads.folder(profile.offload_dir, "the offload folder")
    return RunContext(profile, source, found, checked, batch, max_new, mode, worker, trust_remote_code, force, reads)


def within_plan(flag: str, value: int | None, planned: int) -> int:
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


def with_template(profile: Profile, template: str | None, report: Report) -> Profile:
    """The profile with `template` (oneke-run's --template) for its prompts instead of the one it records."""
    if template is None or template == profile.template:
        return profile
    one_of("--template", template, tuple(TEMPLATES))
    report.note(f"--template {template}: prompts use it instead of the profile's {profile.template}")
    return replace(profile, template=template)


def output_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise BadInput("--resume keeps the answers in --output, --overwrite replaces them: give one of them")
    return "resume" if resume else "overwrite" if overwrite else "new"


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


def run_adapter(profile: Profile, adapter: PathLike | None) -> Adapter | None:
    """The adapter oneke-run applies: `adapter`, else the one the profile was planned with; it must be that one
    (DoesNotFit otherwise: another base's, or changed files)."""
    from oneke_plan.api.checks import checked_adapter
    from oneke_plan.measure.adapter import check_recorded

    if adapter is None and profile.adapter is None:
        return None
    found = checked_adapter(adapter if adapter is not None else profile.adapter.path)  # type: ignore[union-attr]
    check_recorded(found, profile.adapter)
    return found


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
