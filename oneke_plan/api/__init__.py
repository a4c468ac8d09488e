"""The Python API: what oneke-plan and oneke-run do, as functions for a script or a notebook.

    from oneke_plan import api

    profile = api.plan("oneke", gpus=["24GiB", "12GiB"]).profile   # OneKE's placement on that machine
    model, tokenizer = api.load(profile, "/models/OneKE")          # loaded as planned, after the same checks
    records = api.read_records("examples/deepke/NER/test.json")    # DeepKE's converted file, or raw text + task
    for line in api.extract(model, tokenizer, profile, records):   # each answer as soon as it is done
        print(line["id"], line.get("parsed"))

- plan: a model for a machine (described GPUs, an inventory file, or those detected) -> PlanResult, whose `profile`
  is what oneke-plan writes (`output=` writes it, with oneke-plan's rules for replacing a file);
- load: a profile -> (model, tokenizer), checked as oneke-run checks (machine, tokenizer, checkpoint names,
  device_map, weights per device, finite logits);
- read_records / extract: prompts -> answer lines (docs/output-format.md), batched as oneke-run batches them, in
  memory or journaled to an output file exactly as oneke-run writes it (resume, overwrite, out-of-memory retries);
- run: oneke-run itself (profile file and input file in, output file out, torchrun workers), returning RunSummary.

Errors are oneke_plan.core.errors': BadInput (what the user gave is wrong; exit 2 in the CLIs) and DoesNotFit (the model
does not fit, or the machine does not match the profile; exit 3), each one line that says what to do; the flags it
names are the CLIs', which are these functions' parameters. Sizes are ints in bytes, or strings such as "24GiB"
(GiB = 2**30 bytes, GB = 10**9). Notes (what a step found; what force=True let through) go to a Report: the default
logs them on the `oneke_plan` logger.

The CLIs are flag parsing and printing around these functions (oneke_plan/cli/).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from oneke_plan.core.errors import BadInput, Interrupted, interrupted_by
from oneke_plan.core.sizes import SizeError, parse_size
from oneke_plan.formats.templates import TEMPLATES, check_tokenizer, default_template
from oneke_plan.plan.memory import DEFAULT_GPU_RESERVE_BYTES, QUANT_MODES, Quantization, QuantMode, Workload
from oneke_plan.plan.profile import Profile, read_profile
from oneke_plan.plan.vllm_plan import ENGINES

if TYPE_CHECKING:
    from oneke_plan.api.planner import PlanResult
    from oneke_plan.extract.inputs import OutputWriter, PromptRecord
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.runner import Decoder, Runner, RunStats
    from oneke_plan.extract.workers import Worker
    from oneke_plan.measure.adapter import Adapter
    from oneke_plan.plan.model_source import ModelSource

__all__ = [
    "DEFAULT_WORKLOAD",
    "DTYPES",
    "ENGINES",
    "LANGUAGES",
    "QUANT_TYPES",
    "SOLVE_FOR",
    "STRATEGIES",
    "Extraction",
    "GpuMemory",
    "Report",
    "RunSummary",
    "extract",
    "load",
    "plan",
    "plan_document",
    "read_profile",
    "read_records",
    "run",
]

log = logging.getLogger("oneke_plan")

DEFAULT_WORKLOAD = Workload(max_input_tokens=512, max_new_tokens=512, batch_size=4)
"""What oneke-plan plans for unless told otherwise: tokens per prompt, tokens per answer, prompts per batch."""

# The values each choice takes (the CLIs offer the same ones).
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")
STRATEGIES = ("fill", "balanced")
SOLVE_FOR = ("max-input-tokens", "batch-size")
LANGUAGES = ("zh", "en")

PathLike = str | os.PathLike[str]


class Report:
    """Where the API says what it finds while it works. This default logs notes as warnings on the `oneke_plan`
    logger (Python prints those to stderr unless logging is configured) and the loaded weights at info level;
    oneke-plan and oneke-run print them instead."""

    def note(self, text: str) -> None:
        """One line: something the user should know (a skipped input line, what force=True let through)."""
        log.warning(text)

    def weights_loaded(self, profile: Profile, loaded_bytes: dict[int | str, int]) -> None:
        """Right after loading, before the finite-output check: the bytes of the model's weights on each device of
        `profile` (GPU index, "cpu", "disk"), as loaded (loaded_weights.measured_weight_bytes)."""
        planned = {d: int(e.get("weights_bytes", 0)) for d, e in profile.estimate.items()}
        log.info("weights per device, loaded (bytes): %s; planned: %s", loaded_bytes, planned)


# ---------------------------------------------------------------------------------------------------- planning


def plan(
    model: PathLike,
    gpus: Sequence[str] | None = None,
    *,
    inventory_file: PathLike | None = None,
    cpu_memory: str | int | None = None,
    offload_dir: str | None = None,
    max_input_tokens: int = DEFAULT_WORKLOAD.max_input_tokens,
    max_new_tokens: int = DEFAULT_WORKLOAD.max_new_tokens,
    batch_size: int = DEFAULT_WORKLOAD.batch_size,
    dtype: str = "auto",
    quantize: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
    reserve: str | int | Sequence[str | int] | None = None,
    bandwidth: str | float | Sequence[str | float] | None = None,
    tflops: str | float | Sequence[str | float] | None = None,
    strategy: str = "fill",
    eager_attention: bool = False,
    template: str | None = None,
    solve: str | None = None,
    replicas: int | str = 1,
    nodes: int = 1,
    trust_remote_code: bool = False,
    adapter: PathLike | None = None,
    output: PathLike | None = None,
    plot: PathLike | None = None,
    overwrite: bool = False,
    report: Report | None = None,
) -> PlanResult:
    """Plan how `model` fits a machine: what oneke-plan does, each parameter one of its flags.

    `model`: "oneke" (the built-in config: no weights needed), a model directory, or a repo id in the local Hugging
    Face cache. The machine: `gpus` (each a size such as "24GiB", a card name such as "RTX 3090", or NAME:SIZE, in
    device order) or `inventory_file` (YAML), else the GPUs detected here; `cpu_memory` (bytes or a size string) is
    host memory the model may use for offloaded weights; `offload_dir` enables disk offload. The workload: tokens
    per prompt and per answer, prompts per batch. `reserve`: bytes each GPU keeps for the CUDA context, one value
    for every GPU ("2GiB") and/or per device ("1=3GiB", "cpu=4GiB"), as a value or a list of them (default 1 GiB
    a GPU, 2 GiB for the CPU). `bandwidth` (GB/s) and `tflops` (dense 16-bit TFLOPS) give the speed prediction
    the rates the catalog does not know, in the same forms ("cpu=19.5"). `solve`: "max_input_tokens" or
    "batch_size" to plan for the largest that fits. `template`: the chat template the profile records for
    oneke-run's prompts (templates.TEMPLATES), by default the one the model's config implies. `replicas`: copies
    of the model (a number, or "auto"), on `nodes` identical nodes. `adapter`: a LoRA adapter folder (peft's
    adapter_config.json and adapter_model.safetensors) oneke-run will apply: merged on load in 16-bit, kept
    unmerged with `quantize`; its memory is counted and it is fingerprinted in the profile (DoesNotFit for an
    adapter of another base). `output`: write the profile there (a file oneke-plan wrote, or any regular file with
    `overwrite`; never a file of the model's directory); `plot`: write the per-device picture there as SVG (same
    rules).

    Returns the PlanResult: `profile` (the Profile oneke-run applies), `plan` (blocks, costs, placement, the log),
    what solving found, and, when the plan offloads, what would fit on the GPUs alone. Raises DoesNotFit (saying
    what would fit) or BadInput.
    """
    from oneke_plan.api.planner import Planner, PlanSettings, check_positive, check_replica_counts
    from oneke_plan.api.report import drawn_by_oneke_plan, plot_svg
    from oneke_plan.plan.catalog import GB_PER_S, TFLOPS
    from oneke_plan.plan.inventory import apply_device_values, build_inventory, parse_device_values, parse_rate
    from oneke_plan.plan.model_source import resolve_model
    from oneke_plan.plan.profile import write_atomic, written_by_oneke_plan

    report = report or Report()
    for flag, value, allowed in (
        ("--dtype", dtype, DTYPES),
        ("--quantize", quantize, QUANT_MODES),
        ("--quant-type", quant_type, QUANT_TYPES),
        ("--strategy", strategy, STRATEGIES),
        ("--solve", solve.replace("_", "-") if solve else None, (None, *SOLVE_FOR)),
        ("--template", template, (None, *TEMPLATES)),
    ):
        _one_of(flag, value, allowed)
    source = resolve_model(str(model))
    found = _read_adapter(adapter) if adapter is not None else None
    target = Path(output) if output is not None else None
    picture = Path(plot) if plot is not None else None
    if picture is not None and target is not None and picture.absolute() == target.absolute():
        raise BadInput(f"--plot {picture}: is also -o's file; give the picture its own name, e.g. machine.svg")
    replaced = replaced_plot = None
    if target is not None:
        replaced = _output_target(
            target, "-o", overwrite, source.directory, written_by_oneke_plan, "a profile", ".yaml"
        )
    if picture is not None:
        replaced_plot = _output_target(
            picture, "--plot", overwrite, source.directory, drawn_by_oneke_plan, "a picture", ".svg"
        )
    reserves = parse_device_values("--reserve", _listed(reserve), lambda v, where: _size(where, v))
    bandwidths = parse_device_values(
        "--bandwidth", _listed(bandwidth), lambda v, where: parse_rate(v, GB_PER_S, where, "GB/s")
    )
    throughputs = parse_device_values(
        "--tflops", _listed(tflops), lambda v, where: parse_rate(v, TFLOPS, where, "TFLOPS")
    )
    reserve_bytes = DEFAULT_GPU_RESERVE_BYTES if reserves.every_gpu is None else reserves.every_gpu
    inventory = build_inventory(
        list(gpus) if gpus else None,
        Path(inventory_file) if inventory_file is not None else None,
        cpu_memory,
        offload_dir,
    )
    inventory = apply_device_values(inventory, reserves, bandwidths, throughputs)
    if inventory.source == "detected" and not inventory.gpus:
        import torch

        why = f" (torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None else ""
        report.note(
            f"no CUDA GPU detected here{why}, so this plan is for the CPU alone; describe the machine you plan for "
            "with --gpu (e.g. --gpu 24GiB --gpu 12GiB) or --inventory"
        )
    settings = PlanSettings(
        workload=Workload(max_input_tokens, max_new_tokens, batch_size),
        quant=Quantization(cast(QuantMode, quantize), quant_type, double_quant),
        dtype=dtype,
        strategy=strategy,
        reserve_bytes=reserve_bytes,
        eager_attention=eager_attention,
    )
    # Bad numbers are refused before the model's config is read (that imports transformers: about a second).
    check_positive(settings.workload)
    replica_count = _replica_count(replicas)
    check_replica_counts(replica_count, nodes)
    planner = Planner(source, trust_remote_code=trust_remote_code, adapter=found)
    result = planner.plan_profile(inventory, settings, solve.replace("-", "_") if solve else None, replica_count, nodes)
    chosen, why = (template, "--template") if template else default_template(source.config)
    result = replace(result, profile=replace(result.profile, template=chosen), template_reason=why)
    if target is not None:
        write_atomic(target, result.profile.to_yaml(), replaced)
    if picture is not None:
        write_atomic(picture, plot_svg(result), replaced_plot)
    return result


def _read_adapter(directory: PathLike) -> Adapter:
    """The adapter folder, read and fingerprinted, once peft is known to be there (BadInput otherwise)."""
    from oneke_plan.measure.adapter import read_adapter, require_peft

    require_peft()
    return read_adapter(Path(directory))


def _run_adapter(profile: Profile, adapter: PathLike | None) -> Adapter | None:
    """The adapter oneke-run applies: `adapter`, else the one the profile was planned with; it must be that one
    (adapter.check_recorded: DoesNotFit)."""
    from oneke_plan.measure.adapter import check_recorded

    if adapter is None and profile.adapter is None:
        return None
    found = _read_adapter(adapter if adapter is not None else profile.adapter["path"])  # type: ignore[index]
    check_recorded(found, profile.adapter)
    return found


def plan_document(result: PlanResult) -> dict[str, Any]:
    """`oneke-plan --format json`'s document: the profile's content and the summary's figures (docs/profile-format.md,
    "JSON output"), plain JSON types."""
    from oneke_plan.api.report import plan_document as document

    return document(result)


def _listed(value: Any) -> list[Any]:
    """A flag that may be given once or repeated: None -> [], one value -> [value], a list as it is."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _one_of(flag: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise BadInput(f"{flag} {value!r}: give one of {', '.join(repr(a) for a in allowed if a is not None)}")


