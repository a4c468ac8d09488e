"""The fit log of `oneke-plan -v` and the does-not-fit message: each block that moves on to the next device is said,
with what it needs and what the device has left, and the numbers are the ones computed by hand here.

A small placement priced by hand (MiB):

    block               weights  KV cache  activations  logits
    model.embed_tokens      100         0            0       0
    model.layers.0..2       200        30           10       0
    lm_head                 100         0            0       5

On a GPU, a device's estimate is its weights + KV cache + workspace (largest activation + logits + the staging copy
of the largest block it runs for the CPU) + its reserve (50 MiB, once it holds a block). GPU 0 (700 MiB) takes the
embeddings (150: 100 + the reserve) and layers 0 and 1 (620: 500 + 60 + 10 + 50); layer 2 would bring 230 more
(weights 200, KV cache 30), with 80 left: it goes to GPU 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import accelerate_device, transformers_meta_model

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.core.errors import EXIT_DOES_NOT_FIT
from oneke_plan.plan.fit import BlockCost, Slot, explain_steps, fill, place

MiB = 2**20


def cost(name: str, kind: str, weights: int, kv: int = 0, act: int = 0, logits: int = 0, tied: str | None = None):
    """A block priced in MiB, as fit.block_costs would price it (unquantized: stored weights are the weights)."""
    w = weights * MiB
    return BlockCost(name, kind, w, w, kv * MiB, act * MiB, logits * MiB, 0, tied, kv * MiB)


COSTS = [
    cost("model.embed_tokens", "other", 100),
    *[cost(f"model.layers.{i}", "layer", 200, kv=30, act=10) for i in range(3)],
    cost("lm_head", "lm_head", 100, logits=5),
]


def gpus(*sizes_mib: int) -> list[Slot]:
    return [Slot(i, f"GPU {i}", size * MiB, 50 * MiB) for i, size in enumerate(sizes_mib)]


@pytest.fixture(scope="module", autouse=True)
def _quiet_accelerate():
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    yield


# -- by hand -----------------------------------------------------------------------------------------------------
def test_a_layer_that_moves_says_what_it_needs_and_what_was_left() -> None:
    placement = place(COSTS, gpus(700, 600))
    assert placement.fits
    assert [placement.assignment[c.name] for c in COSTS] == [0, 0, 0, 1, 1]
    moved = [line for line in placement.log if "moving to" in line]
    assert moved == [
        "layer 2 needs 230.00 MiB (weights 200.00 MiB, KV cache 30.00 MiB); GPU 0 has 80.00 MiB left of 700.00 MiB; "
        "moving to GPU 1"
    ]
    # every step kept as data: five placed, one refused; what each placed one added to its device, by hand
    placed = [(s.label, s.device, s.need.total_bytes // MiB, s.left_bytes // MiB) for s in placement.steps if s.placed]
    assert placed == [
        ("model.embed_tokens", 0, 150, 700),  # 100 of weights + the 50 reserve
        ("layer 0", 0, 240, 550),  # 200 + 30 + 10 (the first activation)
        ("layer 1", 0, 230, 310),  # no new workspace: activations are a max, not a sum
        ("layer 2", 1, 290, 600),  # 200 + 30 + 10 + the reserve
        ("lm_head", 1, 105, 310),  # 100 + 5 of logits
    ]


def test_the_first_block_that_did_not_fit_is_named_with_its_need() -> None:
    placement = place(COSTS, gpus(700, 300))
    assert placement.unplaced == ["lm_head"]
    refusal = placement.first_refusal()
    assert refusal is not None and refusal.label == "lm_head" and refusal.device == 1
    # GPU 1 holds layer 2: 290 MiB; lm_head adds 100 of weights and 5 of logits, 10 are left
    assert (refusal.need_bytes, refusal.left_bytes) == (105 * MiB, 10 * MiB)
    assert explain_steps(placement, gpus(700, 300))[-1] == (
        "lm_head needs 105.00 MiB (weights 100.00 MiB, workspace 5.00 MiB); GPU 1 has 10.00 MiB left of 300.00 MiB; "
        "no device is left"
    )


def test_tied_blocks_move_together_and_are_named_together() -> None:
    tied = [*COSTS[:-1], cost("lm_head", "lm_head", 100, logits=5, tied="model.embed_tokens")]
    placement = fill(tied, gpus(100, 2000), {0: 100 * MiB, 1: 2000 * MiB})
    refused = next(s for s in placement.steps if not s.placed)
    assert refused.label == "model.embed_tokens (with lm_head, tied to it)"
    assert refused.blocks == ("model.embed_tokens", "lm_head")
    # both on GPU 0: 200 of weights, 5 of logits, the 50 reserve; a GPU of 100 MiB has 100 left
    assert (refused.need_bytes, refused.left_bytes) == (255 * MiB, 100 * MiB)


def test_offloaded_blocks_are_charged_where_they_run_and_the_cap_is_said() -> None:
    """With CPU offload, a block on the CPU runs on GPU 0: its KV cache and a staging copy of its weights go there.
    Filled in order GPU 0 has 80 MiB left, too little for layer 2's 30 of KV cache and 200 of staging; so GPU 0
    keeps one block fewer: its weights are capped at 300 MiB (embeddings and layer 0), and layer 1 moves on."""
    slots = [*gpus(700), Slot("cpu", "CPU", 10_000 * MiB, 0)]
    plain = fill(COSTS, slots, {s.id: s.capacity_bytes for s in slots})
    assert explain_steps(plain, slots)[1] == (
        "layer 2 on CPU, which runs on GPU 0, needs 230.00 MiB (KV cache 30.00 MiB, workspace 200.00 MiB); GPU 0 has "
        "80.00 MiB left of 700.00 MiB; no device is left"
    )
    placement = place(COSTS, slots)
    assert placement.fits
    assert [placement.assignment[c.name] for c in COSTS] == [0, 0, "cpu", "cpu", "cpu"]
    assert "GPU 0: keeps 1 block fewer than filling in order gives it (at most 300.00 MiB of weights)" in "\n".join(
        placement.log
    )
    assert (
        "layer 1 needs 200.00 MiB of weights; GPU 0 keeps at most 300.00 MiB of weights so that offloaded blocks can "
        "run there, 0 B left; moving to CPU"
    ) in placement.log
    # GPU 0 by hand: 300 of weights, 3 x 30 of KV cache, workspace 10 + 5 + 200 (staging), reserve 50
    assert placement.estimates[0].total_bytes == (300 + 90 + 215 + 50) * MiB


def test_balanced_shares_are_named_as_shares() -> None:
    placement = place(COSTS, gpus(700, 700), "balanced")
    moved = [line for line in placement.log if "moving to" in line]
    assert len(moved) == 1 and "GPU 0 has" in moved[0] and "left of its share of" in moved[0]


# -- a real model, through the command -----------------------------------------------------------------------------
def meta_layer_bytes(config_path: Path, layer: int) -> int:
    """One decoder layer's parameters and buffers, as transformers' own LlamaForCausalLM builds them in bf16 on the
    meta device (independent of the planner's build)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(config_path.read_text(encoding="utf-8")))
    module = transformers_meta_model(config, "bfloat16").model.layers[layer]
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def mib(n: int) -> str:
    return f"{n / MiB:.2f} MiB"


def as_bytes(text: str) -> float:
    """'81.61 MiB' -> bytes (two decimals: within 0.005 of the unit)."""
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


ONEKE_CONFIG = Path(__file__).resolve().parents[2] / "oneke_plan" / "data" / "oneke_config.json"
ONEKE_LAYER_KV = 2 * 40 * 128 * 2 * 4 * (512 + 512)  # K and V, 40 heads x 128 bf16 values, 4 x (512 + 512) positions


def test_oneke_on_24_and_12_gib_explains_the_move_to_gpu_1(capsys: pytest.CaptureFixture[str]) -> None:
    """The first OneKE layer on GPU 1 is said to need its bf16 weights (transformers' own meta build) and its KV
    cache (by hand); what GPU 0 has left is 24 GiB minus what the written profile plans for it."""
    import yaml

    assert plan_main(["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0", "-v"]) == 0
    out, err = capsys.readouterr()
    profile = yaml.safe_load(out)
    moved = min(i for i in range(40) if accelerate_device(f"model.layers.{i}", profile["device_map"]) == 1)
    weights = meta_layer_bytes(ONEKE_CONFIG, moved)
    left = 24 * 2**30 - profile["estimate"][0]["total_bytes"]
    expected = (
        f"  layer {moved} needs {mib(weights + ONEKE_LAYER_KV)} (weights {mib(weights)}, KV cache "
        f"{mib(ONEKE_LAYER_KV)}); GPU 0 has {mib(left)} left of 24.00 GiB; moving to GPU 1"
    )
    assert expected in err.splitlines(), err


def test_does_not_fit_names_the_first_block_and_what_it_needed(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan_main(["oneke", "--gpu", "10GiB", "--gpu", "6GiB", "--cpu-memory", "0"])
    lines = capsys.readouterr().err.splitlines()
    assert code == EXIT_DOES_NOT_FIT
    first = lines[0].split("(")[1].split(" ..")[0]  # "does not fit: N blocks (FIRST .. LAST) are left over, ..."
    index = int(first.removeprefix("model.layers."))
    weights = meta_layer_bytes(ONEKE_CONFIG, index)
    assert lines[1].startswith(
        f"  first block that did not fit: layer {index} needs {mib(weights + ONEKE_LAYER_KV)} (weights {mib(weights)}, "
        f"KV cache {mib(ONEKE_LAYER_KV)}); GPU 1 has "
    ), lines[1]
    assert lines[1].endswith(" left of 6.00 GiB")
    # what was left and what GPU 1 was planned to hold add up to the card
    left = as_bytes(lines[1].split("GPU 1 has ")[1].removesuffix(" left of 6.00 GiB"))
    used = as_bytes(next(x for x in lines if x.startswith("  GPU 1: ")).split(": ")[1].split(" of ")[0])
    assert left + used == pytest.approx(6 * 2**30, abs=0.006 * 2**30)


def test_solve_says_what_the_next_value_could_not_place(capsys: pytest.CaptureFixture[str]) -> None:
    """--solve's log line names what the next batch size could not place: the same block, need and room as the
    does-not-fit message of planning that batch size directly; here OneKE's lm_head, whose bf16 weights are 55,296
    x 5,120 x 2 bytes (540.00 MiB) by hand."""
    import yaml

    machine = ["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0"]
    assert plan_main([*machine, "--solve", "batch-size", "-v"]) == 0
    out, err = capsys.readouterr()
    best = yaml.safe_load(out)["workload"]["batch_size"]
    line = next(x for x in err.splitlines() if x.startswith("  solve: "))
    assert line.startswith(f"  solve: --batch-size {best} fits; at {best + 1}, "), line
    assert plan_main([*machine, "--batch-size", str(best + 1)]) == EXIT_DOES_NOT_FIT
    first = capsys.readouterr().err.splitlines()[1]
    assert first == "  first block that did not fit: " + line.split(f"at {best + 1}, ")[1]
    assert "lm_head needs " in first and f"(weights {mib(55_296 * 5_120 * 2)}" in first
