"""What the Python API takes: one options dataclass per command, whose fields are its flags (the CLIs' parsers are
generated from them), the values each choice allows, the default workload, and Report, where it says what it finds
while it works."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from oneke_plan.core.sizes import format_bytes
from oneke_plan.extract.engines import ENGINES
from oneke_plan.formats.templates import DEEPKE_TEMPLATES, MODEL_TEMPLATE, ONEKE_TEMPLATE, TEMPLATES
from oneke_plan.plan.memory import (
    DEFAULT_CPU_RESERVE_BYTES,
    DEFAULT_GPU_RESERVE_BYTES,
    NO_QUANTIZATION,
    QUANT_MODES,
    Workload,
)
from oneke_plan.plan.memory import QUANT_TYPES as QUANT_TYPES  # re-exported: declared with Quantization
from oneke_plan.plan.profile import Profile

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("oneke_plan")


DEFAULT_WORKLOAD = Workload(max_input_tokens=512, max_new_tokens=512, batch_size=4)
"""What oneke-plan plans for unless told otherwise: tokens per prompt, tokens per answer, prompts per batch."""

# The values each choice takes (the CLIs offer the same ones).
DTYPES = ("auto", "bfloat16", "float16", "float32")
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

    def checks_passed(self) -> None:
        """Every check of a run has passed and its slow part starts: the weights load (or vLLM starts). The notes
        until here are about what was asked (an overriding template, what force=True let through): oneke-run holds
        them until now, so that a refusal is its only line. Does nothing here."""

    def weights_loaded(self, profile: Profile, loaded_bytes: dict[int | str, int]) -> None:
        """Right after loading, before the finite-output check: the bytes of the model's weights on each device of
        `profile` (GPU index, "cpu", "disk"), as loaded (loaded_weights.measured_weight_bytes)."""
        planned = {d: e.weights_bytes for d, e in profile.estimate.items()}
        log.info("weights per device, loaded (bytes): %s; planned: %s", loaded_bytes, planned)


# -- one options type per command -----------------------------------------------------------------------------------
FLAG = "flag"
"""The key of a field's metadata that makes it a command-line flag (its value: a Flag)."""


@dataclass(frozen=True)
class Flag:
    """How an options field appears on the command line; the field's own default is the flag's default, so the CLI and
    the API cannot disagree. The kind of argument follows the field: a bool is a switch (`--no-NAME` where its default
    is True), an int is read as one, a field without a default is required. `names`: the flag's spellings when they
    are not `--field-name`; `repeat`: the flag may be given several times (a list); `parse`: how to read the text
    where it is not a string or an int (Path); `group`: the --help section (None: the top one); `positional`: an
    argument without a flag."""

    help: str
    names: tuple[str, ...] = ()
    metavar: str | None = None
    choices: Sequence[Any] | None = None
    group: str | None = None
    repeat: bool = False
    parse: Callable[[str], Any] | None = None
    positional: bool = False

    def spellings(self, name: str) -> list[str]:
        """The flag's spellings for the field `name`: its own `names`, else --field-name."""
        return list(self.names) or ["--" + name.replace("_", "-")]


def flag(help: str, **how: Any) -> dict[str, Flag]:
    """A field's metadata for dataclasses.field(metadata=...): `help` and Flag's other fields by name."""
    return {FLAG: Flag(help, **how)}


def gib_text(size: int) -> str:
    return format_bytes(size).replace(" ", "")