def _size(flag: str, value: str | int) -> int:
    """`value` in bytes: an int as it is, a string such as "24GiB" parsed (BadInput naming `flag` otherwise)."""
    try:
        return parse_size(value)
    except SizeError as exc:
        raise BadInput(f"{flag}: {exc}") from None


def _replica_count(replicas: int | str) -> int | str:
    """A number of replicas, or "auto"."""
    if replicas == "auto" or isinstance(replicas, int):
        return replicas
    try:
        return int(replicas)
    except ValueError:
        raise BadInput(f"--replicas {replicas!r}: give a number of replicas, or auto") from None


def _output_target(
    path: Path,
    flag: str,
    overwrite: bool,
    model_dir: Path | None,
    ours: Callable[[Path], bool],
    what: str,
    suffix: str,
) -> os.stat_result | None:
    """Check an output path (`-o`, `--plot`) before planning; return what it is now (None: absent) for the write
    to confirm.

    Replaced only if it is a regular single-link file (oneke_plan.io.files) and `ours` (a `what` oneke-plan wrote), or
    --overwrite says so; a file of the model's own directory never. `suffix`: the file kind's, for the example name.
    """
    from oneke_plan.io.files import replaceable_stat

    if path.is_dir():
        raise BadInput(f"{flag} {path}: is a folder; give a file name such as {path}/machine{suffix}")
    existing = replaceable_stat(path, flag)
    if existing is None:
        return None
    if model_dir is not None and Path(model_dir).resolve() in path.resolve().parents:
        raise BadInput(
            f"{flag} {path}: is a file of the model {model_dir}; oneke-plan never replaces it: choose another path"
        )
    if not overwrite and not ours(path):
        raise BadInput(
            f"{flag} {path}: exists and is not {what} written by oneke-plan; choose another path, or pass --overwrite "
            "to replace it"
        )
    return existing


