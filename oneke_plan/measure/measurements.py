"""Everything oneke-plan measures about one model, kept for one planning run.

Planning a workload, and then the dozens more that --solve's bisection and the does-not-fit suggestions try,
needs the same few measurements: the model built on the meta device per dtype and attention implementation, the
memory its forward holds per block (a Measurer, whose laws make every further workload arithmetic), the weights
bitsandbytes would quantize, and a LoRA adapter's bytes per block. `Measurements` builds each once, on first use,
and keeps it for as long as its owner (the planning run) keeps it: nothing outlives the run, so a long-lived
process never holds meta models it no longer plans for, and no cache key has to capture everything a
measurement depends on.
"""

from __future__ import annotations

import copy
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.measure.adapter import Adapter, attach_meta, lora_module, lora_parameters
from oneke_plan.measure.checkpoint import checkpoint_dtype
from oneke_plan.measure.compat import measures_on_meta
from oneke_plan.measure.forward import OUTSIDE, MeasureError
from oneke_plan.measure.layout import (
    build_meta_model,
    config_dtype,
    quantizable_linears,
    read_layout,
    two_layer_copy,
)
from oneke_plan.measure.measurer import Measurer
from oneke_plan.plan.blocks import ModelLayout
from oneke_plan.plan.fit import AdapterBytes, MeasuredMemory, device_owner
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.model_source import ModelSource
from oneke_plan.plan.plans import ModelDtype


def model_dtype(config: Any, source: ModelSource) -> ModelDtype:
    """transformers' rule for `dtype="auto"`: the config's `dtype` (`torch_dtype` before 4.56), else the first
    floating-point tensor of the checkpoint (its header only), else unknown."""
    from_config = config_dtype(config)
    if source.gguf_file is not None:
        from oneke_plan.measure.gguf import auto_dtype

        return ModelDtype(
            auto_dtype(source.gguf_file, from_config), "transformers' dtype=\"auto\" for this GGUF (it dequantizes it)"
        )
    if from_config is not None:
        return ModelDtype(from_config, "config.json")
    if source.directory is not None:
        from_weights = checkpoint_dtype(source.directory)
        if from_weights is not None:
            return ModelDtype(from_weights, "the checkpoint")
    return ModelDtype(None, "config.json names no dtype and there are no weights to read it from")


