"""The machine: GPUs (detected, described with --gpu, or read from a YAML file), CPU memory and disk offload.

Device ids follow accelerate's device_map: an int for a GPU (its index after CUDA_VISIBLE_DEVICES), "cpu", "disk".
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import NumberError, SizeError, format_bytes, parse_int, parse_number, parse_size
from oneke_plan.io.yamlfile import read_yaml
from oneke_plan.plan.catalog import GB_PER_S, TFLOPS, CardSpec, card_names, find_card

DeviceId = int | str
BF16_MIN_CAPABILITY = (8, 0)  # bfloat16 kernels need Ampere or later


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int  # what the planner may use; equals total for a described card
    compute_capability: tuple[int, int] | None
    reserve_bytes: int | None = None  # this card's runtime reserve; None: the plan's default (--reserve SIZE)
    bandwidth_bytes_per_second: int | None = None  # memory bandwidth (catalog or user); None: unknown
    flops_per_second: int | None = None  # dense 16-bit tensor throughput (catalog or user); None: unknown
    bandwidth_source: str = ""  # where the bandwidth figure comes from
    flops_source: str = ""  # where the throughput figure comes from
    memory_source: str = ""  # a named card's memory taken from the catalog: which figure and why (memory_basis)

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
    cpu_bandwidth_bytes_per_second: int | None = None  # host memory bandwidth, when the user gives it
    cpu_flops_per_second: int | None = None  # host matmul throughput, when the user gives it
    cpu_reserve_bytes: int | None = None  # host memory the process needs besides weights; None: the default


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
        gpu = Gpu(index, props.name, int(total), int(free), (props.major, props.minor))
        card = find_card(props.name)  # the driver's name ("NVIDIA GeForce RTX 3090"): its vendor speed figures
        if card is not None:
            gpu = with_catalog_rates(gpu, card)
        gpus.append(gpu)
    return tuple(gpus)


def parse_gpu_spec(spec: str | float, index: int, flag: str = "--gpu") -> Gpu:
    """One `--gpu` value (or an inventory's `gpus` entry written the same way, `flag` naming it): a size ('24GiB'),
    a catalog card ('RTX 3090'), or 'CARD:SIZE' to override its memory. A bare number is neither (BARE_NUMBER)."""
    text = str(spec).strip(" \t")  # ASCII spaces: str.strip() takes U+3000 and NBSP too
    if BARE_NUMBER.match(text):
        raise BadInput(bare_gpu_number(f"{flag} {text}", text))
    card = find_card(text)
    if card is not None:
        return catalog_gpu(index, card)
    name, has_name, size_text = text.rpartition(":")
    base = find_card(name) if has_name else None
    if has_name and base is None:
        raise BadInput(f"{flag} {spec!r}: unknown card {name!r}; known cards: {', '.join(card_names())}")
    if has_name and BARE_NUMBER.match(size_text):
        raise BadInput(bare_gpu_number(f"{flag} {spec!r}", size_text.strip(), f"{name}:"))
    try:
        total = parse_size(size_text)
    except SizeError:
        if has_name or text[:1].isdigit() or text[:1] in "-+.":
            raise BadInput(f"{flag} {spec!r}: not a size; write e.g. 24GiB (binary) or 24GB (decimal)") from None
        raise BadInput(
            f"{flag} {spec!r}: unknown card; give a size such as 24GiB, or one of: {', '.join(card_names())}"
        ) from None
    if total == 0:
        raise BadInput(f"{flag} {spec!r}: a GPU with 0 bytes holds nothing; give its memory, e.g. 24GiB")
    if base is not None:
        return catalog_gpu(index, base, total)
    return Gpu(index, f"GPU {index}", total, total, None)


BARE_NUMBER = re.compile(r"^\s*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*$")
"""A number without a unit. A GPU's memory is never read from one (`--gpu 24`, an inventory's `memory: 24`):
people mean 24 GiB, or a card (`--gpu 4090`), far more often than bytes. The other sizes (--cpu-memory, --reserve,
an inventory's cpu_memory and reserve) read a bare integer as bytes, as accelerate's max_memory does."""


def bare_gpu_number(where: str, number: str, prefix: str = "") -> str:
    """The message for a GPU's memory given as a bare number: the size it likely meant, or the card whose name
    holds the number (4090: 'RTX 4090')."""
    named = [name for name in card_names() if re.search(rf"(?<![0-9A-Za-z]){re.escape(number)}(?![0-9A-Za-z])", name)]
    if named and not prefix:
        return (
            f"{where}: a bare number is not a card; write {named[0]!r} for that card, or a size such as 24GiB "
            "(oneke-plan --list-cards)"
        )
    size = f"{prefix}{number}GiB for a {number} GiB card" if float(number) else f"a size such as {prefix}24GiB"
    return f"{where}: a bare number is not a {'size' if prefix else 'card'}; write {size}" + (
        "" if prefix else ", or a card name such as 'RTX 4090' (oneke-plan --list-cards)"
    )


def catalog_gpu(index: int, card: CardSpec, total: int | None = None) -> Gpu:
    """A GPU known to the catalog: its compute capability and vendor speed figures. Its memory is the user's
    `total` when given ('RTX 3090:20GiB', an inventory's memory), else the catalog's (CardSpec.total_bytes), and
    then the GPU says which figure that is (memory_source, a line of the plan's log)."""
    source = card.memory_basis if total is None else ""
    total = card.total_bytes if total is None else total
    gpu = Gpu(index, card.name, total, total, card.compute_capability, memory_source=source)
    return with_catalog_rates(gpu, card)


def with_catalog_rates(gpu: Gpu, card: CardSpec) -> Gpu:
    """`gpu` with the catalog's bandwidth and throughput for `card`, each with its source (None stays unknown)."""
    source = f"catalog ({card.source})"
    return replace(
        gpu,
        bandwidth_bytes_per_second=card.bandwidth_bytes_per_second,
        flops_per_second=card.flops_per_second,
        bandwidth_source=source if card.bandwidth_bytes_per_second else "",
        flops_source=source if card.flops_per_second else "",
    )


def _card_settings(gpu: Gpu, entry: dict[str, Any], where: str) -> Gpu:
    """An inventory entry's own reserve, bandwidth (GB/s) and throughput (TFLOPS), when it gives them."""
    if "reserve" in entry:
        gpu = replace(gpu, reserve_bytes=_size_field(entry["reserve"], where + ".reserve"))
    if "bandwidth" in entry:
        rate = parse_rate(entry["bandwidth"], GB_PER_S, f"{where}.bandwidth", "GB/s")
        gpu = replace(gpu, bandwidth_bytes_per_second=rate, bandwidth_source=f"{where}.bandwidth")
    if "tflops" in entry:
        rate = parse_rate(entry["tflops"], TFLOPS, f"{where}.tflops", "TFLOPS")
        gpu = replace(gpu, flops_per_second=rate, flops_source=f"{where}.tflops")
    return gpu


def parse_rate(value: Any, unit: int, where: str, unit_name: str) -> int:
    """A positive number of `unit_name` (e.g. 936 GB/s) -> an int per second (bytes or FLOP)."""
    try:
        number = parse_number(value, where)
    except NumberError:
        number = float("nan")
    if not (0 < number < 1e9):  # also refuses nan and inf
        example = {"GB/s": 936, "TFLOPS": 71}.get(unit_name, 1)  # an RTX 3090's (catalog.py)
        raise BadInput(f"{where}: {value!r} is not a positive number of {unit_name}, e.g. {example}")
    return int(number * unit)


@dataclass(frozen=True)
class DeviceValues:
    """A flag given as `VALUE` (every GPU) and/or `DEVICE=VALUE` (one GPU, or `cpu`), repeatable."""

    every_gpu: int | None = None
    per_device: tuple[tuple[DeviceId, int], ...] = ()
    spelled: tuple[tuple[DeviceId | None, str], ...] = ()  # how each was given ('--reserve 1=3GiB'); None: every GPU

    def get(self, device: DeviceId) -> int | None:
        """The value for `device`: its own, else (for a GPU) the every-GPU one, else None."""
        own = dict(self.per_device).get(device)
        return own if own is not None else self.every_gpu if isinstance(device, int) else None


def parse_device_values(flag: str, values: Sequence[str | int], parse: Callable[[Any, str], int]) -> DeviceValues:
    """`--reserve 2GiB --reserve 1=3GiB --reserve cpu=4GiB`: one value for every GPU, then per device. `parse`
    turns one value into an int (BadInput naming where); a device given twice is refused."""
    every: int | None = None
    per_device: dict[DeviceId, int] = {}
    spelled: dict[DeviceId | None, str] = {}
    for value in values:
        text = str(value).strip(" \t")
        device_text, has_device, amount = text.rpartition("=")
        where = f"{flag} {text}"
        if not has_device:
            if every is not None:
                raise BadInput(f"{where}: {flag} for every GPU is given twice; give it once (or DEVICE=VALUE)")
            every = parse(value if isinstance(value, int) else amount, where)
            spelled[None] = where
            continue
        device: DeviceId
        if device_text.strip(" \t").lower() == "cpu":
            device = "cpu"
        else:
            try:
                device = parse_int(device_text, "GPU index")
            except NumberError:
                raise BadInput(
                    f"{where}: {device_text!r} is not a GPU index or cpu (digits 0-9: 0, 1, ...); "
                    f"write e.g. {flag} 1=VALUE"
                ) from None
        if device in per_device:
            raise BadInput(f"{where}: device {device} is given twice")
        per_device[device] = parse(amount, where)
        spelled[device] = where
    return DeviceValues(every, tuple(per_device.items()), tuple(spelled.items()))


def apply_device_values(
    inventory: Inventory,
    reserve: DeviceValues = DeviceValues(),
    bandwidth: DeviceValues = DeviceValues(),
    flops: DeviceValues = DeviceValues(),
) -> Inventory:
    """The machine with the command line's per-device settings: a GPU's own (`1=...`) wins over the every-GPU
    value, and both win over the inventory file's and the catalog's (the command line wins, as with
    --offload-dir). A GPU index the machine does not have is refused."""
    indexes = {g.index for g in inventory.gpus}
    for flag, values in (("--reserve", reserve), ("--bandwidth", bandwidth), ("--tflops", flops)):
        for device, _ in values.per_device:
            if isinstance(device, int) and device not in indexes:
                have = ", ".join(map(str, sorted(indexes))) or "none"
                raise BadInput(f"{flag} {device}=...: there is no GPU {device} (GPUs planned for: {have})")

    def source(values: DeviceValues, device: int, flag: str) -> str:
        return f"{flag} {device}=..." if device in dict(values.per_device) else flag

    gpus = []
    for gpu in inventory.gpus:
        i = gpu.index
        if reserve.get(i) is not None:
            gpu = replace(gpu, reserve_bytes=reserve.get(i))
        if bandwidth.get(i) is not None:
            gpu = replace(
                gpu, bandwidth_bytes_per_second=bandwidth.get(i), bandwidth_source=source(bandwidth, i, "--bandwidth")
            )
        if flops.get(i) is not None:
            gpu = replace(gpu, flops_per_second=flops.get(i), flops_source=source(flops, i, "--tflops"))
        gpus.append(gpu)
    return replace(
        inventory,
        gpus=tuple(gpus),
        cpu_reserve_bytes=reserve.get("cpu") if reserve.get("cpu") is not None else inventory.cpu_reserve_bytes,
        cpu_bandwidth_bytes_per_second=bandwidth.get("cpu") or inventory.cpu_bandwidth_bytes_per_second,
        cpu_flops_per_second=flops.get("cpu") or inventory.cpu_flops_per_second,
    )


def check_reserves(inventory: Inventory, reserve: DeviceValues, cpu_memory_where: str) -> None:
    """Refuse a reserve the user gave (--reserve, an inventory card's reserve) that leaves its device nothing: as
    large as the memory the plan may use there, or larger. The plan would put nothing on that device, and its
    message would be about fitting (and advise CPU offload) when the mistake is the reserve. The default reserves
    are not checked here: a small card beside large ones may stay empty. `cpu_memory_where`: how the host memory
    was given (--cpu-memory X, the inventory file's cpu_memory, the memory available here)."""
    given = dict(reserve.spelled)
    for gpu in inventory.gpus:
        where = given.get(gpu.index) or given.get(None)
        if where is None and gpu.reserve_bytes is not None:
            where = f"{inventory.source}: gpus[{gpu.index}].reserve {format_bytes(gpu.reserve_bytes)}"
        if where is None or gpu.reserve_bytes is None or gpu.reserve_bytes < gpu.free_bytes:
            continue
        free = " free" if gpu.free_bytes != gpu.total_bytes else ""
        verb = "exceeds" if gpu.reserve_bytes > gpu.free_bytes else "takes all of"
        raise BadInput(
            f"{where} on GPU {gpu.index} {verb} its {format_bytes(gpu.free_bytes)}{free}: nothing could be planned "
            "there; give a reserve smaller than the card (the CUDA context takes about 1 GiB)"
        )
    amount, where = inventory.cpu_reserve_bytes, given.get("cpu")
    if where is None or amount is None or inventory.cpu_bytes <= 0 or amount < inventory.cpu_bytes:
        return  # no reserve given, no host memory for the model (another message's), or room to spare
    verb = "exceeds" if amount > inventory.cpu_bytes else "takes all of"
    raise BadInput(
        f"{where} {verb} {cpu_memory_where} ({format_bytes(inventory.cpu_bytes)}): nothing could be planned on the "
        "CPU; give a smaller reserve, or more memory"
    )


def _size_field(value: Any, where: str) -> int:
    try:
        return parse_size(value)
    except SizeError as exc:
        raise BadInput(f"{where}: {exc}") from None


def _gpu_memory_field(value: Any, where: str) -> int:
    """An inventory card's `memory`: a size with its unit; a bare number is refused as --gpu refuses it."""
    if not isinstance(value, bool) and BARE_NUMBER.match(str(value)):
        raise BadInput(bare_gpu_number(f"{where} {value}", str(value).strip(), "memory: "))
    return _size_field(value, where)


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
        if isinstance(entry, (str, int, float)) and not isinstance(entry, bool):
            gpus.append(parse_gpu_spec(entry, i, where))
            continue
        if not isinstance(entry, dict) or not ({"name", "memory"} & entry.keys()):
            raise BadInput(f"{where}: give a card name or a memory size, e.g. {{name: RTX 3090}} or {{memory: 24GiB}}")
        name = str(entry.get("name", ""))
        card = find_card(name) if name else None
        if name and card is None and "memory" not in entry:
            raise BadInput(f"{where}: unknown card {name!r}; add memory: SIZE or use one of: {', '.join(card_names())}")
        total = _gpu_memory_field(entry["memory"], where + ".memory") if "memory" in entry else None
        if total == 0:
            raise BadInput(f"{where}.memory: a GPU with 0 bytes holds nothing")
        cc = card.compute_capability if card else None
        if "compute_capability" in entry:
            try:
                major, minor = (parse_int(x, "compute capability") for x in str(entry["compute_capability"]).split("."))
                cc = (major, minor)
            except ValueError:
                raise BadInput(f"{where}.compute_capability: write it as MAJOR.MINOR, e.g. 8.6") from None
        if card is not None:
            gpu = catalog_gpu(i, card, total)
        else:
            assert total is not None  # a name the catalog does not know comes with its memory (refused above)
            gpu = Gpu(i, name or f"GPU {i}", total, total, None)
        gpus.append(_card_settings(replace(gpu, compute_capability=cc), entry, where))
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