# ---------------------------------------------------------------------------------------------------- loading


def load(
    profile: Profile | PathLike,
    model: PathLike | None = None,
    *,
    offload_dir: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    adapter: PathLike | None = None,
    report: Report | None = None,
) -> tuple[Any, Any]:
    """Load a model exactly as `profile` (a Profile, or a profile file) places it; returns (model, tokenizer).

    `model`: the checkpoint directory or a cached repo id (default: the profile's source, when it is a directory).
    The checks are oneke-run's, cheapest first: the machine matches the profile (else DoesNotFit; with `force`, each
    mismatch is a note), the device_map can run, the offload folder is usable, the tokenizer loads, the
    checkpoint's tensor names are the model's; then the load, the weights per device (Report.weights_loaded), and
    one forward pass whose logits must be finite (else BadInput). Under torchrun, this worker's replica is loaded.
    `offload_dir` confirms a folder for disk-offloaded weights other than a new one inside the current folder.
    `adapter`: the LoRA adapter folder (default: the profile's, when it was planned with one), which must be the
    one planned with (DoesNotFit otherwise) and match the model's layers.
    """
    from oneke_plan.extract.workers import Worker

    report = report or Report()
    profile = profile if isinstance(profile, Profile) else read_profile(Path(profile))
    source = _model_source(profile, model, trust_remote_code)
    found = _run_adapter(profile, adapter)
    profile = replace(profile, offload_dir=_offload_folder(profile.offload_dir, offload_dir))
    profile = _workers_profile(profile, Worker.from_env())
    _check_machine(profile, source, force, report)
    return _load_checked(profile, source, trust_remote_code, report, found)