class Measurements:
    """One model's meta builds and measurements, each made once on first use (keys: dtype, attention, whether the
    adapter's LoRA layers run unmerged)."""

    def __init__(self, config: Any, trust_remote_code: bool = False, adapter: Adapter | None = None):
        self.config = config
        self.trust_remote_code = trust_remote_code
        self.adapter = adapter
        self._builds: dict[tuple[str, bool], tuple[Any, ModelLayout]] = {}
        self._adapted: dict[tuple[str, str | None, bool], Any] = {}
        self._measurers: dict[tuple[str, bool, bool], Measurer] = {}
        self._quantizable: dict[str, dict[str, tuple[int, int]]] = {}
        self._adapter_bytes: dict[str, AdapterBytes] = {}

    def build(self, dtype: str, eager_attention: bool = False) -> tuple[Any, ModelLayout]:
        """The meta model and its layout at `dtype` (buffers keep the dtype the model's code gives them at that
        dtype). transformers writes the dtype into the config it builds from, so each build gets its own copy."""
        key = (dtype, eager_attention)
        if key not in self._builds:
            model = self._fresh_build(dtype, "eager" if eager_attention else None)
            self._builds[key] = (model, read_layout(model, self.config, dtype))
        return self._builds[key]

    def _fresh_build(self, dtype: str, attn: str | None, fake: bool = False) -> Any:
        return build_meta_model(copy.deepcopy(self.config), dtype, self.trust_remote_code, attn, fake=fake)

    def adapted_build(self, dtype: str, attn: str | None = None, fake: bool = False) -> Any:
        """The meta model at `dtype` with the adapter's LoRA layers as peft builds them (peft changes the model it
        wraps, so a build of its own): one per dtype, attention and build kind, shared by the measurer and
        adapter_bytes."""
        assert self.adapter is not None
        key = (dtype, attn, fake)
        if key not in self._adapted:
            self._adapted[key] = attach_meta(self._fresh_build(dtype, attn, fake), self.adapter)
        return self._adapted[key]

    def measurer(self, dtype: str, eager_attention: bool = False, unmerged_adapter: bool = False) -> Measurer:
        """What the model's own forward holds, per block, measured on the meta device at `dtype`; with
        `unmerged_adapter`, the forward of the model with the adapter's LoRA layers, as peft builds them."""
        key = (dtype, eager_attention, unmerged_adapter and self.adapter is not None)
        if key not in self._measurers:
            self._measurers[key] = self._new_measurer(dtype, eager_attention, self.adapter if key[2] else None)
        return self._measurers[key]

    def _new_measurer(self, dtype: str, eager_attention: bool, adapter: Adapter | None) -> Measurer:
        model, layout = self.build(dtype, eager_attention)
        layers = [b.name for b in layout.blocks if b.kind == "layer"]
        attn = "eager" if eager_attention else None
        fake = not measures_on_meta()
        if adapter is not None:
            model = self.adapted_build(dtype, attn, fake)
        elif fake:
            model = self._fresh_build(dtype, attn, fake)

        def two_layers() -> tuple[Any, list[str], list[str]]:
            small = two_layer_copy(self.config, model, layers, dtype, attn, fake=fake)
            small = attach_meta(small, adapter) if adapter is not None else small
            small_layout = read_layout(small, self.config, dtype)
            small_layers = [b.name for b in small_layout.blocks if b.kind == "layer"]
            return small, [b.name for b in small_layout.blocks], small_layers

        blocks = [b.name for b in layout.blocks]
        return Measurer(model, blocks, layers, two_layers, layout.max_position_embeddings)

    def memory(
        self, source_name: str, dtype: str, eager_attention: bool, workload: Workload, unmerged_adapter: bool = False
    ) -> MeasuredMemory:
        """Per block, the state and transient peak the model's forward was measured to hold for the workload.
        BadInput (naming `source_name`) when the model's forward cannot run on the meta device."""
        measurer = self.measurer(dtype, eager_attention, unmerged_adapter)
        try:
            memory = measurer.block_memory(workload.batch_size, workload.max_input_tokens, workload.sequence_tokens)
        except MeasureError as exc:
            architecture = self.build(dtype, eager_attention)[1].architecture
            raise BadInput(
                f"{source_name}: oneke-plan cannot price {architecture} honestly: it measures memory by "
                f"running the model's own forward on the meta device, and that fails ({exc})"
            ) from None
        blocks = {name: m for name, m in memory.items() if name != OUTSIDE}
        return MeasuredMemory(
            {name: m.prefill_state_bytes for name, m in blocks.items()},
            {name: m.decode_state_bytes for name, m in blocks.items()},
            {name: m.peak_bytes for name, m in blocks.items()},
            memory[OUTSIDE].prefill_state_bytes,
            memory[OUTSIDE].decode_state_bytes,
            memory[OUTSIDE].peak_bytes,
        )

    def quantizable(self, dtype: str) -> dict[str, tuple[int, int]]:
        """The weights transformers' bitsandbytes integration would quantize, with their (out, in) sizes: a build
        of their own, which the quantizer rewrites."""
        if dtype not in self._quantizable:
            self._quantizable[dtype] = quantizable_linears(self.config, dtype, self.trust_remote_code)
        return self._quantizable[dtype]

    def adapter_bytes(self, dtype: str, layout: ModelLayout) -> AdapterBytes:
        """Per block: the bytes of the adapter's LoRA tensors as peft builds them onto the model at `dtype` (on
        meta: peft's own dtype rule), and the largest transient of merging one of its layers, by hand from peft's
        get_delta_weight (`lora_B @ lora_A`, then that times the scaling: two out x in matrices of the LoRA dtype,
        added in place to the weight)."""
        assert self.adapter is not None
        if dtype not in self._adapter_bytes:
            owners = {b.name: b.name for b in layout.blocks}  # each block its own owner: device_owner's longest match
            modules = self.adapter.modules
            resident: dict[str, int] = {}
            scratch: dict[str, int] = {}
            for name, param in lora_parameters(self.adapted_build(dtype)).items():
                block = str(device_owner(name, owners))
                resident[block] = resident.get(block, 0) + param.numel() * param.element_size()
                if ".lora_A." in name:
                    pair = modules[lora_module(name)]
                    merge = 2 * pair["lora_B"][0] * pair["lora_A"][1] * param.element_size()
                    scratch[block] = max(scratch.get(block, 0), merge)
            self._adapter_bytes[dtype] = AdapterBytes(resident, scratch)
        return self._adapter_bytes[dtype]
