"""The engine registry: one entry per engine (its cheap check, its start, what it reports), asked by oneke-run and
oneke-plan instead of comparing engine names; the vllm engine translates the profile once per run, in its check,
and its start only fits that translation to the installed vLLM."""

from __future__ import annotations

from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from oneke_plan import api
from oneke_plan.core.errors import BadInput
from oneke_plan.extract import engines
from oneke_plan.extract.engines import ENGINES, REGISTRY, check_engine, plan_for_vllm
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.profile import Profile, read_profile
from oneke_plan.plan.vllm_plan import vllm_settings

PROFILES = Path(__file__).parents[2] / "profiles"


@pytest.fixture(scope="module")
def tiny_cpu_profile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Profile:
    inventory = tmp_path_factory.mktemp("engines") / "inventory.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    return api.plan(
        str(tiny_model_dir), inventory_file=inventory, dtype="float32", max_input_tokens=64, max_new_tokens=4,
        batch_size=2,
    ).profile  # fmt: skip


@pytest.fixture()
def translations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every call of vllm_settings the engines make, recorded (the real translation still runs)."""
    calls: list[tuple[Any, ...]] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return vllm_settings(*args, **kwargs)

    monkeypatch.setattr(engines, "vllm_settings", counted)
    return calls


def test_the_engine_names_are_the_registrys() -> None:
    assert ENGINES == tuple(REGISTRY) == ("hf", "vllm")
    assert api.ENGINES is ENGINES
    assert all(name == engine.name for name, engine in REGISTRY.items())


def test_each_engine_says_what_it_reports(tiny_cpu_profile: Profile, tiny_model_dir: Path) -> None:
    source = resolve_model(str(tiny_model_dir))
    hf = check_engine("hf", tiny_cpu_profile, source)
    assert hf.name == "hf" and hf.prepared is None
    assert hf.measures_gpu_memory  # it loads the model in this process: torch's peaks are its own
    assert not REGISTRY["vllm"].measures_gpu_memory  # vLLM allocates in processes of its own
    assert REGISTRY["hf"].plan_lines is None and REGISTRY["vllm"].plan_lines is not None
    with pytest.raises(BadInput, match="no such engine.*hf, vllm"):
        check_engine("tgi", tiny_cpu_profile, source)


def test_fitting_to_the_installed_vllm_translates_nothing_again(translations: list[tuple[Any, ...]]) -> None:
    profile = read_profile(PROFILES / "oneke-24gib+12gib-bf16.yaml")
    translation = vllm_settings(profile, "m", 40)  # what the check hands to the start
    without_kv_field = {*translation.engine_args, "max_num_seqs", "skip_tokenizer_init", "gpu_memory_utilization"}
    without_kv_field.discard("kv_cache_memory_bytes")
    fitted = plan_for_vllm(translation, profile, 3, without_kv_field)
    assert translations == []
    assert fitted.engine_args["max_num_seqs"] == 3 and fitted.engine_args["skip_tokenizer_init"] is True
    # GPU 0's planned total over its 24 GiB, rounded up to 3 decimals (tests/plan/test_vllm_plan.py)
    assert fitted.engine_args["gpu_memory_utilization"] == 0.994
    assert "kv_cache_memory_bytes" not in fitted.engine_args
    assert translation.engine_args["kv_cache_memory_bytes"] == 2_768_240_640  # the check's translation is kept
    assert translation.engine_args["max_num_seqs"] == 4
    with pytest.raises(BadInput, match="no engine argument enable_prefix_caching"):
        plan_for_vllm(translation, profile, 3, without_kv_field - {"enable_prefix_caching"})


def test_the_check_translates_the_profile_once(
    tiny_cpu_profile: Profile, tiny_model_dir: Path, translations: list[tuple[Any, ...]]
) -> None:
    """Without vLLM installed the check translates first (what vLLM cannot express is said before what is
    missing here), then refuses in one line; with vLLM the start fits that same translation."""
    source = resolve_model(str(tiny_model_dir))
    if find_spec("vllm") is None:
        with pytest.raises(BadInput, match="not installed"):
            check_engine("vllm", tiny_cpu_profile, source)
        assert len(translations) == 1
        return
    checked = check_engine("vllm", tiny_cpu_profile, source)
    fitted = plan_for_vllm(checked.prepared, tiny_cpu_profile, 2, engines.installed_engine_arguments())
    assert len(translations) == 1
    assert fitted.engine_args["max_num_seqs"] == 2 and fitted.model == str(source.directory)


def test_a_profile_with_an_adapter_is_refused_by_the_translation(tiny_cpu_profile: Profile) -> None:
    with_adapter = replace(tiny_cpu_profile, adapter={"path": "lora", "on_load": "merged"})
    with pytest.raises(BadInput, match="LoRA adapter.*--engine hf"):
        vllm_settings(with_adapter, "m", 2)
