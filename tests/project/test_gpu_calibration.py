"""bench/gpu_calibration.py --cpu-smoke, as CI runs it so that the GPU calibration script cannot rot: it completes,
its data file has the structure a GPU run's has, every figure the CPU can measure agrees with an independent route
(the loaded model's storages, the LLaMA KV-cache formula by hand, the tokens asked for), and every GPU-only figure is
null with its reason, never a number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from oneke_plan.measure.compat import bnb_quantizes_on_cpu

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "bench" / "gpu_calibration.py"
# What only a CUDA device can measure: per run, and per load (the data file's contract, docs/benchmarks.md).
GPU_FIELDS = {"cap_bytes", "allocated_before", "max_memory_allocated", "max_memory_reserved", "driver_used_before",
              "driver_used_after", "context_bytes", "num_ooms", "out_of_memory", "peak_bytes"}
LOAD_GPU_FIELDS = {"load_max_memory_allocated", "load_max_memory_reserved", "load_peak_bytes", "allocated_after_load"}
ESTIMATE_KEYS = ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One --cpu-smoke run (about 20 s here): its data file, with the summary table and the folder beside it."""
    out = tmp_path_factory.mktemp("calibration")
    done = run_script("--cpu-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((out / "gpu-calibration.json").read_text(encoding="utf-8"))
    data["_table"] = (out / "gpu-calibration.md").read_text(encoding="utf-8")
    data["_out"] = out
    return data


def kv_bytes(dims: dict[str, int], batch: int, positions: int, layers: int) -> int:
    """The LLaMA KV cache by hand: K and V of kv_heads x head_dim bf16 values per position, sequence and layer."""
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    return 2 * dims["num_key_value_heads"] * head_dim * 2 * batch * positions * layers


def generate_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in [*data["runs"], *data["split"]] if r["runner"] == "generate"]


def test_the_smoke_run_completes_every_part(smoke: dict[str, Any]) -> None:
    assert smoke["format"] == "oneke-plan-gpu-calibration/1"
    assert (smoke["mode"], smoke["status"], smoke["errors"]) == ("cpu-smoke", "complete", [])
    roles = {r["role"] for r in smoke["runs"]}
    assert {"largest batch that fits", "smallest batch refused", "oneke-run, largest batch that fits"} <= roles
    assert [r["device"] for r in smoke["split"]] == [0, 1]
    assert smoke["throughput"] and smoke["loads"]
    quantized = {x["quant"] for x in smoke["loads"]} - {"none"}
    if bnb_quantizes_on_cpu():
        assert quantized == {"8bit", "4bit"}
    else:  # old transformers: said so, not left out silently
        assert quantized == set()
        assert {s["what"] for s in smoke["skipped"]} >= {"tiny-gqa/8bit", "tiny-gqa/4bit"}
    for record in [*smoke["runs"], *smoke["split"]]:
        assert record["id"] in smoke["_table"]


def test_gpu_only_figures_are_null_with_the_reason(smoke: dict[str, Any]) -> None:
    assert smoke["gpu"] is None
    assert set(smoke["unavailable"]) == GPU_FIELDS | LOAD_GPU_FIELDS
    assert all("no CUDA device" in reason for reason in smoke["unavailable"].values())
    for record in [*smoke["runs"], *smoke["split"]]:
        assert GPU_FIELDS <= set(record["measured"])
        assert {k: record["measured"][k] for k in GPU_FIELDS} == dict.fromkeys(GPU_FIELDS)
        # the checks that need a GPU figure are left open, never passed or failed
        assert set(record["checks"].values()) <= {None}, record["checks"]
    for load in smoke["loads"]:
        assert {k: load[k] for k in LOAD_GPU_FIELDS} == dict.fromkeys(LOAD_GPU_FIELDS)


def test_planned_weights_equal_the_storages_the_loaded_model_holds(smoke: dict[str, Any]) -> None:
    """Counted by the script from the loaded model's tensors (parameters, buffers, bitsandbytes' quantization
    state, each storage once), not from the plan."""
    for load in smoke["loads"]:
        assert load["measured_weights_bytes"] == {"cpu": load["planned_weights_bytes"]}, load["quant"]
    unquantized = next(x for x in smoke["loads"] if x["quant"] == "none")
    # each device of the split holds its own modules' weights, and the two together are the whole model
    for record in smoke["split"]:
        assert record["measured"]["loaded_weights_bytes"] == record["plan"]["weights_bytes"]
    assert sum(r["measured"]["loaded_weights_bytes"] for r in smoke["split"]) == unquantized["planned_weights_bytes"]
    modules = [set(r["modules"]) for r in smoke["split"]]
    assert not modules[0] & modules[1]


def test_kv_cache_planned_and_returned_match_the_llama_formula(smoke: dict[str, Any]) -> None:
    """The plan charges input + new positions; the cache generate returns holds one fewer (the last token is never
    fed back): both against the formula by hand, per device for the split."""
    for record in generate_runs(smoke):
        dims = smoke["settings"]["shapes"][record["shape"]]
        work = record["workload"]
        positions = work["max_input_tokens"] + work["max_new_tokens"]
        layers = (
            sum(name.startswith("model.layers.") for name in record["modules"]) if "modules" in record
            else dims["num_hidden_layers"]
        )
        assert record["plan"]["kv_cache_bytes"] == kv_bytes(dims, work["batch_size"], positions, layers), record["id"]
        assert record["measured"]["kv_positions"] == positions - 1
        assert record["measured"]["kv_cache_bytes"] == kv_bytes(dims, work["batch_size"], positions - 1, layers)
    assert all(r["measured"]["kv_cache_bytes"] > 0 for r in smoke["split"])


