"""A planning run owns its measurements: re-planning within the run (--solve's bisection, the does-not-fit
suggestions) builds nothing new, and nothing the run built outlives it."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

import oneke_plan.measure.layout as layout
import oneke_plan.measure.measurements as measurements
from oneke_plan.api.planner import Planner
from oneke_plan.core.errors import DoesNotFit
from oneke_plan.measure.compat import measures_on_meta
from oneke_plan.plan.inventory import build_inventory
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

pytestmark = [pytest.mark.usefixtures("quiet_accelerate"), pytest.mark.own_measurements]


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every meta build of the model (its layer count), counted around the real build_meta_model."""
    real = layout.build_meta_model
    seen: list[int] = []

    def counted(config, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(int(config.num_hidden_layers))
        return real(config, *args, **kwargs)

    monkeypatch.setattr(layout, "build_meta_model", counted)  # two_layer_copy and quantizable_linears call it here
    monkeypatch.setattr(measurements, "build_meta_model", counted)
    return seen


def test_solving_builds_the_model_once_and_its_two_layer_copy_once(builds: list[int]) -> None:
    """--solve plans dozens of workloads; the run measures once: the whole model on meta (its layout and its
    forward, or on fake tensors as well where transformers cannot run it on meta) and the two-layer copy the laws
    are fitted on."""
    planner = Planner(resolve_model("oneke"))
    inventory = build_inventory(["24GiB", "12GiB"])
    result = planner.plan_profile(inventory, PlanSettings(Workload(512, 512, 4)), "batch_size")
    assert result.plan.settings.workload.batch_size > 4  # several bisection steps were planned
    whole = 1 if measures_on_meta() else 2
    assert sorted(builds) == [2] + [40] * whole


def test_a_plan_that_does_not_fit_adds_only_the_quantizers_build(builds: list[int]) -> None:
    """The suggestions plan 8-bit, 4-bit, shorter contexts, smaller batches and offload from the same measurements;
    what bitsandbytes would quantize needs one build of its own (the quantizer rewrites the model it is given)."""
    planner = Planner(resolve_model("oneke"))
    with pytest.raises(DoesNotFit, match="--quantize 4bit: fits"):
        planner.plan_profile(build_inventory(["12GiB"]), PlanSettings(Workload(512, 512, 4)))
    whole = 1 if measures_on_meta() else 2
    assert sorted(builds) == [2] + [40] * (whole + 1)


def test_nothing_a_planning_run_built_outlives_it(tiny_model_dir: Path) -> None:
    """No measurement is kept beyond its planner: once the run is dropped, its meta model and measurer are freed
    (a process that plans many models holds none it no longer plans for)."""
    planner = Planner(resolve_model(str(tiny_model_dir)))
    plan = planner.plan(build_inventory(["2GiB"]), PlanSettings(Workload(64, 16, 2)))
    assert plan.fits
    model = weakref.ref(planner.build(plan.dtype)[0])
    measurer = weakref.ref(planner.measurer(plan.dtype))
    del planner, plan
    gc.collect()
    assert model() is None and measurer() is None
