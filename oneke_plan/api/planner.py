"""oneke-plan's algorithm, step by step, each step saying what it decided and why.

1. Build the model on the meta device and read its blocks (layout.py).
2. Choose the dtype as transformers' `dtype="auto"` does (the config's, else the weights'), falling back to fp16
   only where a GPU cannot run bf16.
3. Price every block: weights for the dtype/quantization, KV cache and activations for the workload (fit.py).
4. Place blocks on devices so that weights + KV + workspace + reserve fit each device (fit.py).
5. Write the placement itself as the device_map (block name -> device, grouped by accelerate's clean_device_map)
   and check that it covers every parameter and buffer on its planned device, tied weights together.
6. If nothing fits: say by how much, and compute (not guess) what would: 8-bit, 4-bit, a shorter context, a
   smaller batch, then CPU or disk offload.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace
from typing import Any

from oneke_plan import __version__
from oneke_plan.core.errors import BadInput, DoesNotFit
from oneke_plan.core.sizes import format_bytes
from oneke_plan.measure.adapter import Adapter, attach_meta, check_base, lora_module, lora_parameters
from oneke_plan.measure.checkpoint import checkpoint_dtype
from oneke_plan.measure.compat import measures_on_meta
from oneke_plan.measure.forward import OUTSIDE, MeasureError
from oneke_plan.measure.layout import (
    build_meta_model,
    config_dtype,
    load_config,
    max_positions,
    quantizable_linears,
    read_layout,
    two_layer_copy,
)
from oneke_plan.measure.measurer import Measurer
from oneke_plan.plan.blocks import ModelLayout
from oneke_plan.plan.fit import (
    BlockCost,
    DeviceEstimate,
    DeviceId,
    MeasuredMemory,
    block_costs,
    device_owner,
    explain_refusal,
    place,
)
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import (
    DTYPE_BYTES,
    Quantization,
    Workload,
    merges_on_load,
)
from oneke_plan.plan.model_source import ModelSource
from oneke_plan.plan.plans import (
    MAX_SOLVED_BATCH,
    ModelDtype,
    Plan,
    PlanResult,
    PlanSettings,
    bisect_largest,
    check_positive,
    make_slots,
    offload_note,
    offload_slowdown_of,
    peaks_text,
    predict_speed,
    resolve_dtype,
)
from oneke_plan.plan.profile import (
    ATTN_IMPLEMENTATIONS,
    ModelInfo,
    Profile,
    ProfileDevice,
)
from oneke_plan.plan.speed import SpeedPrediction


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


# Measurements are a pure function of the model's config, dtype, attention and the library versions: kept for
# the life of the process, so that every Planner of the same model (tests, benchmarks, a notebook) measures once.
_MEASURERS: dict[tuple[str, str, bool, bool, str | None], Measurer] = {}
_QUANTIZABLE: dict[tuple[str, str, bool], dict[str, tuple[int, int]]] = {}


class Planner:
    """Holds one model's config, meta builds (one per dtype and attention implementation) and measurements, so
    that re-planning (suggestions, solving) costs arithmetic only."""

    def __init__(self, source: ModelSource, trust_remote_code: bool = False, adapter: Adapter | None = None):
        self.source = source
        self.trust_remote_code = trust_remote_code
        self.config = load_config(source, trust_remote_code)
        self.model_dtype = model_dtype(self.config, source)
        self._builds: dict[tuple[str, bool], tuple[Any, ModelLayout]] = {}
        self._key = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        self.adapter = adapter
        self._adapter_bytes: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        self._adapted: dict[tuple[str, str | None, bool], Any] = {}
        if adapter is not None:
            check_base(adapter, self.model)  # exit 3 for an adapter of another base, before anything is planned

    def build(self, dtype: str, eager_attention: bool = False) -> tuple[Any, ModelLayout]:
        """The meta model and its layout at `dtype` (buffers keep the dtype the model's code gives them at that
        dtype). transformers writes the dtype into the config it builds from, so each build gets its own copy."""
        key = (dtype, eager_attention)
        if key not in self._builds:
            model = build_meta_model(
                copy.deepcopy(self.config),
                dtype,
                self.trust_remote_code,
                attn_implementation="eager" if eager_attention else None,
            )
            self._builds[key] = (model, read_layout(model, self.config, dtype))
        return self._builds[key]

    def unmerged_adapter(self, quant: Quantization) -> bool:
        """Whether the plan runs the adapter's LoRA layers unmerged (8/4-bit weights)."""
        return self.adapter is not None and not merges_on_load(quant.mode)

    def adapted_build(self, dtype: str, attn: str | None = None, fake: bool = False) -> Any:
        """The meta model at `dtype` with the adapter's LoRA layers as peft builds them: one build per dtype,
        attention and build kind, shared by the measurer and adapter_bytes."""
        assert self.adapter is not None
        key = (dtype, attn, fake)
        if key not in self._adapted:
            model = build_meta_model(copy.deepcopy(self.config), dtype, self.trust_remote_code, attn, fake=fake)
            self._adapted[key] = attach_meta(model, self.adapter)
        return self._adapted[key]

    def measurer(self, dtype: str, eager_attention: bool = False, unmerged_adapter: bool = False) -> Measurer:
        """What the model's own forward holds, per block, measured on the meta device at `dtype`; with
        `unmerged_adapter`, the forward of the model with the adapter's LoRA layers, as peft builds them."""
        adapter = self.adapter if unmerged_adapter else None
        key = (self._key, dtype, eager_attention, self.trust_remote_code, adapter.fingerprint if adapter else None)
        if key not in _MEASURERS:
            model, layout = self.build(dtype, eager_attention)
            layers = [b.name for b in layout.blocks if b.kind == "layer"]
            attn = "eager" if eager_attention else None
            fake = not measures_on_meta()
            if adapter is not None:  # a build of its own: peft changes the model it wraps
                model = self.adapted_build(dtype, attn, fake)
            elif fake:
                model = build_meta_model(copy.deepcopy(self.config), dtype, self.trust_remote_code, attn, fake=fake)

            def two_layers() -> tuple[Any, list[str], list[str]]:
                small = two_layer_copy(self.config, model, layers, dtype, attn, fake=fake)
                small = attach_meta(small, adapter) if adapter is not None else small
                small_layout = read_layout(small, self.config, dtype)
                small_layers = [b.name for b in small_layout.blocks if b.kind == "layer"]
                return small, [b.name for b in small_layout.blocks], small_layers

            limit = layout.max_position_embeddings
            _MEASURERS[key] = Measurer(model, [b.name for b in layout.blocks], layers, two_layers, limit)
        return _MEASURERS[key]

    def quantizable(self, dtype: str) -> dict[str, tuple[int, int]]:
        """Weights transformers' bitsandbytes integration would quantize (layout.quantizable_linears)."""
        key = (self._key, dtype, self.trust_remote_code)
        if key not in _QUANTIZABLE:
            _QUANTIZABLE[key] = quantizable_linears(self.config, dtype, self.trust_remote_code)
        return _QUANTIZABLE[key]

    @property
    def default_dtype(self) -> str:
        return self.model_dtype.name if self.model_dtype.name in DTYPE_BYTES else "float32"  # type: ignore[return-value]

    @property
    def model(self) -> Any:
        """The meta model at the model's own dtype (what the tests and benchmarks inspect)."""
        return self.build(self.default_dtype)[0]

    @property
    def layout(self) -> ModelLayout:
        return self.build(self.default_dtype)[1]

    # -- steps 2-4 ---------------------------------------------------------------------------------------------
    def check_workload(self, workload: Workload) -> None:
        check_positive(workload)
        limit = max_positions(self.config)  # from the config: a build at another dtype than the plan's is not needed
        if limit and workload.sequence_tokens > limit:
            raise BadInput(
                f"--max-input-tokens {workload.max_input_tokens} + --max-new-tokens {workload.max_new_tokens} = "
                f"{workload.sequence_tokens} tokens is beyond the model's max_position_embeddings ({limit}); "
                "lower one of them"
            )

    def check_gguf(self, inventory: Inventory, settings: PlanSettings) -> None:
        """What transformers cannot load from a GGUF file, refused in one line: bitsandbytes quantization
        (from_pretrained refuses a quantization_config with gguf_file) and disk offload (transformers 5 refuses it;
        4.x's GGUF loading is not planned for it)."""
        if self.source.gguf_file is None:
            return
        if settings.quant.mode != "none":
            raise BadInput(
                f"--quantize {settings.quant.mode}: {self.source.name} is a GGUF file, and transformers cannot "
                "quantize a GGUF with bitsandbytes (from_pretrained refuses a quantization_config beside gguf_file); "
                "plan it without --quantize (it is dequantized to --dtype), or use a safetensors checkpoint"
            )
        if inventory.offload_dir is not None:
            raise BadInput(
                f"--offload-dir: {self.source.name} is a GGUF file, and transformers does not offload a GGUF's "
                "weights to disk; plan it without --offload-dir (GPUs and --cpu-memory)"
            )

    def plan(self, inventory: Inventory, settings: PlanSettings) -> Plan:
        self.check_workload(settings.workload)
        self.check_gguf(inventory, settings)
        dtype, log = resolve_dtype(settings.dtype, self.model_dtype, inventory)
        model, layout = self.build(dtype, settings.eager_attention)
        attn = str(getattr(model.config, "_attn_implementation", None) or "eager")
        if attn not in ATTN_IMPLEMENTATIONS:
            raise BadInput(f"{layout.architecture} runs attention as {attn!r}, which oneke-plan does not plan for")
        if attn == "eager" and not settings.eager_attention:
            log.append(f"attention: {layout.architecture} runs eager attention (no SDPA), so its scores are counted")
        slots = make_slots(inventory, settings.reserve_bytes, settings.cpu_reserve_bytes)
        if not slots:
            raise BadInput("no device to plan for: no GPU was given or detected and --cpu-memory is 0")
        costs = self.block_costs(settings, dtype)
        unmerged = self.unmerged_adapter(settings.quant)
        log += self.measurer(dtype, settings.eager_attention, unmerged).log
        log += self.adapter_notes(settings, dtype, layout)
        layer = next((c for c in costs if c.kind == "layer"), None)
        if layer is not None:
            log.append(
                f"per decoder layer: weights {format_bytes(layer.weights_bytes)}, KV cache "
                f"{format_bytes(layer.kv_cache_bytes)} ({settings.workload.batch_size} x "
                f"{settings.workload.sequence_tokens} tokens), "
                f"prefill activations {format_bytes(layer.activation_bytes)}"
            )
        for slot in slots:
            cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
            log.append(f"{slot.name}: {cap} usable, of which reserve {format_bytes(slot.reserve_bytes)}")
        placement = place(costs, slots, settings.strategy)
        return Plan(
            settings, dtype, attn, slots, costs, placement, layout, log + placement.log + offload_note(placement)
        )

    def adapter_notes(self, settings: PlanSettings, dtype: str, layout: ModelLayout) -> list[str]:
        """What the plan does with the adapter and what it counts (the profile's notes keep these lines)."""
        if self.adapter is None:
            return []
        resident, scratch = self.adapter_bytes(dtype, layout)
        adapter = self.adapter
        head = (
            f"adapter: LoRA r={adapter.r}, {len(adapter.modules)} layers, {format_bytes(adapter.file_tensor_bytes)} "
            f"of tensors in {adapter.directory.name}/adapter_model.safetensors, {format_bytes(sum(resident.values()))} "
            "as peft loads them (its default autocast keeps 16-bit LoRA weights in float32)"
        )
        if merges_on_load(settings.quant.mode):
            return [
                f"{head}; merged into the weights on load (peft merge_and_unload), so the weights are the base "
                "model's size and inference runs as without it; the adapter's tensors and the largest merge "
                f"transient ({format_bytes(max(scratch.values(), default=0))}) are counted as load-time memory on "
                "the devices of the layers they wrap"
            ]
        return [
            f"{head}; kept unmerged ({settings.quant.mode}: merging into quantized weights would requantize them, "
            "losing precision): its tensors are counted with the weights of the layers they wrap, and the LoRA "
            "forward's intermediates are measured with the model's forward on the meta device"
        ]

    def block_costs(self, settings: PlanSettings, dtype: str) -> list[BlockCost]:
        """Every block of the model built at `dtype`, priced for the settings as plan() places them: weights for the
        quantization, and the state and transient peak measured for the workload; and the adapter's tensors, with
        the weights when it stays unmerged (8/4-bit), as load-time memory when it is merged on load (16-bit)."""
        layout = self.build(dtype, settings.eager_attention)[1]
        unmerged = self.unmerged_adapter(settings.quant)
        memory = self.measured(dtype, settings.eager_attention, settings.workload, layout, unmerged)
        quantizable = self.quantizable(dtype) if settings.quant.mode != "none" else None
        if quantizable is not None and not quantizable:
            raise BadInput(
                f"--quantize {settings.quant.mode}: transformers' bitsandbytes integration quantizes no layer of "
                f"{layout.architecture} (it converts nn.Linear and Conv1D modules only), so it would load unchanged; "
                "plan without --quantize"
            )
        costs = block_costs(layout, settings.quant, settings.workload, memory, quantizable)
        if self.adapter is None:
            return costs
        resident, scratch = self.adapter_bytes(dtype, layout)
        if unmerged:
            return [
                replace(c, weights_bytes=c.weights_bytes + resident.get(c.name, 0),
                        unquantized_weights_bytes=c.unquantized_weights_bytes + resident.get(c.name, 0))
                for c in costs
            ]  # fmt: skip
        return [
            replace(c, adapter_load_bytes=resident.get(c.name, 0), merge_scratch_bytes=scratch.get(c.name, 0))
            for c in costs
        ]

    def adapter_bytes(self, dtype: str, layout: ModelLayout) -> tuple[dict[str, int], dict[str, int]]:
        """Per block: the bytes of the adapter's LoRA tensors as peft builds them onto the model at `dtype` (on
        meta: peft's own dtype rule), and the largest transient of merging one of its layers, by hand from peft's
        get_delta_weight (`lora_B @ lora_A`, then that times the scaling: two out x in matrices of the LoRA dtype,
        added in place to the weight)."""
        assert self.adapter is not None
        if dtype not in self._adapter_bytes:
            model = self.adapted_build(dtype)
            blocks = {b.name: b.name for b in layout.blocks}  # each block its own owner: device_owner's longest match
            modules = self.adapter.modules
            resident: dict[str, int] = {}
            scratch: dict[str, int] = {}
            for name, param in lora_parameters(model).items():
                block = str(device_owner(name, blocks))
                resident[block] = resident.get(block, 0) + param.numel() * param.element_size()
                if ".lora_A." in name:
                    pair = modules[lora_module(name)]
                    merge = 2 * pair["lora_B"][0] * pair["lora_A"][1] * param.element_size()
                    scratch[block] = max(scratch.get(block, 0), merge)
            self._adapter_bytes[dtype] = (resident, scratch)
        return self._adapter_bytes[dtype]

    def measured(
        self, dtype: str, eager_attention: bool, workload: Workload, layout: ModelLayout, unmerged_adapter: bool = False
    ) -> MeasuredMemory:
        """Per block, the state and transient peak the model's forward was measured to hold for the workload."""
        measurer = self.measurer(dtype, eager_attention, unmerged_adapter)
        try:
            memory = measurer.block_memory(workload.batch_size, workload.max_input_tokens, workload.sequence_tokens)
        except MeasureError as exc:
            raise BadInput(
                f"{self.source.name}: oneke-plan cannot price {layout.architecture} honestly: it measures memory by "
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

    # -- step 5 ------------------------------------------------------------------------------------------------
    def device_map(self, plan: Plan) -> dict[str, DeviceId]:
        """The plan's placement as an accelerate device_map: each block's name -> its device, grouped where a whole
        module's blocks share a device (accelerate's clean_device_map, as infer_auto_device_map writes them).

        Blocks are what accelerate's own traversal yields (modules it must not split, leaves, loose parameters and
        buffers), so every key is a module or tensor name from_pretrained and dispatch_model accept.
        """
        from accelerate.utils.modeling import clean_device_map

        device_map = clean_device_map(
            {block.name: plan.placement.assignment[block.name] for block in plan.layout.blocks}
        )
        self._check_device_map(device_map, plan)
        return dict(device_map)

    def _check_device_map(self, device_map: dict[str, DeviceId], plan: Plan) -> None:
        """Every parameter and buffer of the meta model is covered, on the device its block was planned for, and
        tied weights share a device: checked tensor by tensor, independently of how the map was written."""
        from accelerate.utils import check_device_map, find_tied_parameters

        model, _ = self.build(plan.dtype, plan.settings.eager_attention)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about keys that name a tensor, not a module: those are fine
            check_device_map(model, device_map)  # raises for a parameter or persistent buffer left without a device
        planned = {t.name: plan.placement.assignment[b.name] for b in plan.layout.blocks for t in b.tensors}
        for name, _tensor in [*model.named_parameters(), *model.named_buffers()]:
            device = device_owner(name, device_map)
            if name in planned and device != planned[name]:
                raise RuntimeError(
                    f"internal error: the device_map puts {name} on {device!r}, the plan on {planned[name]!r}; "
                    "please report this with the command you ran"
                )
        for group in find_tied_parameters(model):
            devices = {device_owner(name, device_map) for name in group}
            if len(devices) > 1:
                raise RuntimeError(f"internal error: tied weights {group} are split over {devices}; please report")

    # -- step 6 ------------------------------------------------------------------------------------------------
    def largest(self, inventory: Inventory, settings: PlanSettings, what: str) -> int:
        """The largest max_input_tokens or batch_size that fits (0 if even 1 does not), by bisection on the
        pure placement; nothing is loaded."""

        def fits(value: int) -> bool:
            trial = replace(settings, workload=replace(settings.workload, **{what: value}))
            return self.plan(inventory, trial).fits

        return bisect_largest(fits, self.solve_bound(settings, what))

    def alternatives(self, inventory: Inventory, settings: PlanSettings) -> list[str]:
        """What would fit instead, each line computed by planning it."""
        lines = []
        order = ["none", "8bit", "4bit"] if self.source.gguf_file is None else ["none"]  # check_gguf
        for mode in order[order.index(settings.quant.mode) + 1 :]:
            trial = self.plan(inventory, replace(settings, quant=replace(settings.quant, mode=mode)))  # type: ignore[arg-type]
            if trial.fits:
                lines.append(f"--quantize {mode}: fits ({peaks_text(trial)})")
        context = self.largest(inventory, settings, "max_input_tokens")
        if context >= 1:
            lines.append(f"--max-input-tokens {context} (with batch {settings.workload.batch_size}): fits")
        if settings.workload.batch_size > 1:
            batch = self.largest(inventory, settings, "batch_size")
            if batch >= 1:
                lines.append(f"--batch-size {batch}: fits")
        if inventory.gpus:
            unbounded_cpu = replace(inventory, cpu_bytes=1 << 62)
            trial = self.plan(unbounded_cpu, settings)
            if trial.fits and "cpu" in trial.placement.estimates:
                need = trial.placement.estimates["cpu"].total_bytes
                if need > inventory.cpu_bytes:
                    lines.append(
                        f"CPU offload: --cpu-memory {format_bytes(need).replace(' ', '')} "
                        f"(about {offload_slowdown_of(trial):.0f}x slower: weights cross PCIe at every step)"
                    )
        if inventory.offload_dir is None and self.source.gguf_file is None:
            trial = self.plan(replace(inventory, offload_dir="offload", disk_bytes=None), settings)
            if trial.fits:
                lines.append(f"disk offload: --offload-dir DIR (about {offload_slowdown_of(trial):.0f}x slower)")
        return lines

    def gpu_only_alternatives(self, inventory: Inventory, settings: PlanSettings) -> list[str]:
        """For a plan that offloads: what would fit on the GPUs alone (each line computed by planning it)."""
        gpus_only = replace(inventory, cpu_bytes=0, offload_dir=None, disk_bytes=None)
        if self.plan(gpus_only, settings).fits:
            return ["the same workload without offload"]
        return [line for line in self.alternatives(gpus_only, settings) if "offload" not in line]

    def does_not_fit_message(self, plan: Plan, inventory: Inventory) -> str:
        placement = plan.placement
        left = [c for c in plan.costs if c.name in placement.unplaced]
        left_bytes = sum(c.weights_bytes + max(c.kv_cache_bytes, c.prefill_state_bytes) for c in left)
        lines = [
            f"does not fit: {len(left)} blocks ({left[0].name} .. {left[-1].name}) are left over, "
            f"{format_bytes(left_bytes)} of weights and KV cache, after every device was filled:"
        ]
        refusal = placement.first_refusal()
        if refusal is not None:
            lines.append(f"  first block that did not fit: {explain_refusal(refusal, plan.slots)}")
        for slot in plan.slots:
            est = placement.estimates.get(slot.id)
            used = est.total_bytes if est else 0
            cap = "unbounded" if slot.capacity_bytes is None else format_bytes(slot.capacity_bytes)
            lines.append(f"  {slot.name}: {format_bytes(used)} of {cap} planned")
        options = self.alternatives(inventory, plan.settings)
        lines.append("what would fit:" if options else "nothing tried fits; add GPUs or memory")
        lines += [f"  {line}" for line in options]
        return "\n".join(lines)

    # -- all steps ---------------------------------------------------------------------------------------------
    def plan_profile(self, inventory: Inventory, settings: PlanSettings, solve: str | None = None) -> PlanResult:
        """Everything oneke-plan does between reading its flags and printing for one copy of the model (replicas:
        replica_planner.py): solve for the largest `max_input_tokens` or `batch_size` if asked, plan, and write the
        profile. Raises DoesNotFit (with what would fit) or BadInput; never anything else for a model it could
        build."""
        solved = None
        self.check_workload(replace(settings.workload, **{solve: 1}) if solve else settings.workload)
        if solve:
            best = self.largest(inventory, settings, solve)
            if best == 0:
                plan = self.plan(inventory, replace(settings, workload=replace(settings.workload, **{solve: 1})))
                raise DoesNotFit(
                    f"--solve {solve.replace('_', '-')}: even 1 does not fit.\n"
                    + self.does_not_fit_message(plan, inventory)
                )
            settings = replace(settings, workload=replace(settings.workload, **{solve: best}))
            solved = f"the largest {solve} that fits is {best}"
        plan = self.plan(inventory, settings)
        if solve:
            plan.log.append(self._why_not_more(inventory, settings, solve))
        profile = self.profile(plan, inventory)  # raises DoesNotFit with what would fit
        gpu_only = None
        if inventory.gpus and {"cpu", "disk"} & set(profile.device_map.values()):
            gpu_only = self.gpu_only_alternatives(inventory, settings)
        return PlanResult(plan, profile, solved, gpu_only)

    def _why_not_more(self, inventory: Inventory, settings: PlanSettings, what: str) -> str:
        """Why --solve stopped where it did: what the next value's plan could not place, or the bound it hit."""
        value = getattr(settings.workload, what)
        flag = f"--{what.replace('_', '-')}"
        if value >= self.solve_bound(settings, what):
            return f"solve: {flag} {value}, the most this model's positions (or the search) allow"
        more = self.plan(inventory, replace(settings, workload=replace(settings.workload, **{what: value + 1})))
        refusal = more.placement.first_refusal()
        why = explain_refusal(refusal, more.slots) if refusal is not None else "it does not fit"
        return f"solve: {flag} {value} fits; at {value + 1}, {why}"

    def solve_bound(self, settings: PlanSettings, what: str) -> int:
        """The most --solve tries for `what`: the prompt tokens the model's positions leave beside max_new_tokens,
        or MAX_SOLVED_BATCH prompts."""
        if what == "max_input_tokens":
            return (max_positions(self.config) or 1 << 20) - settings.workload.max_new_tokens
        return MAX_SOLVED_BATCH

    # -- the profile -------------------------------------------------------------------------------------------
    def profile(self, plan: Plan, inventory: Inventory, speed: SpeedPrediction | None = None) -> Profile:
        """The plan written as a profile (DoesNotFit with what would fit when it does not); `speed`: the plan's
        predict_speed, when the caller has it already."""
        if not plan.fits:
            raise DoesNotFit(self.does_not_fit_message(plan, inventory))
        device_map = self.device_map(plan)
        devices_used = set(device_map.values())
        if self.adapter is not None and ("disk" in devices_used or ("cpu" in devices_used and len(devices_used) > 1)):
            raise BadInput(
                f"--adapter: the plan offloads weights ({', '.join(sorted(map(str, devices_used)))}), and peft builds "
                "LoRA layers on the device of the layer they wrap, which accelerate's offload keeps empty; plan "
                "without offload (--quantize 4bit, a shorter context, more GPU memory)"
            )
        devices = []
        used = [s for s in plan.slots if s.is_gpu or s.id in plan.placement.estimates]
        for slot in used:
            gpu = next((g for g in inventory.gpus if g.index == slot.id), None)
            total = gpu.total_bytes if gpu else slot.capacity_bytes
            cc = gpu.capability_text if gpu else None
            name = gpu.name if gpu else slot.name
            reserve = slot.reserve_bytes if slot.id != "disk" else 0
            devices.append(ProfileDevice(slot.id, name, total, slot.capacity_bytes, cc, reserve))
        estimate = {slot.id: plan.placement.estimates.get(slot.id, DeviceEstimate()) for slot in used}
        return Profile(
            model=ModelInfo(
                source=self.source.name,
                architecture=plan.layout.architecture,
                model_type=plan.layout.model_type,
                parameter_count=plan.layout.parameter_count,
                config_fingerprint=self.source.fingerprint,
            ),
            dtype=plan.dtype,
            attn_implementation=plan.attn_implementation,
            quantization=plan.settings.quant,
            workload=plan.settings.workload,
            devices=devices,
            device_map=device_map,
            estimate=estimate,
            strategy=plan.settings.strategy,
            offload_dir=inventory.offload_dir if "disk" in device_map.values() else None,
            created_by=f"oneke-plan {__version__}",
            notes=[line for line in plan.log if line.startswith(("warning", "adapter:"))],
            adapter=self.adapter.record(merges_on_load(plan.settings.quant.mode)) if self.adapter else None,
            speed=(speed or predict_speed(plan, inventory)).to_dict(),
        )