def _model_source(profile: Profile, model: PathLike | None, trust_remote_code: bool) -> ModelSource:
    """The checkpoint to load: `model`, else the profile's source; never the built-in config (it has no weights)."""
    from oneke_plan.plan.model_source import resolve_model

    if trust_remote_code and not model:
        raise BadInput("--trust-remote-code runs code from the model directory: name it yourself with --model")
    model_name = model or profile.model.get("source")
    if not model_name or model_name == "oneke":
        raise BadInput(
            "the profile was planned from the built-in OneKE config, which has no weights: pass "
            "--model DIR (OneKE's checkpoint directory) or --model zjunlp/OneKE (from the local cache)"
        )
    try:
        return resolve_model(str(model_name))
    except BadInput:
        if model or Path(str(model_name)).expanduser().exists():
            raise
        # oneke-plan records a model directory as it was typed: a relative one is relative to where it ran
        raise BadInput(
            f"the profile's model.source {model_name!r} (the default --model) is neither a folder here "
            f"({Path.cwd()}) nor a repo id in the local Hugging Face cache; pass --model with the model's directory"
        ) from None


def _offload_folder(from_profile: str | None, from_caller: str | None) -> str | None:
    """The folder disk-offloaded weights are written to. A profile is data from elsewhere: it may name a relative
    folder under the current one, but writing anywhere else takes the user's own --offload-dir."""
    if from_caller is not None:
        return from_caller
    if from_profile is None:
        return None
    path = Path(from_profile)
    inside = not path.is_absolute() and Path.cwd() in (Path.cwd() / path).resolve().parents
    # Only a new folder, or one that holds nothing but an earlier offload (accelerate's index.json and .dat files).
    ours = not path.exists() or (
        path.is_dir() and all(f.name == "index.json" or f.suffix == ".dat" for f in path.iterdir())
    )
    if not (inside and ours):
        raise BadInput(
            f"the profile offloads weights to {from_profile!r}, which is outside the current folder or holds other "
            f"files; pass --offload-dir {from_profile} to confirm, or another folder"
        )
    return from_profile


