"""api.load: a model loaded as a profile places it, after the checks oneke-run makes, cheapest first."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan.api.checks import (
    checkpoint_source,
    offload_folder,
    run_adapter,
    workers_profile,
)
from oneke_plan.api.options import PathLike, Report
from oneke_plan.extract.engines import load_checked
from oneke_plan.measure.compat import stay_offline
from oneke_plan.plan.profile import Profile, read_profile

if TYPE_CHECKING:
    from oneke_plan.plan.model_source import ModelSource


def load(
    profile: Profile | PathLike,
    model: PathLike | None = None,
    *,
    offload_dir: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    adapter: PathLike | None = None,
    report: Report | None = None,
) -> tuple[Any, Any]:
    """Load a model exactly as `profile` (a Profile, or a profile file) places it; returns (model, tokenizer).

    `model`: the checkpoint directory or a cached repo id (default: the profile's source, when it is a directory).
    The checks are oneke-run's, cheapest first: the machine matches the profile (else DoesNotFit; with `force`, each
    mismatch is a note), the device_map can run, the offload folder is usable, the tokenizer loads, the
    checkpoint's tensor names are the model's; then the load, the weights per device (Report.weights_loaded), and
    one forward pass whose logits must be finite (else BadInput). Under torchrun, this worker's replica is loaded.
    `offload_dir` confirms a folder for disk-offloaded weights other than a new one inside the current folder.
    `adapter`: the LoRA adapter folder (default: the profile's, when it was planned with one), which must be the
    one planned with (DoesNotFit otherwise) and match the model's layers.
    """
    from oneke_plan.extract.workers import Worker

    report = report or Report()
    stay_offline()  # local files only: no library may reach the network (compat.stay_offline)
    profile = profile if isinstance(profile, Profile) else read_profile(Path(profile))
    source = checkpoint_source(profile, model, trust_remote_code)
    found = run_adapter(profile, adapter)
    profile = replace(profile, offload_dir=offload_folder(profile.offload_dir, offload_dir))
    profile = workers_profile(profile, Worker.from_env())
    check_machine_noted(profile, source, force, report)
    return load_checked(profile, source, trust_remote_code, report, found)


def check_machine_noted(profile: Profile, source: ModelSource, force: bool, report: Report) -> None:
    """machine.check_machine; with `force`, each mismatch it lets through is a note."""
    from oneke_plan.load.machine import check_machine

    for problem in check_machine(profile, source, force=force):
        report.note(f"warning (--force): {problem}")
