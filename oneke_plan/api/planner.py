"""oneke-plan's algorithm for one copy of the model, step by step, each step saying what it decided and why.

1. Build the model on the meta device and read its blocks; measure what its forward holds per block (measure/).
2. Choose the dtype as transformers' `dtype="auto"` does (the config's, else the weights'), falling back to fp16
   only where a GPU cannot run bf16.
3. Price every block: weights for the dtype/quantization, KV cache and activations for the workload (plan/fit.py).
4. Place blocks on devices so that weights + KV + workspace + reserve fit each device (plan/fit.py).
5. Write the placement itself as the device_map (block name -> device, grouped by accelerate's clean_device_map)
   and check that it covers every parameter and buffer on its planned device, tied weights together.
6. If nothing fits: say by how much, and compute (not guess) what would: 8-bit, 4-bit, a shorter context, a
   smaller batch, then CPU or disk offload (plan/solve.py).

The steps that are arithmetic live in plan/ and the measuring in measure/; the Planner runs them in order for one
planning run, owns that run's measurements (so re-planning for --solve and the suggestions costs arithmetic
only), checks the settings against the model, and writes the log lines, the messages and the profile.
"""

from __future__ import annotations

from typing import Any

from oneke_plan import __version__
from oneke_plan.api.plan_messages import (
    adapter_notes,
    alternative_line,
    card_memory_lines,
    does_not_fit_message,
    pricing_lines,
    why_not_more,
)
from oneke_plan.core.errors import BadInput, DoesNotFit
from oneke_plan.measure.adapter import Adapter, check_base
from oneke_plan.measure.layout import device_map_problem, load_config, max_positions
from oneke_plan.measure.measurements import Measurements, model_dtype
from oneke_plan.measure.measurer import Measurer
from oneke_plan.plan.blocks import ModelLayout
from oneke_plan.plan.fit import BlockCost, DeviceEstimate, DeviceId, device_owner, place, price
from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.memory import DTYPE_BYTES, Quantization, Workload, merges_on_load
from oneke_plan.plan.model_source import ModelSource
from oneke_plan.plan.plans import (
    Plan,
    PlanResult,
    PlanSettings,
    check_positive,
    cpu_quantization_note,
    make_slots,
    offload_note,
    predict_speed,
    resolve_dtype,
)
from oneke_plan.plan.profile import (
    ATTN_IMPLEMENTATIONS,
    ModelInfo,
    Profile,
    ProfileDevice,
)
from oneke_plan.plan.solve import alternatives, largest, one_more, solve_bound, with_value, without_offload
from oneke_plan.plan.speed import SpeedPrediction