def _workers_profile(profile: Profile, worker: Worker) -> Profile:
    """The profile this process runs: under torchrun (or with a profile of several replicas) the workers must be
    the profile's replicas on its nodes, and each runs its own replica."""
    if worker.distributed or profile.replicas:
        worker.check(profile.replica_count, profile.nodes)
        return profile.replica(worker.local_rank)
    return profile


def _check_machine(profile: Profile, source: ModelSource, force: bool, report: Report) -> None:
    """machine.check_machine; with `force`, each mismatch it lets through is a note."""
    from oneke_plan.load.machine import check_machine

    for problem in check_machine(profile, source, force=force):
        report.note(f"warning (--force): {problem}")


def _load_checked(
    profile: Profile, source: ModelSource, trust_remote_code: bool, report: Report, adapter: Adapter | None = None
) -> tuple[Any, Any]:
    """Everything cheap first (device_map, offload folder, tokenizer), then load (with the adapter), report the
    weights per device, and check the model computes finite numbers."""
    from oneke_plan.load.loaded_weights import measured_weight_bytes
    from oneke_plan.load.loader import check_before_load, check_finite_outputs, load_model
    from oneke_plan.measure.checkpoint import read_checkpoint

    tokenizer = check_before_load(profile, source, trust_remote_code=trust_remote_code)
    check_tokenizer(TEMPLATES[profile.template], tokenizer, str(source.directory))  # before any weight is read
    checkpoint = read_checkpoint(source.directory) if source.directory else None
    model = load_model(profile, source, trust_remote_code=trust_remote_code, checkpoint=checkpoint, adapter=adapter)
    stored = checkpoint.dtypes if checkpoint else None
    report.weights_loaded(
        profile, measured_weight_bytes(model, profile.device_map, profile.dtype, profile.offload_dir, stored)
    )
    check_finite_outputs(model, tokenizer, str(source.directory))
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- extraction


def read_records(
    input: PathLike,
    task: str | None = None,
    schema: str | list[Any] | dict[str, Any] | None = None,
    lang: str = "zh",
    chunk_size: int | None = None,
    example: str | list[Any] | None = None,
    report: Report | None = None,
) -> list[PromptRecord]:
    """The prompts of an input file, as oneke-run reads them.

    Without `task`: the authors' converted file (one `{"id", "instruction", ...}` line per prompt, the instruction
    passed to the model unchanged). With `task` (NER, RE, EE, EET, EEA, KG or SPO): raw text lines (`{"text", ...}`)
    and a `schema` (inline JSON, a schema file, or the list itself), one prompt per `chunk_size` schema items (-1:
    no split; default: the authors' size per task), in `lang` ("zh" or "en"), with few-shot `example` items (zh).
    Lines skipped with a reason are Report notes; BadInput when no prompt is left.
    """
    from oneke_plan.extract.inputs import read_converted, read_example, read_raw
    from oneke_plan.formats import oneke

    report = report or Report()
    _one_of("--lang", lang, LANGUAGES)
    if task is None:
        for flag, value in (("--schema", schema), ("--example", example), ("--chunk-size", chunk_size)):
            if value is not None:
                raise BadInput(f"{flag} needs --task (raw text input); converted files carry their prompts")
        records = read_converted(input)
    else:
        if schema is None:
            raise BadInput(f"--task {task} needs --schema: inline JSON or a schema file")
        try:
            checked = oneke.check_task(task.upper())
            items = oneke.load_schema(_json_text(schema), checked)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if chunk_size is not None and (chunk_size == 0 or chunk_size < -1):
            raise BadInput(f"--chunk-size must be a positive integer or -1 (no split), not {chunk_size}")
        examples = read_example(_json_text(example)) if example is not None else None
        notes: list[str] = []
        records = read_raw(input, checked, items, lang, chunk_size, examples, notes)
        for note in notes:
            report.note(note)
    if not records:
        raise BadInput(f"{input}: no prompt to run (see the note above)")
    return records