# oneke-plan's --help sections, in the order --help shows them (each appears at its first flag)
MACHINE = "machine (default: the GPUs detected here)"
MODEL = "model"
WORKLOAD = "workload"
OUTPUT = "output"
SCALE = "many GPUs, many nodes (run the profile with torchrun: see README)"


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """Everything oneke-plan plans from, one field per flag, each default here and nowhere else: api.plan takes it
    (or its fields as keyword arguments), and oneke-plan's parser is generated from it. Sizes are bytes (int) or
    strings such as "24GiB" (GiB = 2**30 bytes, GB = 10**9); the repeatable flags take one value or a list.

    `model`: "oneke" (the built-in config: no weights needed), a model directory, a repo id in the local Hugging
    Face cache, or a GGUF file. The machine: `gpus` (each a size such as "24GiB", a card name such as "RTX 3090",
    or NAME:SIZE, in device order) or `inventory_file` (YAML), else the GPUs detected here; `cpu_memory` is host
    memory the model may use for offloaded weights; `offload_dir` enables disk offload. The workload: tokens per
    prompt and per answer, prompts per batch. `reserve`: bytes each GPU keeps for the CUDA context, one value for
    every GPU ("2GiB") and/or per device ("1=3GiB", "cpu=4GiB"). `bandwidth` (GB/s) and `tflops` (dense 16-bit
    TFLOPS) give the speed prediction the rates the catalog does not know, in the same forms ("cpu=19.5").
    `solve`: "max-input-tokens" or "batch-size" (or with underscores) to plan for the largest that fits.
    `template`: the chat template the profile records for oneke-run's prompts, by default the one the model's
    config implies. `replicas`: copies of the model (a number, or "auto"), on `nodes` identical nodes. `adapter`: a
    LoRA adapter folder oneke-run will apply: merged on load in 16-bit, kept unmerged with `quantize`; its memory is
    counted and it is fingerprinted in the profile (DoesNotFit for an adapter of another base). `output`: write the
    profile there (replacing only a profile oneke-plan wrote, or an empty file with `overwrite`; never a file the
    plan reads, nor anything in a model's or adapter's folder); `plot`: write the per-device picture there as SVG
    (same rules)."""

    model: PathLike | None = field(
        default=None,
        metadata=flag(
            "'oneke' (built-in config), a model directory with config.json, a repo id in the local Hugging Face "
            "cache, or a GGUF file (or a folder holding one .gguf)",
            metavar="MODEL",
            positional=True,
        ),
    )
    gpus: Sequence[str] | None = field(
        default=None,
        metadata=flag(
            "a GPU you have or plan for, in device order: a size (24GiB, 12GB), a card name ('RTX 3090'), or "
            "NAME:SIZE; repeat for each GPU",
            names=("--gpu",),
            metavar="SPEC",
            repeat=True,
            group=MACHINE,
        ),
    )
    inventory_file: PathLike | None = field(
        default=None,
        metadata=flag(
            "GPUs from a YAML file: gpus: [{name: RTX 3090}, {memory: 12GiB}]",
            names=("--inventory",),
            metavar="FILE.yaml",
            parse=Path,
            group=MACHINE,
        ),
    )
    cpu_memory: str | int | None = field(
        default=None,
        metadata=flag(
            "host memory the model may use for offloaded weights (slow: they cross PCIe at every step); default: "
            "none with GPUs, the memory available here without",
            metavar="SIZE",
            group=MACHINE,
        ),
    )
    offload_dir: str | None = field(
        default=None, metadata=flag("enable disk offload into DIR", metavar="DIR", group=MACHINE)
    )
    reserve: str | int | Sequence[str | int] | None = field(
        default=None,
        metadata=flag(
            "runtime reserve for the CUDA context and allocator slack: SIZE for every GPU, INDEX=SIZE for one "
            f"(cpu=SIZE for the host); repeatable (default: {gib_text(DEFAULT_GPU_RESERVE_BYTES)} a GPU, "
            f"{gib_text(DEFAULT_CPU_RESERVE_BYTES)} for the CPU)",
            metavar="[DEVICE=]SIZE",
            repeat=True,
            group=MACHINE,
        ),
    )
    bandwidth: str | float | Sequence[str | float] | None = field(
        default=None,
        metadata=flag(
            "memory bandwidth for the speed prediction, in GB/s: for every GPU, or INDEX=GB/s, cpu=GB/s; default: "
            "the catalog's vendor figure for a named card, else unknown",
            metavar="[DEVICE=]GB/s",
            repeat=True,
            group=MACHINE,
        ),
    )
    tflops: str | float | Sequence[str | float] | None = field(
        default=None,
        metadata=flag(
            "dense 16-bit matmul throughput for the prefill prediction, in TFLOPS, as --bandwidth",
            metavar="[DEVICE=]TFLOPS",
            repeat=True,
            group=MACHINE,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=flag(
            "compute dtype; auto = the config's, bf16 only where every GPU supports it", choices=DTYPES, group=MODEL
        ),
    )
    quantize: str = field(
        default="none",
        metadata=flag(
            "load Linear weights with bitsandbytes 8-bit or 4-bit (default: %(default)s)",
            choices=QUANT_MODES,
            group=MODEL,
        ),
    )
    quant_type: str = field(
        default=NO_QUANTIZATION.quant_type, metadata=flag("4-bit data type", choices=QUANT_TYPES, group=MODEL)
    )
    double_quant: bool = field(
        default=NO_QUANTIZATION.double_quant, metadata=flag("4-bit: keep absmax scales in fp32", group=MODEL)
    )
    template: str | None = field(
        default=None,
        metadata=flag(
            "the chat template oneke-run wraps prompts in, recorded in the profile: one of DeepKE's "
            f"({', '.join(DEEPKE_TEMPLATES)}) or {MODEL_TEMPLATE} (the model's own, from its tokenizer). Default: "
            f"DeepKE's for the models DeepKE names one for (OneKE's is {ONEKE_TEMPLATE}), else the model's own where "
            f"its tokenizer carries one, else {ONEKE_TEMPLATE}",
            choices=list(TEMPLATES),
            metavar="NAME",
            group=MODEL,
        ),
    )
    adapter: PathLike | None = field(
        default=None,
        metadata=flag(
            "a LoRA adapter (peft's adapter_config.json + adapter_model.safetensors) for oneke-run to apply: merged "
            "on load in 16-bit, kept unmerged with --quantize; its memory is counted and it is fingerprinted (needs "
            "peft: pip install 'oneke-plan[lora]')",
            metavar="DIR",
            parse=Path,
            group=MODEL,
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=flag("allow code shipped with the model to run (off by default; OneKE does not need it)", group=MODEL),
    )
    max_input_tokens: int = field(
        default=DEFAULT_WORKLOAD.max_input_tokens,
        metadata=flag("longest prompt, in tokens (default: %(default)s)", metavar="N", group=WORKLOAD),
    )
    max_new_tokens: int = field(
        default=DEFAULT_WORKLOAD.max_new_tokens,
        metadata=flag("longest answer, in tokens (default: %(default)s)", metavar="N", group=WORKLOAD),
    )
    batch_size: int = field(
        default=DEFAULT_WORKLOAD.batch_size,
        metadata=flag("prompts generated together (default: %(default)s)", metavar="N", group=WORKLOAD),
    )
    eager_attention: bool = field(
        default=False,
        metadata=flag("count attention scores as eager attention materializes them (default: SDPA)", group=WORKLOAD),
    )
    strategy: str = field(
        default="fill",
        metadata=flag(
            "fill GPUs in order (default), or spread layers in proportion to each GPU's memory",
            choices=STRATEGIES,
            group=OUTPUT,
        ),
    )
    solve: str | None = field(
        default=None,
        metadata=flag(
            "find the largest context (or batch) that fits, and plan for it", choices=SOLVE_FOR, group=OUTPUT
        ),
    )
    replicas: int | str = field(
        default=1,
        metadata=flag(
            "split the GPUs into N groups, each holding a whole copy of the model; auto = as many as fit (default: 1)",
            metavar="N|auto",
            group=SCALE,
        ),
    )
    nodes: int = field(
        default=1,
        metadata=flag("the same replicas on N identical nodes (default: 1)", metavar="N", group=SCALE),
    )
    output: PathLike | None = field(
        default=None,
        metadata=flag(
            "write the profile here (default: stdout)",
            names=("-o", "--output"),
            metavar="FILE",
            parse=Path,
            group=OUTPUT,
        ),
    )
    plot: PathLike | None = field(
        default=None,
        metadata=flag("draw each device's memory as an SVG picture", metavar="FILE.svg", parse=Path, group=OUTPUT),
    )
    overwrite: bool = field(
        default=False,
        metadata=flag(
            "let -o and --plot also replace an empty file (without it they replace only a profile or picture "
            "oneke-plan wrote; never a file it reads, a model's or adapter's file, a device, a FIFO or a link)",
            group=OUTPUT,
        ),
    )


# oneke-run's --help sections, in the order --help shows them
RAW_INPUT = "raw text input"
GENERATION = "generation (defaults: the profile's workload)"
LONG_DOCUMENTS = "long documents"
RUN = "run"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Everything oneke-run runs from, one field per flag, each default here and nowhere else: api.run takes it (or
    its fields as keyword arguments), and oneke-run's parser is generated from it. `profile`, `input` and `output`
    have no default: every run names them. `progress` is the API's alone (off; oneke-run shows a progress bar unless
    --no-progress)."""

    profile: Profile | PathLike = field(metadata=flag("a profile written by oneke-plan", metavar="P.yaml", parse=Path))
    model: PathLike | None = field(
        default=None,
        metadata=flag(
            "the checkpoint directory, a repo id in the local Hugging Face cache, or a GGUF file (default: the "
            "profile's model source, when it is a directory or a file)",
            metavar="DIR_OR_REPO_ID",
        ),
    )
    adapter: PathLike | None = field(
        default=None,
        metadata=flag(
            "the LoRA adapter the profile was planned with (default: the profile's adapter path); another one, "
            "changed files or another base model's adapter are refused before loading (exit 3)",
            metavar="DIR",
            parse=Path,
        ),
    )
    input: PathLike = field(
        metadata=flag(
            "the authors' converted file (id + instruction), or raw lines ({id?, text}) with --task",
            metavar="IN.jsonl",
            parse=Path,
        )
    )
    output: PathLike = field(metadata=flag("answers, one JSON line each", metavar="OUT.jsonl", parse=Path))
    task: str | None = field(
        default=None,
        metadata=flag("NER, RE, EE, EET, EEA, KG or SPO: read --input as raw text lines", group=RAW_INPUT),
    )
    schema: str | list[Any] | dict[str, Any] | None = field(
        default=None,
        metadata=flag("the schema: inline JSON, or a file (JSON, or the authors' 3-line schema.json)", group=RAW_INPUT),
    )
    lang: str = field(
        default="zh",
        metadata=flag("instruction language (default: %(default)s)", choices=LANGUAGES, group=RAW_INPUT),
    )
    chunk_size: int | None = field(
        default=None,
        metadata=flag("schema items per prompt (default: the authors' size per task)", group=RAW_INPUT),
    )
    example: str | list[Any] | None = field(
        default=None,
        metadata=flag(
            'few-shot items added to every prompt (zh only, as the authors publish): [{"input": ..., "output": ...}]',
            metavar="JSON_OR_FILE",
            group=RAW_INPUT,
        ),
    )
    engine: str = field(
        default="hf",
        metadata=flag(
            "who generates: hf (default: the model loaded as planned, oneke-run's decoder) or vllm (vLLM's engine "
            "with the plan translated for it; needs pip install 'oneke-plan[vllm]'); both decode greedily",
            choices=ENGINES,
            group=GENERATION,
        ),
    )
    batch_size: int | None = field(
        default=None,
        metadata=flag("prompts per batch (at most the planned batch)", metavar="N", group=GENERATION),
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata=flag("answer length (at most the planned one)", metavar="N", group=GENERATION),
    )
    template: str | None = field(
        default=None,
        metadata=flag(
            "the chat template around each prompt: a DeepKE template or 'model' (the model's own) (default: the "
            "profile's; see oneke-plan --template)",
            choices=list(TEMPLATES),
            metavar="NAME",
            group=GENERATION,
        ),
    )
    split_long: bool = field(
        default=False,
        metadata=flag(
            "split the text of a prompt longer than the plan's max_input_tokens into windows that fit, answer each "
            "and merge the answers into the record's line (default: such a prompt gets an error line)",
            group=LONG_DOCUMENTS,
        ),
    )
    window_overlap: int | None = field(
        default=None,
        metadata=flag(
            "with --split-long: tokens of each window's end repeated at the start of the next, so that what straddles "
            "a cut is seen whole once (default: the window's last sentence)",
            metavar="N",
            group=LONG_DOCUMENTS,
        ),
    )
    resume: bool = field(
        default=False,
        metadata=flag(
            "keep the answers already in --output (and its journal), run the rest and the prompts that failed",
            group=RUN,
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=flag(
            "replace an earlier --output of oneke-run, or an empty file (only once the new one is complete; never "
            "another file, nor one the run reads)",
            group=RUN,
        ),
    )
    offload_dir: str | None = field(
        default=None,
        metadata=flag(
            "where disk-offloaded weights go (default: the profile's offload_dir when it is a relative path inside "
            "the current folder; any other folder must be confirmed here)",
            metavar="DIR",
            group=RUN,
        ),
    )
    force: bool = field(default=False, metadata=flag("run even if the machine does not match the profile", group=RUN))
    trust_remote_code: bool = field(
        default=False,
        metadata=flag("allow code shipped with the model to run (off by default; OneKE does not need it)", group=RUN),
    )
    join_timeout: int = field(
        default=300,
        metadata=flag(
            "under torchrun: how long each worker waits at the start for the others, before it stops and names "
            "those missing (default: %(default)s)",
            metavar="SECONDS",
            group=RUN,
        ),
    )
    progress: bool = False


Options = TypeVar("Options", bound="DataclassInstance")


def with_keywords(
    options_type: type[Options], options: Options | None, keywords: dict[str, Any], caller: str
) -> Options:
    """`options` (or the defaults) with the values a caller gave as keyword arguments on top: the calling convention
    the API had before its options types, kept. A name that is not a field is a TypeError naming it, as Python's own
    for a misspelt keyword would be."""
    names = [f.name for f in fields(options_type)]
    for name in keywords:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")
    return replace(options, **keywords) if options is not None else options_type(**keywords)


def given(**values: Any) -> dict[str, Any]:
    """The positional arguments a caller gave (not None), as keywords for with_keywords."""
    return {name: value for name, value in values.items() if value is not None}