class Planner:
    """One model's planning run: its config, and the measurements (meta builds per dtype and attention
    implementation, measured memory) that every plan of the run shares, so that re-planning (suggestions,
    solving) costs arithmetic only."""

    def __init__(self, source: ModelSource, trust_remote_code: bool = False, adapter: Adapter | None = None):
        self.source = source
        self.trust_remote_code = trust_remote_code
        self.config = load_config(source, trust_remote_code)
        self.model_dtype = model_dtype(self.config, source)
        self.adapter = adapter
        self.measurements = Measurements(self.config, trust_remote_code, adapter)
        if adapter is not None:
            check_base(adapter, self.model)  # exit 3 for an adapter of another base, before anything is planned

    def build(self, dtype: str, eager_attention: bool = False) -> tuple[Any, ModelLayout]:
        """The meta model and its layout at `dtype`."""
        return self.measurements.build(dtype, eager_attention)

    def measurer(self, dtype: str, eager_attention: bool = False, unmerged_adapter: bool = False) -> Measurer:
        """What the model's own forward holds, per block, measured on the meta device at `dtype`."""
        return self.measurements.measurer(dtype, eager_attention, unmerged_adapter)

    def quantizable(self, dtype: str) -> dict[str, tuple[int, int]]:
        """Weights transformers' bitsandbytes integration would quantize, with their (out, in) sizes."""
        return self.measurements.quantizable(dtype)

    def unmerged_adapter(self, quant: Quantization) -> bool:
        """Whether the plan runs the adapter's LoRA layers unmerged (8/4-bit weights)."""
        return self.adapter is not None and not merges_on_load(quant.mode)

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
        """Check the settings, choose the dtype, price every block and place them (what fits or not is the
        Plan's answer: nothing here raises DoesNotFit)."""
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
        log += self.measurer(dtype, settings.eager_attention, self.unmerged_adapter(settings.quant)).log
        if self.adapter is not None:
            log += adapter_notes(self.adapter, self.measurements.adapter_bytes(dtype, layout), settings.quant.mode)
        log += card_memory_lines(inventory) + pricing_lines(costs, slots, settings.workload)
        placement = place(costs, slots, settings.strategy)
        plan = Plan(settings, dtype, attn, slots, costs, placement, layout, log + placement.log)
        plan.log += offload_note(plan, inventory) + cpu_quantization_note(plan)
        return plan

    def block_costs(self, settings: PlanSettings, dtype: str) -> list[BlockCost]:
        """Every block of the model built at `dtype`, priced for the settings as plan() places them, from this
        run's measurements (plan/fit.py's price)."""
        layout = self.build(dtype, settings.eager_attention)[1]
        unmerged = self.unmerged_adapter(settings.quant)
        memory = self.measurements.memory(
            self.source.name, dtype, settings.eager_attention, settings.workload, unmerged
        )
        quantizable = self.quantizable(dtype) if settings.quant.mode != "none" else None
        adapter = self.measurements.adapter_bytes(dtype, layout) if self.adapter is not None else None
        return price(layout, settings.quant, settings.workload, memory, quantizable, adapter)

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
        """Every parameter and buffer of the meta model is covered, tied weights share a device (the loader asks the
        same of a profile's map), and each tensor is on the device its block was planned for: checked tensor by
        tensor, independently of how the map was written."""
        model, _ = self.build(plan.dtype, plan.settings.eager_attention)
        problem = device_map_problem(model, device_map)
        if problem:
            raise RuntimeError(f"internal error: the device_map it wrote: {problem}; please report this")
        planned = {t.name: plan.placement.assignment[b.name] for b in plan.layout.blocks for t in b.tensors}
        for name, _tensor in [*model.named_parameters(), *model.named_buffers()]:
            device = device_owner(name, device_map)
            if name in planned and device != planned[name]:
                raise RuntimeError(
                    f"internal error: the device_map puts {name} on {device!r}, the plan on {planned[name]!r}; "
                    "please report this with the command you ran"
                )

    # -- step 6 ------------------------------------------------------------------------------------------------
    def largest(self, inventory: Inventory, settings: PlanSettings, what: str) -> int:
        """The largest max_input_tokens or batch_size that fits (0 if even 1 does not), by bisection on the
        pure placement; nothing is loaded."""
        return largest(self.plan, inventory, settings, what, self.solve_bound(settings, what))

    def solve_bound(self, settings: PlanSettings, what: str) -> int:
        """The most --solve tries for `what` (plan/solve.py's solve_bound for this model's positions)."""
        return solve_bound(settings, what, max_positions(self.config))

    def alternative_lines(self, inventory: Inventory, settings: PlanSettings, offload: bool = True) -> list[str]:
        """What would fit instead, each line computed by planning it."""
        gguf = self.source.gguf_file is not None  # check_gguf
        found = alternatives(self.plan, inventory, settings, max_positions(self.config), gguf, offload)
        return [alternative_line(alternative, settings.workload, inventory) for alternative in found]

    def gpu_only_alternatives(self, inventory: Inventory, settings: PlanSettings) -> list[str]:
        """For a plan that offloads: what would fit on the GPUs alone (each line computed by planning it)."""
        gpus_only = without_offload(inventory)
        if self.plan(gpus_only, settings).fits:
            return ["the same workload without offload"]
        return self.alternative_lines(gpus_only, settings, offload=False)

    def does_not_fit_message(self, plan: Plan, inventory: Inventory) -> str:
        gguf = self.source.gguf_file is not None
        found = alternatives(self.plan, inventory, plan.settings, max_positions(self.config), gguf)
        return does_not_fit_message(plan, found, inventory)

    # -- all steps ---------------------------------------------------------------------------------------------
    def plan_profile(self, inventory: Inventory, settings: PlanSettings, solve: str | None = None) -> PlanResult:
        """Everything oneke-plan does between reading its flags and printing for one copy of the model (replicas:
        replica_planner.py): solve for the largest `max_input_tokens` or `batch_size` if asked, plan, and write the
        profile. Raises DoesNotFit (with what would fit) or BadInput; never anything else for a model it could
        build."""
        solved = None
        self.check_workload(with_value(settings, solve, 1).workload if solve else settings.workload)
        if solve:
            best = self.largest(inventory, settings, solve)
            if best == 0:
                plan = self.plan(inventory, with_value(settings, solve, 1))
                raise DoesNotFit(
                    f"--solve {solve.replace('_', '-')}: even 1 does not fit.\n"
                    + self.does_not_fit_message(plan, inventory)
                )
            settings = with_value(settings, solve, best)
            solved = f"the largest {solve} that fits is {best}"
        plan = self.plan(inventory, settings)
        if solve:
            more = one_more(self.plan, inventory, settings, solve, max_positions(self.config))
            plan.log.append(why_not_more(solve, getattr(settings.workload, solve), more))
        profile = self.profile(plan, inventory)  # raises DoesNotFit with what would fit
        gpu_only = None
        if inventory.gpus and {"cpu", "disk"} & set(profile.device_map.values()):
            gpu_only = self.gpu_only_alternatives(inventory, settings)
        return PlanResult(plan, profile, solved, gpu_only)

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