def _json_text(value: str | list[Any] | dict[str, Any]) -> str:
    """A schema or example as oneke-run's flags give it: text (inline JSON or a file name) as it is, else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _planned(flag: str, value: int | None, planned: int) -> int:
    """`value` (default: the profile's `planned`), a positive integer no larger than what the profile planned."""
    if value is None:
        return planned
    if value <= 0:
        raise BadInput(f"{flag} must be a positive integer, not {value}")
    if value > planned:
        raise BadInput(
            f"{flag} {value} is more than the profile planned for ({planned}); re-plan with "
            f"oneke-plan ... {flag} {value}"
        )
    return value


def _output_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise BadInput("--resume keeps the answers in --output, --overwrite replaces them: give one of them")
    return "resume" if resume else "overwrite" if overwrite else "new"


def _runner(
    decoder: Decoder, tokenizer: Any, profile: Profile, writer: OutputWriter | None, batch_size: int, progress: bool
) -> Runner:
    """oneke-run's extraction around an engine's decoder: continuous batches of at most `batch_size` prompts,
    prompts longer than the profile's max_input_tokens reported (never cut), out of memory retried with smaller
    batches."""
    from oneke_plan.extract.runner import Runner

    max_input = profile.workload["max_input_tokens"]
    return Runner(decoder, tokenizer, writer, batch_size, max_input, progress=progress, template=profile.template)


def _hf_decoder(model: Any, tokenizer: Any, profile: Profile, max_new_tokens: int, model_dir: Path | None) -> Decoder:
    """The hf engine: greedy decoding of the loaded model with shared prefixes and continuous batching, ending
    answers at the model's EOS and the profile's template's stop words."""
    from oneke_plan.extract.generation import GreedyGenerator

    stop_ids = check_tokenizer(TEMPLATES[profile.template], tokenizer, str(model_dir or "the tokenizer"))
    return GreedyGenerator(model, tokenizer, max_new_tokens, model_dir=model_dir, stop_ids=stop_ids)


class Extraction:
    """The answer lines of an extraction (api.extract), one dict per prompt (docs/output-format.md), each yielded
    once it is written. Nothing runs until it is iterated, and it runs once; `stats` (runner.RunStats: prompts,
    tokens, seconds, ...) counts what it did, and `pending` is how many prompts it had to answer."""

    def __init__(
        self,
        records: list[PromptRecord],
        make_runner: Callable[[OutputWriter | None], Runner],
        output: RunOutput | None,
    ) -> None:
        self.records = records
        self._make_runner = make_runner
        self._output = output
        self._runner: Runner | None = None
        self._started = False
        self.pending = 0

    @property
    def stats(self) -> RunStats:
        from oneke_plan.extract.runner import RunStats

        return self._runner.stats if self._runner is not None else RunStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._started:
            raise RuntimeError("an Extraction runs once: call api.extract again (with resume=True to continue)")
        self._started = True
        if self._output is None:
            self.pending = len(self.records)
            self._runner = self._make_runner(None)
            yield from self._runner.lines(self.records)
            return
        with self._output as output:
            pending = output.start(self.records)
            self.pending = len(pending)
            if pending:
                self._runner = self._make_runner(output.writer)
                yield from self._runner.lines(pending)
            output.finish(self.records)


def extract(
    model: Any,
    tokenizer: Any,
    profile: Profile,
    records: list[PromptRecord],
    output: PathLike | None = None,
    *,
    input: PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> Extraction:
    """Answer `records` (read_records) with a model loaded by `load`, as oneke-run does; iterate the result for
    each prompt's answer line as soon as it is written.

    `batch_size` and `max_new_tokens` default to the profile's workload and may not exceed it. Without `output`,
    the lines are only yielded. With `output`, the files are oneke-run's: each line is journaled (fsync'd) to
    OUTPUT.journal, which also locks OUTPUT against a second run, and when every prompt has a line OUTPUT is
    written in input order with a merged line per record of several prompts; `resume` keeps the answers an
    earlier run left (in OUTPUT or its journal) and answers the rest and the failed ones, `overwrite` replaces
    OUTPUT, neither refuses an existing one. Only prompts answered by this call are yielded. `input` is the file
    the records came from, so that OUTPUT is never that file. Stopping the iteration early keeps the journal (resume
    continues it). Under torchrun with several workers, an output file needs api.run (it splits and merges).
    """
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.workers import Worker

    batch = _planned("--batch-size", batch_size, profile.workload["batch_size"])
    max_new = _planned("--max-new-tokens", max_new_tokens, profile.workload["max_new_tokens"])
    mode = _output_mode(resume, overwrite)
    files = None
    if output is not None:
        if Worker.from_env().distributed:
            raise BadInput(
                "api.extract writes an output file for one process; under torchrun use api.run, which gives each "
                "worker its part and merges them"
            )
        files = RunOutput(Path(output), Path(input) if input is not None else None, mode)
    elif mode != "new":
        raise BadInput("resume and overwrite are about an output file: give output=PATH too")
    name = getattr(model, "name_or_path", None)
    model_dir = Path(name) if name and Path(name).is_dir() else None

    def make_runner(writer: OutputWriter | None) -> Runner:
        decoder = _hf_decoder(model, tokenizer, profile, max_new, model_dir)
        return _runner(decoder, tokenizer, profile, writer, batch, progress)

    return Extraction(records, make_runner, files)


# ---------------------------------------------------------------------------------------------------- oneke-run


@dataclass(frozen=True)
class GpuMemory:
    """One GPU of the profile after a run, in bytes: the plan's total, torch's peak allocation, the driver's use."""

    gpu: int
    planned_total_bytes: int
    peak_allocated_bytes: int
    in_use_bytes: int


@dataclass(frozen=True)
class RunSummary:
    """What api.run did. `parts` holds each worker's (RunStats, prompts it had to answer), None for a worker that
    had nothing left to answer; one entry without torchrun. `gpu_memory` is this worker's GPUs after the run (empty
    without CUDA, or when it loaded nothing)."""

    output: Path
    prompts: int  # in the input
    worker: Worker
    parts: list[tuple[RunStats, int] | None]
    gpu_memory: list[GpuMemory] = field(default_factory=list)

    @property
    def mine(self) -> tuple[RunStats, int] | None:
        return self.parts[self.worker.rank] if self.worker.distributed else self.parts[0]

    @property
    def done(self) -> list[tuple[RunStats, int]]:
        return [part for part in self.parts if part is not None]

    @property
    def already_done(self) -> int:
        """Prompts an earlier run had answered."""
        return self.prompts - sum(pending for _, pending in self.done)

    @property
    def total(self) -> RunStats:
        """Every worker's RunStats added up, but `seconds`: the slowest worker's."""
        from dataclasses import fields

        from oneke_plan.extract.runner import RunStats

        total = RunStats()
        for stats, _ in self.done:
            for name in (f.name for f in fields(stats)):
                mine, theirs = getattr(total, name), getattr(stats, name)
                setattr(total, name, max(mine, theirs) if name == "seconds" else mine + theirs)
        return total


def run(
    profile: Profile | PathLike,
    input: PathLike,
    output: PathLike,
    *,
    model: PathLike | None = None,
    task: str | None = None,
    schema: str | list[Any] | dict[str, Any] | None = None,
    lang: str = "zh",
    chunk_size: int | None = None,
    example: str | list[Any] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    offload_dir: str | None = None,
    force: bool = False,
    progress: bool = False,
    template: str | None = None,
    trust_remote_code: bool = False,
    adapter: PathLike | None = None,
    engine: str = "hf",
    report: Report | None = None,
) -> RunSummary:
    """oneke-run: each parameter is one of its flags (load, read_records and extract say what they do).

    `engine`: who generates. "hf" (the default) loads the model as the profile places it and decodes with
    oneke-run's own decoder; "vllm" starts vLLM's offline engine with the profile translated for it
    (oneke_plan.plan.vllm_plan: dtype, context, batch, KV bytes, 4-bit, pipeline stages), refusing in one line what
    vLLM cannot express. Prompts, output lines, journal, resume and workers are the same for both.

    The order is oneke-run's: everything about the input and the output is checked, and the output locked, before
    the machine check and the load (minutes), and a run whose prompts are all answered loads nothing. Under
    torchrun, each worker runs its replica on the prompts whose key hashes to it and journals them in its own part;
    worker 0 writes OUTPUT from all parts. SIGINT and SIGTERM (as KeyboardInterrupt) become Interrupted, whose
    message says what was kept and how to continue. The workers leave their process group before this returns, but
    the interpreter's teardown can still abort a finished worker in torch's gloo threads: oneke-run therefore ends
    with os._exit under torchrun (cli/run.py), and a script that calls run under torchrun may want to do the same.
    """
    from oneke_plan.extract.engines import check_engine
    from oneke_plan.extract.outputs import RunOutput
    from oneke_plan.extract.workers import Group, Worker

    report = report or Report()
    _one_of("--engine", engine, ENGINES)
    profile = profile if isinstance(profile, Profile) else read_profile(Path(profile))
    batch = _planned("--batch-size", batch_size, profile.workload["batch_size"])
    max_new = _planned("--max-new-tokens", max_new_tokens, profile.workload["max_new_tokens"])
    profile = _with_template(profile, template, report)
    source = _model_source(profile, model, trust_remote_code)
    found = _run_adapter(profile, adapter)
    profile = replace(profile, offload_dir=_offload_folder(profile.offload_dir, offload_dir))
    mode = _output_mode(resume, overwrite)
    records = read_records(input, task, schema, lang, chunk_size, example, report)
    worker = Worker.from_env()
    profile = _workers_profile(profile, worker)
    check_engine(engine, profile, source)
    if worker.restarts and mode == "new":
        mode = "resume"  # torchrun restarted the workers after one failed: each continues its part
    with Group(worker) as group:
        files = RunOutput(Path(output), Path(input), mode, worker.rank, worker.world_size)
        if worker.distributed:  # every worker looks at what earlier runs left before any of this run writes
            files.prepare()
            group.barrier()
        try:
            mine = _answer(
                profile, source, found, records, files, worker, batch, max_new, force, trust_remote_code, progress,
                engine,
                report,
            )
            if worker.distributed:
                if worker.rank != 0:
                    files.close()  # worker 0 reads and removes this part once every worker is through
                group.barrier()
                if worker.rank == 0:
                    files.finish(records, peers=True)
            elif mine is not None:
                files.finish(records)
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (cli.common): say what was kept, and how to go on
            signum = interrupted_by(exc)
            note = files.interruption_note()
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}: {note}", signum) from None
        finally:
            files.close()
        parts = group.gather(mine)
    # vLLM allocates in its own processes: this one's torch peak would say nothing about them
    memory = gpu_memory(profile) if mine is not None and engine == "hf" else []
    return RunSummary(Path(output), len(records), worker, parts, memory)


def _with_template(profile: Profile, template: str | None, report: Report) -> Profile:
    """The profile with `template` (oneke-run's --template) for its prompts instead of the one it records."""
    if template is None or template == profile.template:
        return profile
    _one_of("--template", template, tuple(TEMPLATES))
    report.note(f"--template {template}: prompts use it instead of the profile's {profile.template}")
    return replace(profile, template=template)


def _answer(
    profile: Profile,
    source: ModelSource,
    adapter: Adapter | None,
    records: list[PromptRecord],
    files: RunOutput,
    worker: Worker,
    batch_size: int,
    max_new_tokens: int,
    force: bool,
    trust_remote_code: bool,
    progress: bool,
    engine: str,
    report: Report,
) -> tuple[RunStats, int] | None:
    """Lock the output and find the prompts left, check the machine, then start the engine (for hf, load's checks
    and load) and answer them. Returns the run's statistics and how many prompts were pending, or None when every
    prompt was answered."""
    pending = files.start(records, lambda record: worker.mine(record.key))
    _check_machine(profile, source, force, report)
    if not pending:
        if not worker.distributed:
            rewritten = files.finish(records)
            what = f"; {files.output} rewritten in input order with the journal's answers" if rewritten else ""
            report.note(f"nothing to do: all {len(records)} prompts are answered{what}")
        return None
    assert files.writer is not None
    if engine == "vllm":
        from oneke_plan.extract.engines import vllm_decoder

        vllm, tokenizer = vllm_decoder(profile, source, batch_size, max_new_tokens, trust_remote_code, report.note)
        try:
            return _runner(vllm, tokenizer, profile, files.writer, batch_size, progress).run(pending), len(pending)
        finally:
            vllm.close()
    model, tokenizer = _load_checked(profile, source, trust_remote_code, report, adapter)
    decoder = _hf_decoder(model, tokenizer, profile, max_new_tokens, source.directory)
    return _runner(decoder, tokenizer, profile, files.writer, batch_size, progress).run(pending), len(pending)


def gpu_memory(profile: Profile) -> list[GpuMemory]:
    """Each GPU of `profile`, now: the planned total, torch's peak allocation and the driver's memory in use, in
    bytes; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for gpu in profile.gpu_ids():
        free, total = torch.cuda.mem_get_info(gpu)
        planned = int(profile.estimate.get(gpu, {}).get("total_bytes", 0))
        found.append(GpuMemory(gpu, planned, torch.cuda.max_memory_allocated(gpu), total - free))
    return found
