"""bench/gpu_calibration.py --cpu-smoke, as CI runs it so that the GPU calibration probe cannot rot: it completes,
its data file has the structure a GPU run's has, every figure the CPU can measure agrees with an independent route
(the LLaMA parameter count and KV-cache formula by hand, the tokens asked for), and every GPU-only figure is null with
its reason, never a number. The search for the largest batch and the term arithmetic a GPU run needs are checked by
hand on synthetic inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "bench" / "gpu_calibration.py"
# What only a CUDA device can measure (the data file's contract, docs/benchmarks.md section 6).
GPU_FIELDS = {"allocated_before", "max_allocated", "max_reserved", "driver_used", "context_bytes", "out_of_memory"}
TERMS = ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One --cpu-smoke run (about 15 s here): its data file."""
    out = tmp_path_factory.mktemp("calibration")
    done = run_script("--cpu-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "gpu-calibration.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def probe_module() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_calibration
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_calibration


def per_position_bytes(dims: dict[str, int]) -> int:
    """One sequence position of the LLaMA KV cache by hand: K and V, kv_heads x head_dim bf16 values, every layer."""
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    return 2 * dims["num_key_value_heads"] * head_dim * 2 * dims["num_hidden_layers"]


def test_the_smoke_run_completes_and_searches_from_the_plan(smoke: dict[str, Any]) -> None:
    assert smoke["format"] == "oneke-plan-gpu-calibration/2"
    assert (smoke["mode"], smoke["status"]) == ("cpu-smoke", "complete")
    planned = smoke["plan"]["batch_size"]
    assert 1 <= planned < 16  # the 3 MiB host "card" holds some batches, not all the search may run
    # from B*, doubling while batches run, capped at --max-batch (16): on the CPU nothing runs out of memory
    batches = [r["batch"] for r in smoke["runs"]]
    assert batches[0] == planned and batches[-1] == 16
    assert all(b == min(2 * a, 16) for a, b in zip(batches, batches[1:], strict=False))
    assert smoke["largest_batch"] == {"planned": planned, "measured": 16, "first_refused": None, "searched_up_to": 16}


def test_gpu_only_figures_are_null_with_the_reason(smoke: dict[str, Any]) -> None:
    assert smoke["gpu"] is None and smoke["load"]["context_bytes"] is None
    assert set(smoke["unavailable"]) == GPU_FIELDS
    assert all("no CUDA device" in reason for reason in smoke["unavailable"].values())
    for run in smoke["runs"]:
        assert {k: run["measured"][k] for k in GPU_FIELDS} == dict.fromkeys(GPU_FIELDS)
        assert run["terms"]["workspace_bytes"]["measured"] is None and run["terms"]["reserve_bytes"]["measured"] is None
        assert run["peak_bytes"] is None and run["reserve_needed_bytes"] is None
    assert smoke["reserve_needed_bytes"] is None


def test_planned_and_loaded_weights_are_the_llama_parameters_by_hand(smoke: dict[str, Any]) -> None:
    """bf16 parameters by the LLaMA formula, plus copies of the rotary embedding's float32 inverse frequencies
    (head_dim / 2 values: transformers 5 keeps two on the model, 4.46 one there and one in every attention layer):
    what the plan counts is what loaded."""
    d = smoke["model"]["dims"]
    hidden, kv = d["hidden_size"], d["num_key_value_heads"] * d["hidden_size"] // d["num_attention_heads"]
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * d["intermediate_size"] + 2 * hidden
    parameters = d["num_hidden_layers"] * layer + hidden + 2 * d["vocab_size"] * hidden  # untied embeddings
    head_dim = d["hidden_size"] // d["num_attention_heads"]
    rotary = smoke["load"]["loaded_weights_bytes"] - 2 * parameters
    copies, left = divmod(rotary, head_dim // 2 * 4)
    assert left == 0 and 1 <= copies <= d["num_hidden_layers"] + 1, rotary
    assert smoke["load"]["planned_weights_bytes"] == smoke["load"]["loaded_weights_bytes"]
    for run in smoke["runs"]:
        assert run["terms"]["weights_bytes"] == {"estimate": smoke["load"]["planned_weights_bytes"],
                                                 "measured": smoke["load"]["loaded_weights_bytes"]}


def test_kv_cache_planned_and_held_match_the_llama_formula(smoke: dict[str, Any]) -> None:
    """The plan charges input + new positions; the decoder holds one fewer (the last token is never fed back)."""
    work, position = smoke["workload"], per_position_bytes(smoke["model"]["dims"])
    positions = work["max_input_tokens"] + work["max_new_tokens"]
    for run in smoke["runs"]:
        assert run["terms"]["kv_cache_bytes"] == {"estimate": run["batch"] * positions * position,
                                                  "measured": run["batch"] * (positions - 1) * position}


def test_every_run_generates_exactly_its_workload(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"]:
        assert run["measured"]["new_tokens"] == run["batch"] * smoke["workload"]["max_new_tokens"]


def test_the_planned_batch_brackets_the_card(smoke: dict[str, Any]) -> None:
    """Each run's estimate is the sum of its four terms, priced the same whatever the device's size: B* is the
    plan for the card itself, and a larger batch's estimate exceeds the card."""
    plan, card = smoke["plan"], smoke["plan"]["card_bytes"]
    assert plan["device"]["used_bytes"] == sum(plan["device"][t] for t in TERMS) <= card
    for run in smoke["runs"]:
        assert run["estimate_bytes"] == sum(run["terms"][t]["estimate"] for t in TERMS)
        assert (run["estimate_bytes"] <= card) == (run["batch"] <= plan["batch_size"]), run["batch"]
        if run["batch"] == plan["batch_size"]:
            assert {t: run["terms"][t]["estimate"] for t in TERMS} == {t: plan["device"][t] for t in TERMS}


def test_largest_fitting_by_hand(probe_module: Any) -> None:
    """Doubling from the planner's batch while batches fit, then bisecting; exact below 50, within 2% above."""
    tried: list[int] = []

    def fits_up_to(limit: int) -> Any:
        def fits(batch: int) -> bool:
            tried.append(batch)
            return batch <= limit

        return fits

    assert probe_module.largest_fitting(fits_up_to(37), 10, 100) == (37, 38)
    assert tried == [10, 20, 40, 30, 35, 37, 38]
    tried.clear()
    assert probe_module.largest_fitting(fits_up_to(37), 50, 100) == (37, 38)  # the plan was too high
    assert tried == [50, 25, 37, 43, 40, 38]
    assert probe_module.largest_fitting(fits_up_to(500), 10, 64) == (64, None)  # nothing refused up to the limit
    assert probe_module.largest_fitting(fits_up_to(0), 4, 64) == (0, 1)
    fit, failed = probe_module.largest_fitting(fits_up_to(3000), 1000, 10_000)
    assert fit <= 3000 < failed and failed - fit <= 0.02 * fit


def test_terms_against_the_estimate_by_hand(probe_module: Any) -> None:
    """Synthetic GPU readings (not measurements): each term's share of the peak, and the reserve that would make
    the estimate equal the peak (max reserved + context)."""
    mib = 2**20
    estimate = {"weights_bytes": 500 * mib, "kv_cache_bytes": 100 * mib, "workspace_bytes": 50 * mib,
                "reserve_bytes": 1024 * mib, "used_bytes": 1674 * mib}
    measured = {"kv_cache_bytes": 90 * mib, "max_allocated": 660 * mib, "max_reserved": 700 * mib,
                "context_bytes": 400 * mib}
    found = probe_module.against_estimate(estimate, 501 * mib, measured)
    assert {t: v["measured"] for t, v in found["terms"].items()} == {
        "weights_bytes": 501 * mib, "kv_cache_bytes": 90 * mib, "workspace_bytes": 69 * mib,  # 660 - 501 - 90
        "reserve_bytes": 440 * mib,  # 700 - 660 + 400
    }
    assert sum(v["measured"] for v in found["terms"].values()) == found["peak_bytes"] == 1100 * mib
    assert found["reserve_needed_bytes"] == (1100 - 650) * mib  # the peak minus the estimate's other terms
    assert {t: v["estimate"] for t, v in found["terms"].items()} == {t: estimate[t] for t in TERMS}


def test_without_a_gpu_the_gpu_run_is_refused_in_one_line(tmp_path: Path) -> None:
    done = run_script("--out", str(tmp_path))
    assert done.returncode == 2 and "no CUDA device here" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_it_did_not_write_is_left_alone(tmp_path: Path) -> None:
    theirs = tmp_path / "gpu-calibration.json"
    theirs.write_text('{"mine": true}\n')
    done = run_script("--cpu-smoke", "--out", str(tmp_path))
    assert done.returncode == 2 and "was not written by this script" in done.stderr
    assert theirs.read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-calibration.json"]


def test_an_out_folder_it_cannot_write_is_one_line(read_only_tmpfs: Path, tmp_path: Path) -> None:
    """The data file cannot be written (a read-only mount: even root cannot create a file there): exit 2 with the
    path, not a traceback."""
    done = run_script("--cpu-smoke", "--out", str(read_only_tmpfs), "--workdir", str(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and str(read_only_tmpfs) in done.stderr.strip().splitlines()[-1]