def test_every_run_generates_exactly_its_workload(smoke: dict[str, Any]) -> None:
    for record in [*smoke["runs"], *smoke["split"]]:
        work = record["workload"]
        assert record["measured"]["new_tokens"] == work["batch_size"] * work["max_new_tokens"], record["id"]
        assert record["measured"]["tokens_per_s"] > 0
    for record in smoke["runs"]:
        if record["runner"] == "oneke-run":
            work = record["workload"]
            assert record["measured"]["exit_code"] == 0
            lengths = [work["max_input_tokens"]] * (work["batch_size"] - 1) + [work["max_input_tokens"] - 1]
            assert record["measured"]["prompt_tokens"] == lengths


def test_the_tightness_pair_brackets_the_card(smoke: dict[str, Any]) -> None:
    """B* fits the emulated card and B* + 1 does not, each estimate the sum of its four terms."""
    pairs = 0
    for record in [*smoke["runs"], *smoke["split"]]:
        plan = record["plan"]
        assert plan["total_bytes"] == sum(plan[key] for key in ESTIMATE_KEYS)
        assert plan["reserve_bytes"] == smoke["settings"]["reserve_bytes"]
        if record["role"] == "largest batch that fits":
            assert record["workload"]["batch_size"] == record["largest_batch"] >= 1
            assert record["plan_fits_card"] and plan["total_bytes"] <= record["card_bytes"]
        elif record["role"] == "smallest batch refused":
            pairs += 1
            assert record["workload"]["batch_size"] == record["largest_batch"] + 1
            assert not record["plan_fits_card"] and plan["total_bytes"] > record["card_bytes"]
        else:
            assert plan["total_bytes"] <= record["card_bytes"]
    assert pairs >= 2


def test_throughput_lines_compare_oneke_run_with_generate(smoke: dict[str, Any]) -> None:
    for line in smoke["throughput"]:
        ours, plain = line["oneke_run"]["tokens_per_s"], line["generate"]["tokens_per_s"]
        assert line["ratios"]["oneke_run_over_generate"] == pytest.approx(ours / plain, abs=1e-3)
        assert "not run by --cpu-smoke" in line["generate_batch"]["unavailable"]


def test_derive_defaults_refuses_data_without_a_gpu_figure(smoke: dict[str, Any]) -> None:
    done = run_script("--derive-defaults", str(smoke["_out"] / "gpu-calibration.json"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no GPU peak in it" in done.stderr and "Traceback" not in done.stderr


def test_an_existing_file_it_did_not_write_is_left_alone(tmp_path: Path) -> None:
    theirs = tmp_path / "gpu-calibration.json"
    theirs.write_text('{"mine": true}\n')
    done = run_script("--cpu-smoke", "--out", str(tmp_path))
    assert done.returncode == 2 and "was not written by this script" in done.stderr
    assert theirs.read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-calibration.json"]


def test_derived_reserve_by_hand() -> None:
    """derive_defaults' arithmetic on a hand-made data set (synthetic numbers, not measurements): the reserve is the
    largest peak - (estimate - reserve), rounded up to a MiB, per card as well."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_calibration
    finally:
        sys.path.remove(str(ROOT / "bench"))
    mib = 2**20

    def run(card: int, total: int, reserve: int, workspace: int, peak: int, oom: bool = False) -> dict[str, Any]:
        return {
            "role": "largest batch that fits", "runner": "generate", "card_bytes": card,
            "plan": {"total_bytes": total, "reserve_bytes": reserve, "workspace_bytes": workspace},
            "measured": {"peak_bytes": peak, "out_of_memory": oom, "max_memory_allocated": 700 * mib,
                         "allocated_before": 500 * mib, "kv_cache_bytes": 100 * mib},
        }

    data = {"runs": [
        run(24 * 1024 * mib, 2000 * mib, 1024 * mib, 200 * mib, 1500 * mib),  # needs 1500 - 976 = 524 MiB
        run(12 * 1024 * mib, 3000 * mib, 1024 * mib, 50 * mib, 2700 * mib + 1),  # 2700 - 1976 = 724 MiB + 1 B
        run(12 * 1024 * mib, 3000 * mib, 1024 * mib, 50 * mib, 9000 * mib, oom=True),  # out of memory: not used
    ], "split": []}
    derived = gpu_calibration.derive_defaults(data)
    assert derived.reserve_bytes == 725 * mib
    assert derived.per_card == {24 * 1024 * mib: 524 * mib, 12 * 1024 * mib: 725 * mib}
    assert derived.runs == 2
    assert derived.over_peak_now == (pytest.approx(3000 / (2700 + 1 / mib)), pytest.approx(2000 / 1500))
    assert derived.over_peak_derived[0] == pytest.approx((1976 + 725) / (2700 + 1 / mib))
    assert derived.workspace_ratio == (pytest.approx(100 / 200), pytest.approx(100 / 50))
    with pytest.raises(ValueError, match="no GPU peak"):
        gpu_calibration.derive_defaults({"runs": [run(1, 2, 1, 1, 1, oom=True)], "split": []})


def test_an_out_folder_it_cannot_write_is_one_line(read_only_tmpfs: Path, tmp_path: Path) -> None:
    """The data file cannot be written (a read-only mount: even root cannot create a file there): exit 2 with the
    path, not a traceback."""
    done = run_script("--cpu-smoke", "--out", str(read_only_tmpfs), "--workdir", str(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and str(read_only_tmpfs) in done.stderr.strip().splitlines()[-1]
