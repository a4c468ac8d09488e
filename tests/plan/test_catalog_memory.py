"""The catalog's memory per card is nvidia-smi's total as published outputs show it (or the nominal size, said so),
and a plan for a named card budgets torch's total capacity where the catalog knows it, saying which figure it used.
Expected byte counts are hand computations (MiB = 1,048,576 bytes, GiB = 1,073,741,824 bytes), not the code's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from oneke_plan.api.planner import Planner
from oneke_plan.plan.catalog import CARDS, find_card
from oneke_plan.plan.inventory import build_inventory
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

SMALL = PlanSettings(Workload(16, 4, 1))

# Hand computations
H100_SMI_BYTES = 85_520_809_984  # 81,559 MiB x 1,048,576 (81,559,000,000 + 81,559 x 48,576)
H100_TORCH_BYTES = 85_061_827_297  # 79.22 GiB x 1,073,741,824 = 85,061,827,297.28, rounded down
RTX4090_SMI_BYTES = 25_757_220_864  # 24,564 MiB x 1,048,576
RTX4090_TORCH_BYTES = 25_383_256_719  # 23.64 GiB x 1,073,741,824 = 25,383,256,719.36, rounded down
RTX3090_SMI_BYTES = 25_443_696_640  # 24,265 MiB x 1,048,576 (torch's printed 23.70 GiB = 25,447,681,228 is above)
GIB24 = 25_769_803_776  # 24 x 1,073,741,824


def test_every_row_has_a_memory_source() -> None:
    for card in CARDS:
        assert card.memory_source, card.name
        nominal = re.fullmatch(r"nominal (\d+) GiB \(no nvidia-smi output found\)", card.memory_source)
        if nominal:
            assert card.nominal and card.smi_mib == int(nominal.group(1)) * 1024, card.name
        else:
            assert not card.nominal and "https://" in card.memory_source, card.name  # a page that shows it
        if card.torch_centigib is None:
            assert card.torch_source == "", card.name
        else:
            assert "https://" in card.torch_source, card.name  # a page that shows it


def test_the_plans_figure_never_exceeds_nvidia_smis_total() -> None:
    for card in CARDS:
        assert 0 < card.total_bytes <= card.smi_mib * 1_048_576, card.name


def test_published_totals_by_hand() -> None:
    h100, rtx4090, rtx3090 = find_card("H100"), find_card("RTX 4090"), find_card("RTX 3090")
    assert h100 is not None and rtx4090 is not None and rtx3090 is not None
    assert h100.smi_mib == 81_559 and h100.smi_bytes == H100_SMI_BYTES
    assert h100.total_bytes == H100_TORCH_BYTES
    assert rtx4090.smi_bytes == RTX4090_SMI_BYTES and rtx4090.total_bytes == RTX4090_TORCH_BYTES
    # the 3090's torch figure is printed to hundredths and lands above the smaller driver total: that total is kept
    assert rtx3090.total_bytes == RTX3090_SMI_BYTES
    assert "nvidia-smi total 24,265 MiB" in rtx3090.memory_basis


@pytest.mark.usefixtures("quiet_accelerate")
def test_a_plan_for_a_named_h100_budgets_torchs_figure_and_says_so(tiny_model_dir: Path) -> None:
    inventory = build_inventory(["H100"])
    assert inventory.gpus[0].total_bytes == inventory.gpus[0].free_bytes == H100_TORCH_BYTES
    plan = Planner(resolve_model(str(tiny_model_dir))).plan(inventory, SMALL)
    assert plan.slots[0].capacity_bytes == H100_TORCH_BYTES
    said = [line for line in plan.log if line.startswith("GPU 0 (H100):")]
    assert said == [
        "GPU 0 (H100): 79.22 GiB, torch's total capacity for the card (below its nvidia-smi total 81,559 MiB; catalog)"
    ]


@pytest.mark.usefixtures("quiet_accelerate")
def test_a_size_stays_what_the_user_says(tiny_model_dir: Path) -> None:
    planner = Planner(resolve_model(str(tiny_model_dir)))
    for spec, expected in (("24GiB", GIB24), ("H100:24GiB", GIB24), ("RTX 4090:24GiB", GIB24)):
        inventory = build_inventory([spec])
        assert inventory.gpus[0].total_bytes == expected, spec
        plan = planner.plan(inventory, SMALL)
        assert plan.slots[0].capacity_bytes == expected, spec
        assert not [line for line in plan.log if "catalog)" in line], spec  # no figure of the catalog's to explain


def test_an_inventory_name_uses_the_catalog_figure_and_its_memory_wins(tmp_path: Path) -> None:
    path = tmp_path / "machine.yaml"
    path.write_text("gpus:\n  - {name: RTX 4090}\n  - {name: H100, memory: 24GiB}\n", encoding="utf-8")
    named, sized = build_inventory(inventory_file=path).gpus
    assert named.total_bytes == RTX4090_TORCH_BYTES and named.memory_source.startswith("23.64 GiB, torch's")
    assert sized.total_bytes == GIB24 and sized.memory_source == ""
