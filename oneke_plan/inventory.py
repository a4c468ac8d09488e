"""The machine: GPUs (detected, described with --gpu, or read from a YAML file), CPU memory and disk offload.

Device ids follow accelerate's device_map: an int for a GPU (its index after CUDA_VISIBLE_DEVICES), "cpu", "disk".
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneke_plan.catalog import card_names, find_card
from oneke_plan.errors import BadInput
from oneke_plan.sizes import SizeError, parse_size
from oneke_plan.yamlfile import read_yaml

DeviceId = int | str
BF16_MIN_CAPABILITY = (8, 0)  # bfloat16 kernels need Ampere or later


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int  # what the planner may use; equals total for a described card
    compute_capability: tuple[int, int] | None

    @property
    def capability_text(self) -> str | None:
        """The compute capability as profiles, inventories and messages write it, MAJOR.MINOR ('8.6'); None if
        unknown."""
        return None if self.compute_capability is None else "{}.{}".format(*self.compute_capability)


def runs_bf16(gpu: Gpu) -> bool:
    """Whether a GPU runs bfloat16 kernels: compute capability 8.0 (Ampere) or later; unknown counts as yes."""
    return gpu.compute_capability is None or gpu.compute_capability >= BF16_MIN_CAPABILITY


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    cpu_bytes: int  # host memory the model may use; 0 = no CPU offload
    offload_dir: str | None = None  # disk offload is enabled when set
    disk_bytes: int | None = None  # free space in offload_dir
    source: str = "described"  # "detected", "described" or the inventory file's path
    notes: tuple[str, ...] = field(default=())

    @property
    def device_ids(self) -> list[DeviceId]:
        ids: list[DeviceId] = [g.index for g in self.gpus]
        if self.cpu_bytes > 0 or not self.gpus:
            ids.append("cpu")
        if self.offload_dir is not None:
            ids.append("disk")
        return ids


def detected_cpu_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes): what a new process can take without swapping."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 0


def detect_gpus() -> tuple[Gpu, ...]:
    """The CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies), with free memory from the driver."""
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(Gpu(index, props.name, int(total), int(free), (props.major, props.minor)))
    return tuple(gpus)


def parse_gpu_spec(spec: str, index: int) -> Gpu:
    """One `--gpu` value: a size ('24GiB'), a catalog card ('RTX 3090'), or 'CARD:SIZE' to override its memory."""
    text = spec.strip()
    card = find_card(text)
    if card is not None:
        return Gpu(index, card.name, card.total_bytes, card.total_bytes, card.compute_capability)
    name, has_name, size_text = text.rpartition(":")
    base = find_card(name) if has_name else None
    if has_name and base is None:
        raise BadInput(f"--gpu {spec!r}: unknown card {name!r}; known cards: {', '.join(card_names())}")
    try:
        total = parse_size(size_text)
    except SizeError:
        if has_name or text[:1].isdigit() or text[:1] in "-+.":
            raise BadInput(
                f"--gpu {spec!r}: not a size; write e.g. --gpu 24GiB (binary) or --gpu 24GB (decimal)"
            ) from None
        raise BadInput(
            f"--gpu {spec!r}: unknown card; give a size such as 24GiB, or one of: {', '.join(card_names())}"
        ) from None
    if total == 0:
        raise BadInput(f"--gpu {spec!r}: a GPU with 0 bytes holds nothing; give its memory, e.g. 24GiB")
    if base is not None:
        return Gpu(index, base.name, total, total, base.compute_capability)
    return Gpu(index, f"GPU {index}", total, total, None)


def _size_field(value: Any, where: str) -> int:
    try:
        return parse_size(value)
    except SizeError as exc:
        raise BadInput(f"{where}: {exc}") from None


def read_inventory_file(path: Path) -> tuple[tuple[Gpu, ...], int | None, str | None]:
    """An inventory YAML: `gpus: [{name?, memory?}]`, optional `cpu_memory`, `offload_dir`.

    Each GPU gives a catalog `name`, a `memory` size, or both (memory wins). Read with yaml.safe_load only.
    """
    data = read_yaml(path, "inventory file", "see docs/profile-format.md for the inventory format")
    if not isinstance(data, dict) or not isinstance(data.get("gpus", []), list):
        raise BadInput(f"{path}: expected a mapping with a 'gpus' list, e.g. gpus: [{{memory: 24GiB}}]")
    gpus = []
    for i, entry in enumerate(data.get("gpus") or []):
        where = f"{path}: gpus[{i}]"
        if isinstance(entry, str):
            gpus.append(parse_gpu_spec(entry, i))
            continue
        if not isinstance(entry, dict) or not ({"name", "memory"} & entry.keys()):
            raise BadInput(f"{where}: give a card name or a memory size, e.g. {{name: RTX 3090}} or {{memory: 24GiB}}")
        name = str(entry.get("name", ""))
        card = find_card(name) if name else None
        if name and card is None and "memory" not in entry:
            raise BadInput(f"{where}: unknown card {name!r}; add memory: SIZE or use one of: {', '.join(card_names())}")
        total = _size_field(entry["memory"], where + ".memory") if "memory" in entry else card.total_bytes  # type: ignore[union-attr]
        if total == 0:
            raise BadInput(f"{where}.memory: a GPU with 0 bytes holds nothing")
        cc = card.compute_capability if card else None
        if "compute_capability" in entry:
            try:
                major, minor = (int(x) for x in str(entry["compute_capability"]).split("."))
                cc = (major, minor)
            except ValueError:
                raise BadInput(f"{where}.compute_capability: write it as MAJOR.MINOR, e.g. 8.6") from None
        gpus.append(Gpu(i, name or (card.name if card else f"GPU {i}"), total, total, cc))
    cpu = _size_field(data["cpu_memory"], f"{path}: cpu_memory") if "cpu_memory" in data else None
    offload = data.get("offload_dir")
    return tuple(gpus), cpu, (str(offload) if offload is not None else None)


def build_inventory(
    gpu_specs: list[str] | None = None,
    inventory_file: Path | None = None,
    cpu_memory: str | int | None = None,
    offload_dir: str | None = None,
) -> Inventory:
    """Combine the three ways of naming GPUs with the CPU and disk options. Described GPUs win over detection.

    Host memory holds weights only when asked (--cpu-memory, or the inventory file's cpu_memory): offloaded
    weights cross PCIe at every decoding step, and a described machine's RAM is not this machine's. A machine
    without GPUs computes on the CPU, with the memory available here when it is detected.
    """
    if gpu_specs and inventory_file:
        raise BadInput("give either --gpu or --inventory, not both")
    cpu_bytes: int | None = None
    if inventory_file is not None:
        gpus, cpu_bytes, file_offload = read_inventory_file(inventory_file)
        offload_dir = offload_dir or file_offload
        source = str(inventory_file)
    elif gpu_specs:
        gpus = tuple(parse_gpu_spec(spec, i) for i, spec in enumerate(gpu_specs))
        source = "described"
    else:
        gpus = detect_gpus()
        source = "detected"
    if cpu_memory is not None:
        try:
            cpu_bytes = parse_size(cpu_memory)
        except SizeError as exc:
            raise BadInput(f"--cpu-memory: {exc}") from None
    if cpu_bytes is None:
        if gpus:
            cpu_bytes = 0
        elif source == "detected":
            cpu_bytes = detected_cpu_bytes()
        else:
            raise BadInput(
                f"{source}: describes no GPU and no cpu_memory, so there is nothing to plan for; add GPUs, or "
                "cpu_memory: SIZE (or --cpu-memory SIZE) to plan for the CPU alone"
            )
    disk_bytes = None
    if offload_dir is not None:
        if Path(offload_dir).expanduser().exists() and not Path(offload_dir).expanduser().is_dir():
            raise BadInput(f"offload folder {offload_dir}: is a file, not a folder; give another --offload-dir")
        parent = Path(offload_dir).expanduser()
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        disk_bytes = shutil.disk_usage(parent).free
    return Inventory(gpus, cpu_bytes, offload_dir, disk_bytes, source)
