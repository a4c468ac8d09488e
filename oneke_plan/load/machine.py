"""Does this machine match a profile: its GPUs' free memory and bfloat16 support, host memory, and the model's
config; and the oneke-plan command that re-plans for what is here.

The caller reads the GPUs once (inventory.detect_gpus) and hands them to both checks. The offload disk's room is
the loader's check alone: only it knows whether the load writes any weight there (a safetensors checkpoint is read
in place) and at which dtype.
"""

from __future__ import annotations

import shlex

from oneke_plan.core.errors import DoesNotFit
from oneke_plan.core.sizes import format_bytes
from oneke_plan.plan.inventory import Gpu, detected_cpu_bytes, runs_bf16
from oneke_plan.plan.memory import NO_QUANTIZATION
from oneke_plan.plan.model_source import ModelSource
from oneke_plan.plan.profile import Profile


def replan_command(profile: Profile, model: str, gpus: tuple[Gpu, ...]) -> str:
    """The oneke-plan command that plans the same model and workload for the GPUs found here."""
    w = profile.workload
    # Whole MiB, rounded down: a plan for slightly more than is free would be refused again.
    parts = ["oneke-plan", shlex.quote(model), *(f"--gpu {g.free_bytes // 2**20}MiB" for g in gpus)]
    parts += [
        f"--max-input-tokens {w.max_input_tokens}",
        f"--max-new-tokens {w.max_new_tokens}",
        f"--batch-size {w.batch_size}",
    ]
    quant = profile.quantization
    if quant.mode != "none":
        parts.append(f"--quantize {quant.mode}")
        if quant.mode == "4bit" and quant.quant_type != NO_QUANTIZATION.quant_type:  # oneke-plan's default
            parts.append(f"--quant-type {quant.quant_type}")
        if quant.mode == "4bit" and not quant.double_quant:
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
    planned_for = profile.model.config_fingerprint  # required by read_profile: this check always runs
    if planned_for != source.fingerprint:
        problems.append(
            f"the model's config.json differs from the one the profile was planned for ({profile.model.source})"
        )
    by_index = {g.index: g for g in gpus}
    for device in profile.devices:
        estimate = profile.estimate_on(device.id)
        # The reserve covers this process's own CUDA context and host libraries, which already exist when free
        # memory is read here, so free memory must cover the rest of the plan. Nominal sizes are not compared:
        # a "24 GiB" card reports a little less, and free memory is what decides.
        needed = estimate.total_bytes - estimate.reserve_bytes
        if isinstance(device.id, int):
            gpu = by_index.get(device.id)
            if gpu is None:
                have = f"{len(gpus)} GPU(s)" if gpus else "no CUDA GPU"
                problems.append(f"the profile places modules on GPU {device.id}, but this machine has {have}")
            elif profile.dtype == "bfloat16" and not runs_bf16(gpu):
                problems.append(
                    f"GPU {device.id} ({gpu.name}, compute capability {gpu.capability_text}) cannot run bfloat16, "
                    "the profile's dtype; re-plan (float16 there)"
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
    return problems


def check_machine(profile: Profile, source: ModelSource, gpus: tuple[Gpu, ...], force: bool = False) -> list[str]:
    """Refuse (DoesNotFit, exit 3) when the machine (`gpus`: detect_gpus's, read once per run) or the model does not
    match; with force, return the problems."""
    problems = machine_problems(profile, source, gpus, detected_cpu_bytes())
    if problems and not force:
        raise DoesNotFit(
            "this machine does not match the profile:\n  - "
            + "\n  - ".join(problems)
            + f"\nre-plan for it with:\n  {replan_command(profile, source.name, gpus)}\n(or pass --force to try anyway)"
        )
    return problems


def check_gpus_present(profile: Profile, source: ModelSource, gpus: tuple[Gpu, ...]) -> None:
    """With --force the machine check is skipped, but weights still cannot go to a GPU torch does not see: say so
    in one line (DoesNotFit, exit 3) instead of letting torch fail deep inside the load."""
    wanted = sorted({d for d in profile.device_map.values() if isinstance(d, int)})
    if not wanted:
        return
    have = {g.index for g in gpus}
    absent = [d for d in wanted if d not in have]
    if absent:
        seen = f"torch sees {len(gpus)} CUDA GPU(s)" if gpus else "torch sees no CUDA GPU here"
        raise DoesNotFit(
            f"cannot load: the profile puts weights on GPU {', '.join(map(str, absent))} and {seen} (--force skips "
            f"the machine check, not the hardware); re-plan with: {replan_command(profile, source.name, gpus)}"
        )
