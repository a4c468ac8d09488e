"""api.load: a model loaded as a profile places it, after the checks oneke-run makes, cheapest first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oneke_plan.api.options import PathLike, Report
from oneke_plan.api.preflight import RunContext, preflight
from oneke_plan.extract.engines import load_checked
from oneke_plan.plan.profile import Profile

if TYPE_CHECKING:
    from oneke_plan.plan.inventory import Gpu


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
    The checks are oneke-run's, cheapest first: its preflight (the profile, the checkpoint, the adapter, the offload
    folder, this worker's replica), the machine matches the profile (else DoesNotFit; with `force`, each mismatch is
    a note), the device_map can run, the tokenizer loads, the checkpoint's tensor names are the model's; then the
    load, the weights per device (Report.weights_loaded), and one forward pass whose logits must be finite (else
    BadInput). Under torchrun, this worker's replica is loaded.
    `offload_dir` confirms a folder for disk-offloaded weights other than a new one inside the current folder.
    `adapter`: the LoRA adapter folder (default: the profile's, when it was planned with one), which must be the
    one planned with (DoesNotFit otherwise) and match the model's layers.
    """
    report = report or Report()
    context = preflight(
        profile,
        model=model,
        adapter=adapter,
        offload_dir=offload_dir,
        trust_remote_code=trust_remote_code,
        force=force,
        report=report,
    )
    gpus = check_machine_noted(context, report)
    loaded = load_checked(context.profile, context.source, trust_remote_code, report, context.adapter, gpus)
    return loaded.model, loaded.tokenizer


def check_machine_noted(context: RunContext, report: Report) -> tuple[Gpu, ...]:
    """machine.check_machine against the GPUs detected here, read once for the run (returned for the load's own
    check); with --force, each mismatch it lets through is a note."""
    from oneke_plan.load.machine import check_machine
    from oneke_plan.plan.inventory import detect_gpus

    gpus = detect_gpus()
    for problem in check_machine(context.profile, context.source, gpus, force=context.force):
        report.note(f"warning (--force): {problem}")
    return gpus
