"""Replicas: the grouping of GPUs into model copies (against an independent exhaustive search), the profile of
several replicas, and oneke-run under torchrun for real on this CPU (gloo): two workers give the one-process
output line for line; a worker killed mid-run and a rerun with --resume answer every record once, in input order;
two torchrun "nodes" on one machine merge into one output; a world size the profile does not have is one line."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from oneke_plan.api.planner import Planner
from oneke_plan.api.replica_planner import plan_replicas
from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import DoesNotFit
from oneke_plan.plan.inventory import build_inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings
from oneke_plan.plan.profile import read_profile
from oneke_plan.plan.replicas import GroupFits, most_replicas, replica_inventory

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module", autouse=True)
def _quiet_accelerate():
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="module")
def oneke() -> Planner:
    return Planner(resolve_model("oneke"))


# -- grouping --------------------------------------------------------------------------------------------------
def brute_force_most(cards: list[int], fits: Any) -> int:
    """The most fitting groups over every assignment of cards to group labels (itertools.product): another route
    than replicas.set_partitions. `fits` is asked once per distinct group of card indexes (a memo of our own, not
    replicas.GroupFits, whose sharing between cards of one size is part of what is tested)."""
    known: dict[tuple[int, ...], bool] = {}
    best = 0
    n = len(cards)
    for labels in itertools.product(range(n), repeat=n):
        groups: dict[int, list[int]] = {}
        for card, label in zip(range(n), labels, strict=True):
            groups.setdefault(label, []).append(cards[card])
        for group in groups.values():
            if tuple(group) not in known:
                known[tuple(group)] = fits(group)
        best = max(best, sum(1 for g in groups.values() if known[tuple(g)]))
    return best


@pytest.mark.parametrize("quant", ["none", "8bit", "4bit"])
def test_most_replicas_equals_exhaustive_search_on_small_machines(oneke: Planner, quant: str) -> None:
    rng = random.Random(f"replicas-{quant}")
    sizes = [8, 10, 12, 16, 24, 32, 40, 48]
    settings = PlanSettings(Workload(512, 512, 2), quant=Quantization(quant))
    for _ in range(6):
        cards = [f"{rng.choice(sizes)}GiB" for _ in range(rng.randint(2, 6))]
        inventory = build_inventory(cards)
        by_index = {g.index: g for g in inventory.gpus}

        def fits(group: Any, inventory: Any = inventory) -> bool:
            return oneke.plan(replica_inventory(inventory, group), settings).fits

        def key(i: int, gpus: dict = by_index) -> tuple:  # type: ignore[type-arg]
            return (gpus[i].free_bytes, gpus[i].compute_capability)

        memo = GroupFits(fits, key)
        found = most_replicas(list(by_index), memo, lambda i, gpus=by_index: gpus[i].free_bytes)
        assert all(fits(g) for g in found), (cards, found)
        assert len({i for g in found for i in g}) == sum(len(g) for g in found)  # disjoint
        assert len(found) == brute_force_most(list(by_index), fits), cards


def test_four_24gib_cards_hold_two_bf16_replicas_or_four_4bit_ones(oneke: Planner) -> None:
    """The README's example: OneKE on four 24 GiB cards."""
    inventory = build_inventory(["24GiB"] * 4)
    bf16 = plan_replicas(oneke, inventory, PlanSettings(Workload(512, 512, 4)), None, "auto", 1)
    assert bf16.profile.replica_count == 2 and sorted(len(r.devices) for r in bf16.profile.replicas) == [2, 2]
    four_bit = PlanSettings(Workload(512, 512, 4), quant=Quantization("4bit"))
    four = plan_replicas(oneke, inventory, four_bit, "", "auto", 1)
    assert four.profile.replica_count == 4
    devices = [d.id for r in four.profile.replicas for d in r.devices]
    assert sorted(devices) == [0, 1, 2, 3]  # one card each, none shared
    with pytest.raises(DoesNotFit, match="3 replicas"):
        plan_replicas(oneke, inventory, PlanSettings(Workload(512, 512, 4)), None, 3, 1)


