"""Any causal LM, measured not assumed: for each architecture in the table, a tiny real instance (random weights,
transformers' own classes) is the truth the plan is checked against:

- weights in 16-bit: the bytes of the real model's tensors, within 1%;
- weights in 8-bit and 4-bit: the storages of transformers' own bitsandbytes load of the same checkpoint on the CPU
  (weights with their quantization state), within 1% (or, where transformers quantizes nothing, the plan refuses to
  pretend it would);
- KV cache plus recurrent state: the most storage the cache object of a real prefill and real decoding steps
  holds at any step, within 2% (the plan counts one position more than generation computes).

The table covers grouped-query and multi-query attention, compressed (MLA) caches, sliding windows (alone and
mixed with full attention), mixtures of experts, SSM and linear-attention hybrids, Conv1D layers, a composite
(text + vision) config and tied embeddings. Architectures this transformers lacks are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import BATCH, NEW, PROMPT, TABLE, TRANSFORMERS_4, Arch
from conftest import needs_bnb_on_cpu, quant_state_tensors

from oneke_plan.api.planner import Planner
from oneke_plan.core.errors import BadInput
from oneke_plan.measure.compat import dtype_kw
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import Quantization, Workload
from oneke_plan.plan.model_source import resolve_model
from oneke_plan.plan.plans import PlanSettings

IDS = [f"{a.model_type}" for a in TABLE]


@pytest.fixture(scope="module", autouse=True)
def _quiet() -> Any:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


_BUILT: dict[str, tuple[Path, Any]] = {}


def tiny(arch: Arch, root: Path) -> tuple[Path, Any]:
    """A saved tiny checkpoint of `arch` (bf16, random weights), and the real model from_pretrained loads from it
    (as oneke-run does: transformers 4.x casts every float parameter to the dtype, 5.x keeps declared float32)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if arch.model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {arch.model_type}")
    if arch.model_type not in _BUILT:
        torch.manual_seed(0)
        folder = root / arch.model_type
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            AutoModelForCausalLM.from_config(arch.config(), **dtype_kw(torch.bfloat16)).save_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **dtype_kw(torch.bfloat16)).eval()
        _BUILT[arch.model_type] = (folder, model)
    return _BUILT[arch.model_type]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("architectures")


def plan(folder: Path, quant: str = "none") -> Any:
    planner = Planner(resolve_model(str(folder)))
    settings = PlanSettings(Workload(PROMPT, NEW, BATCH), quant=Quantization(quant), cpu_reserve_bytes=0)
    try:
        return planner.plan(Inventory((), 64 << 30), settings)
    except BadInput as exc:
        if TRANSFORMERS_4 and "cannot price" in str(exc):
            # transformers 4.x forwards of some architectures read tensor values (MoE routing with nonzero, Jamba's
            # .item()), which no meta or fake run has: the plan refuses in one line (exit 2), as it must.
            pytest.skip(f"transformers 4.x: {exc}")
        raise


# -- truths, from real tensors -------------------------------------------------------------------------------------
def storage_bytes(objects: list[Any]) -> int:
    """Bytes of the distinct storages of every tensor reachable from `objects` (transformers' cache objects,
    lists, tuples, dicts)."""
    seen: set[int] = set()
    total = 0
    stack = [(obj, 0) for obj in objects]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif depth < 8 and isinstance(obj, list | tuple):
            stack += [(x, depth + 1) for x in obj]
        elif depth < 8 and isinstance(obj, dict):
            stack += [(x, depth + 1) for x in obj.values()]
        elif depth < 8 and type(obj).__module__.startswith("transformers"):
            stack += [(x, depth + 1) for x in vars(obj).values()]
    return total


def real_cache_peak(model: Any) -> int:
    """The most storage the cache of a real generation holds at any step: a prefill of BATCH x PROMPT tokens, then
    NEW - 1 decoding steps (the last token's key and value are never computed), with a padding mask as batched
    generation passes one."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 250), (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    import inspect

    # Mamba on transformers 4.x takes its cache as cache_params with explicit positions; everything else as
    # past_key_values.
    by_params = "cache_params" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.cache_params if by_params else out.past_key_values
        peak = storage_bytes([cache])
        for step in range(NEW - 1):
            del out
            mask = torch.cat([mask, torch.ones((BATCH, 1), dtype=mask.dtype)], dim=1)
            if by_params:
                position = torch.tensor([PROMPT + step])
                out = model(input_ids=ids[:, -1:], cache_params=cache, cache_position=position, use_cache=True)
                cache = out.cache_params
            else:
                out = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            peak = max(peak, storage_bytes([cache]))
    return peak


# -- the table -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TABLE, ids=IDS)
def test_planned_16bit_weights_are_the_real_tensors(arch: Arch, root: Path) -> None:
    folder, model = tiny(arch, root)
    planned = sum(e.weights_bytes for e in plan(folder).placement.estimates.values())
    real = storage_bytes([*model.parameters(), *model.buffers()])
    assert planned == pytest.approx(real, rel=0.01), (planned, real)


@pytest.mark.parametrize("arch", TABLE, ids=IDS)
def test_planned_state_is_what_a_real_generation_caches(arch: Arch, root: Path) -> None:
    folder, model = tiny(arch, root)
    planned = sum(e.kv_cache_bytes for e in plan(folder).placement.estimates.values())
    real = real_cache_peak(model)
    assert real > 0
    assert planned == pytest.approx(real, rel=0.02), (planned, real)
    assert planned >= real  # never below: the plan counts the position generation never computes


@needs_bnb_on_cpu
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
@pytest.mark.parametrize("arch", TABLE, ids=IDS)
def test_planned_quantized_weights_are_transformers_own_load(arch: Arch, mode: str, root: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, _ = tiny(arch, root)
    if not arch.quantizable:
        with pytest.raises(BadInput, match="quantizes no layer"):
            plan(folder, mode)
        return
    planned = sum(e.weights_bytes for e in plan(folder, mode).placement.estimates.values())
    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if mode == "8bit"
        else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    )
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, device_map="cpu", **dtype_kw(torch.bfloat16)
        )
    # before any forward (bitsandbytes repacks 4-bit weights on the first one, on some CPUs): every storage once
    tensors = [*loaded.parameters(), *loaded.buffers()]
    real = storage_bytes([*tensors, *(extra for t in tensors for extra in quant_state_tensors(t))])
    assert planned == pytest.approx(real, rel=0.01), (planned, real)


def test_the_table_covers_what_the_issue_names() -> None:
    kinds = " ".join(a.kind for a in TABLE)
    for needed in ("GQA", "multi-query", "MLA", "sliding", "MoE", "SSM", "Conv1D", "composite", "tied"):
        assert needed in kinds, needed
    assert len(TABLE) >= 20
