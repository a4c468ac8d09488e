"""A random probe of the planner: hundreds of machine / quantization / workload cells (fixed seed) for OneKE and for
models with tied embeddings. Each cell must end as oneke-plan would end it with exit 0 (a profile) or 3 (does not
fit, with what would), never an internal error; and every profile written is checked against an independent
meta build of the model (transformers' own `from_config` on torch's meta device, not the planner's build):

- accelerate's `check_device_map` accepts the device_map, and every parameter and buffer (persistent or not,
  top-level or in a buffer-only module) has a device, tied weights one device;
- unquantized: each device's planned weights equal the bytes of the real meta tensors the map puts there;
- every device's planned total is within the memory the plan was given for it.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import accelerate_device, transformers_meta_model

from oneke_plan.api.planner import Planner
from oneke_plan.core.errors import BadInput, DoesNotFit
from oneke_plan.core.sizes import GiB, KiB, MiB
from oneke_plan.plan.inventory import build_inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

CONFIGS = Path(__file__).parents[1] / "configs"
CELLS_PER_MODEL = {"oneke": 140, "qwen2.5-0.5b": 80, "llama-3.2-1b": 80, "tiny-tied": 60}


pytestmark = pytest.mark.usefixtures("quiet_accelerate")


@dataclass(frozen=True)
class Scale:
    """GPU sizes and workloads that make a model sometimes fit and sometimes not."""

    gpu_sizes: tuple[int, ...]
    cpu_sizes: tuple[int | None, ...]
    input_tokens: tuple[int, ...]
    new_tokens: tuple[int, ...]
    reserves: tuple[int, ...]


BIG = Scale(
    gpu_sizes=tuple(n * GiB for n in (4, 6, 8, 10, 11, 12, 15, 16, 20, 24, 32, 40, 48, 80)),
    cpu_sizes=(None, None, 0, 8 * GiB, 32 * GiB),
    input_tokens=(64, 256, 512, 1024, 2048, 3000),
    new_tokens=(16, 128, 512, 1024),
    reserves=(GiB, GiB, 512 * MiB),
)
SMALL = Scale(
    gpu_sizes=tuple(n * MiB for n in (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)),
    cpu_sizes=(None, None, 0, 512 * MiB, 4 * GiB),
    input_tokens=(64, 256, 512, 1024, 2048, 4096),
    new_tokens=(16, 128, 512),
    reserves=(256 * MiB, 128 * MiB, 0),
)
TINY = Scale(
    gpu_sizes=tuple(n * KiB for n in (64, 128, 192, 256, 384, 512, 1024, 4096)),
    cpu_sizes=(None, 0, 256 * KiB, 4 * MiB),
    input_tokens=(8, 16, 32, 64, 128),
    new_tokens=(4, 8, 16),
    reserves=(0,),
)


@dataclass(frozen=True)
class Cell:
    gpus: tuple[str, ...]
    cpu_memory: str | None
    offload: bool
    settings: PlanSettings

    def describe(self) -> str:
        w = self.settings.workload
        return (
            f"--gpu {' --gpu '.join(self.gpus) or '(none)'} --cpu-memory {self.cpu_memory} offload={self.offload} "
            f"--quantize {self.settings.quant.mode} --strategy {self.settings.strategy} --batch-size {w.batch_size} "
            f"--max-input-tokens {w.max_input_tokens} --max-new-tokens {w.max_new_tokens} "
            f"--reserve {self.settings.reserve_bytes}B eager={self.settings.eager_attention}"
        )


def random_cells(rng: random.Random, scale: Scale, count: int, max_positions: int) -> list[Cell]:
    cells = []
    while len(cells) < count:
        gpus = tuple(f"{rng.choice(scale.gpu_sizes)}B" for _ in range(rng.choice((0, 1, 1, 2, 2, 2, 3, 4))))
        cpu = rng.choice(scale.cpu_sizes)
        if not gpus and not cpu:
            cpu = scale.cpu_sizes[-1]  # a machine without GPUs plans for its CPU: give it memory
        new = rng.choice(scale.new_tokens)
        inputs = min(rng.choice(scale.input_tokens), max_positions - new)
        settings = PlanSettings(
            Workload(inputs, new, rng.choice((1, 1, 2, 4, 8, 16))),
            quant=Quantization(rng.choice(("none", "none", "8bit", "4bit")), "nf4", rng.random() < 0.8),
            strategy=rng.choice(("fill", "fill", "balanced")),
            reserve_bytes=rng.choice(scale.reserves),
            cpu_reserve_bytes=0 if scale is TINY else 2 * GiB,
            eager_attention=rng.random() < 0.15,
        )
        cells.append(Cell(gpus, None if cpu is None else f"{cpu}B", rng.random() < 0.2, settings))
    return cells


def check_profile_independently(model: Any, profile: Any) -> None:
    from accelerate.utils import check_device_map

    device_map = profile.device_map
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    assert all(key == "" or key in modules or key in params for key in device_map), device_map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_device_map(model, device_map)
    by_storage: dict[int, set[Any]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_storage.setdefault(id(tensor), set()).add(accelerate_device(name, device_map))  # ValueError: not covered
    assert all(len(devices) == 1 for devices in by_storage.values()), "tied tensors split over devices"
    if profile.quantization.mode == "none":
        weights: dict[Any, int] = {}
        seen: set[int] = set()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                device = accelerate_device(name, device_map)
                weights[device] = weights.get(device, 0) + tensor.numel() * tensor.element_size()
        planned = {d: e.weights_bytes for d, e in profile.estimate.items() if e.weights_bytes}
        assert planned == weights
    for device in profile.devices:
        if device.usable_bytes is not None:
            assert profile.estimate[device.id].total_bytes <= device.usable_bytes, device


def probe(planner: Planner, key: str, cells: list[Cell], tmp_path: Path) -> dict[int, int]:
    """Run every cell as oneke-plan does; return how many ended with each exit code."""
    exits = {0: 0, 3: 0}
    for cell in cells:
        inventory = build_inventory(
            list(cell.gpus) or None, None, cell.cpu_memory, str(tmp_path / "offload") if cell.offload else None
        )
        if not inventory.gpus and inventory.source == "detected":
            inventory = build_inventory(None, None, cell.cpu_memory or "4GiB")  # CI machines have no GPU
        try:
            result = planner.plan_profile(inventory, cell.settings)
        except DoesNotFit:
            exits[3] += 1
            continue
        except BadInput as exc:  # every cell is valid input: a BadInput here is a bug too
            pytest.fail(f"{key}: {cell.describe()}: exit 2: {exc}")
        except Exception as exc:  # noqa: BLE001 - the probe's point: no other exception may escape
            pytest.fail(f"{key}: {cell.describe()}: internal error {type(exc).__name__}: {exc}")
        exits[0] += 1
        profile = result.profile
        fresh = transformers_meta_model(planner.config, profile.dtype, profile.attn_implementation)
        try:
            check_profile_independently(fresh, profile)
        except (AssertionError, KeyError, ValueError) as exc:
            pytest.fail(f"{key}: {cell.describe()}: profile wrong: {type(exc).__name__}: {exc}")
    return exits


def planner_for(key: str, tiny_tied_dir: Path, tmp_path: Path) -> Planner:
    if key == "oneke":
        return Planner(resolve_model("oneke"))
    if key == "tiny-tied":
        return Planner(resolve_model(str(tiny_tied_dir)))
    folder = tmp_path / key
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / f"{key}.json").read_text(encoding="utf-8"), encoding="utf-8")
    return Planner(resolve_model(str(folder)))


@pytest.mark.parametrize("key", list(CELLS_PER_MODEL))
def test_random_cells_never_crash_and_every_profile_is_right(key: str, tiny_tied_dir: Path, tmp_path: Path) -> None:
    planner = planner_for(key, tiny_tied_dir, tmp_path)
    scale = {"oneke": BIG, "tiny-tied": TINY}.get(key, SMALL)
    max_positions = planner.layout.max_position_embeddings or 1 << 20
    cells = random_cells(random.Random(f"probe-{key}"), scale, CELLS_PER_MODEL[key], max_positions)
    exits = probe(planner, key, cells, tmp_path)
    # the probe means something only if it sees both outcomes often
    assert min(exits.values()) >= len(cells) // 10, exits


# -- the cases the issue reported ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gpus, batch",
    [(("32GiB", "8GiB"), 8), (("Tesla V100", "RTX 3070"), 4)],
)
def test_reported_oneke_cells_write_a_profile(gpus: tuple[str, ...], batch: int) -> None:
    planner = Planner(resolve_model("oneke"))
    inventory = build_inventory(list(gpus), cpu_memory="0")
    result = planner.plan_profile(inventory, PlanSettings(Workload(512, 512, batch)))
    fresh = transformers_meta_model(planner.config, result.profile.dtype, result.profile.attn_implementation)
    check_profile_independently(fresh, result.profile)
    assert accelerate_device("lm_head", result.profile.device_map) == result.plan.placement.assignment["lm_head"]


def test_reported_qwen_tied_on_a_2gib_card(tmp_path: Path, tiny_tied_dir: Path) -> None:
    planner = planner_for("qwen2.5-0.5b", tiny_tied_dir, tmp_path)
    result = planner.plan_profile(build_inventory(["2GiB"], cpu_memory="4GiB"), PlanSettings(Workload(512, 512, 4)))
    fresh = transformers_meta_model(planner.config, "bfloat16", "sdpa")
    check_profile_independently(fresh, result.profile)
    device_map = result.profile.device_map
    assert "cpu" in device_map.values()  # the tail is offloaded ...
    # ... not lm_head
    assert accelerate_device("lm_head", device_map) == accelerate_device("model.embed_tokens", device_map) == 0