@pytest.mark.parametrize("gpus, replicas", [(["24GiB"], 3), (["24GiB"] * 3, 4)])
def test_each_suggestion_for_too_many_replicas_plans_when_given(
    gpus: list[str], replicas: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Too many copies asked: each "what would fit" line, given as flags, writes a profile with that many replicas;
    one 24 GiB card holds no bf16 copy of OneKE (26.5 GB), so its suggestion must lower the count and quantize."""
    flags = [x for g in gpus for x in ("--gpu", g)]
    assert plan_main(["oneke", *flags, "--replicas", str(replicas)]) == 3
    err = capsys.readouterr().err
    suggestions = [line.strip().split(": ")[0] for line in err.splitlines() if line.startswith("  --")]
    assert suggestions, err
    if len(gpus) == 1:
        assert suggestions == ["--replicas 1 --quantize 8bit"], err
    for i, suggestion in enumerate(suggestions):
        extra = suggestion.split()
        if "--replicas" not in extra:
            extra += ["--replicas", str(replicas)]
        out = tmp_path / f"{i}.yaml"
        assert plan_main(["oneke", *flags, *extra, "-o", str(out)]) == 0, suggestion
        count = int(extra[extra.index("--replicas") + 1])
        data = yaml.safe_load(out.read_text())
        assert len(data.get("replicas", [data])) == count, suggestion


def test_replicas_profile_round_trips_and_a_replica_reads_as_format_1(oneke: Planner, tmp_path: Path) -> None:
    inventory = build_inventory(["24GiB"] * 4)
    result = plan_replicas(oneke, inventory, PlanSettings(Workload(512, 512, 4)), None, 2, 3)
    path = tmp_path / "p.yaml"
    path.write_text(result.profile.to_yaml())
    data = yaml.safe_load(path.read_text())
    assert data["format_version"] == 2 and data["nodes"] == 3 and len(data["replicas"]) == 2
    assert "device_map" not in data  # format 2 keeps each replica's map in its entry
    profile = read_profile(path)
    for index, plan in enumerate(result.replicas):
        view = profile.replica(index)
        assert view.format_version == 1 and not view.replicas
        assert view.device_map == plan.placement.assignment | view.device_map  # every key the plan's device
        assert {d.id for d in view.devices} == {d for d in plan.placement.assignment.values()}
    one = oneke.plan_profile(inventory, PlanSettings(Workload(512, 512, 4)))
    assert "replicas" not in yaml.safe_load(one.profile.to_yaml())  # one replica: format 1, today's keys


# -- torchrun, for real ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, deepke_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Profiles of one replica and of two CPU replicas for the tiny model (float32: batching changes no answer),
    and an input of DeepKE test lines of two tasks."""
    folder = tmp_path_factory.mktemp("replicas")
    inventory = folder / "inventory.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    common = [str(tiny_model_dir), "--inventory", str(inventory), "--dtype", "float32", "--max-input-tokens", "1024"]
    common += ["--max-new-tokens", "12", "--batch-size", "4"]
    profiles = {"one": folder / "one.yaml", "two": folder / "two.yaml", "nodes": folder / "nodes.yaml"}
    assert plan_main([*common, "-o", str(profiles["one"])]) == 0
    assert plan_main([*common, "--replicas", "2", "-o", str(profiles["two"])]) == 0
    assert plan_main([*common, "--nodes", "2", "-o", str(profiles["nodes"])]) == 0
    lines = []
    for task in ("NER", "RE"):
        lines += (deepke_dir / task / "test.json").read_text(encoding="utf-8").splitlines()[:6]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"folder": folder, "model": tiny_model_dir, "input": folder / "in.jsonl", **profiles}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun(setup: dict[str, Path], profile: Path, output: Path, *extra: str, workers: int = 2, **kw: Any) -> Any:
    command = [TORCHRUN, "--standalone", f"--nproc-per-node={workers}", "-m", "oneke_plan.cli.run"]
    command += ["--profile", str(profile), "--model", str(setup["model"]), "--input", str(setup["input"])]
    command += ["--output", str(output), "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, **kw)


def _one_process(setup: dict[str, Path], output: Path) -> str:
    argv = ["--profile", str(setup["one"]), "--model", str(setup["model"]), "--input", str(setup["input"])]
    assert run_main([*argv, "--output", str(output), "--no-progress"]) == 0
    return output.read_text(encoding="utf-8")


def test_two_torchrun_workers_write_the_one_process_output(setup: dict[str, Path], tmp_path: Path) -> None:
    expected = _one_process(setup, tmp_path / "one.jsonl")
    done = _torchrun(setup, setup["two"], tmp_path / "two.jsonl")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text(encoding="utf-8") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # the parts are gone
    assert "prompts answered by 2 workers" in done.stderr


def test_a_killed_worker_then_resume_answers_every_record_once(setup: dict[str, Path], tmp_path: Path) -> None:
    expected = _one_process(setup, tmp_path / "one.jsonl")
    output = tmp_path / "two.jsonl"
    command = [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "oneke_plan.cli.run", "--profile"]
    command += [str(setup["two"]), "--model", str(setup["model"]), "--input", str(setup["input"])]
    command += ["--output", str(output), "--no-progress", "--batch-size", "1"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    part = tmp_path / "two.jsonl.journal-1-of-2"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the worker's first answers are journaled: kill it mid-run
        if part.exists() and len(part.read_text(encoding="utf-8").splitlines()) >= 2:
            break
        time.sleep(0.05)
    pid = json.loads(part.read_text(encoding="utf-8").splitlines()[0])["pid"]
    os.kill(pid, signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0 and not output.exists()
    resumed = _torchrun(setup, setup["two"], output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert output.read_text(encoding="utf-8") == expected  # every line once, in input order, none broken
    assert not list(tmp_path.glob("two.jsonl.journal*"))


def test_two_nodes_on_one_machine_merge_into_one_output(setup: dict[str, Path], tmp_path: Path) -> None:
    expected = _one_process(setup, tmp_path / "one.jsonl")
    output = tmp_path / "nodes.jsonl"
    port = 29000 + random.Random(str(tmp_path)).randrange(1000)
    jobs = []
    for node in (0, 1):
        command = [TORCHRUN, "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--master-addr=127.0.0.1"]
        command += [f"--master-port={port}", "-m", "oneke_plan.cli.run", "--profile", str(setup["nodes"])]
        command += ["--model", str(setup["model"]), "--input", str(setup["input"]), "--output", str(output)]
        command += ["--no-progress"]
        jobs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in results]
    assert output.read_text(encoding="utf-8") == expected


def test_a_world_size_the_profile_does_not_have_is_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = _torchrun(setup, setup["two"], tmp_path / "out.jsonl", workers=3)
    assert wrong.returncode != 0
    assert "the profile has 2 replicas per node on 1 node(s), 2 workers in all; torchrun started 3" in wrong.stderr
    argv = ["--profile", str(setup["two"]), "--model", str(setup["model"]), "--input", str(setup["input"])]
    assert run_main([*argv, "--output", str(tmp_path / "alone.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the command _torchrun runs above: `torchrun ... oneke-run` would make torchrun look for a Python file
    # named oneke-run in the current folder
    assert len(err) == 1 and "torchrun --nproc-per-node 2 -m oneke_plan.cli.run ..." in err[0], err
    assert not list(tmp_path.iterdir())
