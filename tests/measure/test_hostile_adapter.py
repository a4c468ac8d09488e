"""Hostile LoRA adapters (--adapter): every field of adapter_config.json with a wrong type or out of range, target
modules that match nothing, everything or what is not a Linear layer, a config that disagrees with its tensors, and
safetensors headers that lie. Each is refused in one BadInput line naming the file and the key, before peft builds
anything: by the validator itself (read_adapter, then check_base against transformers' own meta model), by
oneke-plan --adapter, and by oneke-run with the adapter (exit 2, one line). Adapters that peft itself saved, with
the features the validator reads (rank and alpha patterns, a regular expression, layer indexes), are accepted.

The adapters are made by peft (get_peft_model, save_pretrained) for the session's tiny LLaMA, then edited: the
config as JSON, the header as bytes (its 8-byte length, then JSON), or the tensors written again by safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import transformers_meta_model
from hostile import imports_peak_bytes, measured
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import BadInput
from oneke_plan.measure.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_HEADER_BYTES, check_base, read_adapter
from oneke_plan.measure.compat import dtype_kw

peft = pytest.importorskip("peft")  # the [lora] extra

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # 4 layers x 4 = 16 wrapped; hidden 64, intermediate 128
NER_LINE = (Path(__file__).parents[2] / "examples" / "deepke" / "NER" / "test.json").read_text("utf-8").splitlines()[0]
DELETE = object()  # a config change that removes the key


def _save_adapter(base: Path, folder: Path, **config: Any) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0} | config
    peft.get_peft_model(model, peft.LoraConfig(**settings)).save_pretrained(str(folder))
    return folder


@dataclass
class Files:
    base: Path
    adapter: Path  # peft's, untouched
    inventory: Path
    profile: Path  # planned with `adapter`
    input: Path
    folder: Path


@pytest.fixture(scope="module")
def files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("hostile-adapter")
    adapter = _save_adapter(tiny_model_dir, folder / "adapter")
    inventory = folder / "cpu.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    profile = folder / "planned.yaml"
    argv = [str(tiny_model_dir), "--inventory", str(inventory), "--max-new-tokens", "2", "--batch-size", "1"]
    assert plan_main([*argv, "--adapter", str(adapter), "-o", str(profile)]) == 0
    source = folder / "in.jsonl"
    source.write_text(NER_LINE + "\n", encoding="utf-8")
    return Files(tiny_model_dir, adapter, inventory, profile, source, folder)


# ---------------------------------------------------------------- how a case edits the adapter


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _entries(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The tensors' entries in the order of their data."""
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"])


def _edit_header(change: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        header, body = _header(data)
        change(header)
        return _with_header(header, body)

    return edit


def _set(entry: int, **values: Any) -> Callable[[bytes], bytes]:
    return _edit_header(lambda header: _entries(header)[entry].update(values))


def _overlap(header: dict[str, Any]) -> None:
    """The second tensor of a size shares the first's bytes (shapes, dtypes and spans all agree)."""
    entries = _entries(header)
    first = entries[0]
    same = next(e for e in entries[1:] if e["shape"] == first["shape"])
    same["data_offsets"] = first["data_offsets"]


def _past_the_end(header: dict[str, Any]) -> None:
    """The last tensor, one row longer than the file holds: its shape and span agree, the file is short."""
    last = _entries(header)[-1]
    row = (last["data_offsets"][1] - last["data_offsets"][0]) // last["shape"][0]
    last["shape"] = [last["shape"][0] + 1, last["shape"][1]]
    last["data_offsets"] = [last["data_offsets"][0], last["data_offsets"][1] + row]


def _tensors(change: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[bytes], bytes]:
    """The tensors written again by safetensors itself after `change`: a consistent file with other contents."""

    def edit(data: bytes) -> bytes:
        path = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"hostile-{id(data)}.safetensors"
        path.write_bytes(data)
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        change(tensors)
        save_file(tensors, str(path))
        out = path.read_bytes()
        path.unlink()
        return out

    return edit


def _rank(rank: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        for name, t in list(tensors.items()):
            tensors[name] = torch.zeros((rank, t.shape[1]) if ".lora_A." in name else (t.shape[0], rank))

    return change


def _one(suffix: str, tensor: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        name = next(k for k in sorted(tensors) if k.endswith(suffix))
        tensors[name] = tensor(tensors[name]).contiguous()

    return change


def _embedding_pair(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 1024)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(64, 4)


@dataclass(frozen=True)
class Case:
    id: str
    says: str  # in the message, beside the file's name
    config: dict[str, Any] | None = None  # keys to change (DELETE: remove)
    weights: Callable[[bytes], bytes] | None = None
    text: str | None = None  # adapter_config.json's whole text
    named: str | None = None  # the file the message names, where not the one edited

    @property
    def file(self) -> str:
        if self.named is not None:
            return self.named
        return ADAPTER_WEIGHTS if self.weights is not None and self.config is None else ADAPTER_CONFIG


def _types() -> list[Case]:
    """Each numeric field with a string, a bool, a float where it needs a whole number, null, a list, an object,
    NaN and infinity; each flag and text field with what it is not."""
    wrong: list[Any] = ["4", True, None, [4], {"v": 4}]
    cases = []
    for field, values in (
        ("r", [*wrong, 4.5, 4.0]),
        ("lora_alpha", [*wrong, math.nan, math.inf, 10**400]),
        ("lora_dropout", [*wrong, math.nan]),
        ("qalora_group_size", ["16", 16.0]),
    ):
        cases += [Case(f"{field}={v!r}", f"{field} must be", {field: v}) for v in values]
    for field, values in (("rank_pattern", [*wrong, 4.5]), ("alpha_pattern", [*wrong, math.inf, 10**400])):
        cases += [Case(f"{field}[q_proj]={v!r}", f'{field} ["q_proj"] must be', {field: {"q_proj": v}}) for v in values]
        cases += [Case(f"{field}={v!r}", f"{field} must be an object", {field: v}) for v in ("x", [], None, 4)]
        cases += [Case(f"{field} key {k!r}", f"{field} key", {field: {k: 4}}) for k in ("(", "")]
    for field in ("fan_in_fan_out", "use_rslora", "inference_mode", "ensure_weight_tying"):
        cases += [Case(f"{field}={v!r}", f"{field} must be true or false", {field: v}) for v in ("yes", 1, None)]
    for field in ("base_model_name_or_path", "revision", "peft_version"):
        cases += [Case(f"{field}={v!r}", f"{field} must be a string", {field: v}) for v in (5, [], {"a": "b"})]
    cases += [
        Case("base_model_name_or_path long", "more than any name or path", {"base_model_name_or_path": "x" * 5000}),
        Case("auto_mapping=5", "auto_mapping must be an object", {"auto_mapping": 5}),
        Case("layers_to_transform='x'", "layers_to_transform must be", {"layers_to_transform": "x"}),
        Case("layers_to_transform=[-1]", "layers_to_transform must be", {"layers_to_transform": [-1]}),
        Case("layers_to_transform=[true]", "layers_to_transform must be", {"layers_to_transform": [True]}),
        Case("layers_pattern=5", "layers_pattern must be", {"layers_pattern": 5}),
        Case("layers_pattern='('", "layers_pattern holds", {"layers_pattern": "("}),
        Case("exclude_modules=5", "exclude_modules must be", {"exclude_modules": 5}),
        Case("exclude_modules='('", "exclude_modules is", {"exclude_modules": "("}),
        Case("not an object", "must hold a JSON object", text="[]"),
        Case("not JSON", "not valid JSON", text="{r: 4"),
        Case("over 1 MiB", "larger than 1.00 MiB", text='{"r": 4, "x": "' + "x" * 2**20 + '"}'),
        Case("r missing", "r is missing", {"r": DELETE}),
        Case("peft_type missing", "peft_type is missing", {"peft_type": DELETE}),
    ]
    return cases


def _values() -> list[Case]:
    """Ranges, and what oneke-plan does not plan for."""
    cases = [Case(f"r={v!r}", "r must be a whole number of at least 1", {"r": v}) for v in (0, -1, -(2**63))]
    cases += [Case(f"r={v}", "more than model.layers.0.mlp.down_proj has features", {"r": v})
              for v in (65, 10**9, 2**64, 10**400)]  # fmt: skip
    cases += [
        Case("rank_pattern 0", 'rank_pattern ["q_proj"] must be', {"rank_pattern": {"q_proj": 0}}),
        Case("rank_pattern huge", "rank_pattern['q_proj'] is 1000000000, more than",
             {"rank_pattern": {"q_proj": 10**9}}),  # fmt: skip
        Case("lora_alpha=0", "lora_alpha must be a number above 0", {"lora_alpha": 0}),
        Case("lora_alpha=-8", "lora_alpha must be a number above 0", {"lora_alpha": -8}),
        Case("alpha_pattern -1", 'alpha_pattern ["q_proj"] must be', {"alpha_pattern": {"q_proj": -1}}),
        Case("lora_dropout=-0.1", "lora_dropout must be a number from 0 to 1", {"lora_dropout": -0.1}),
        Case("lora_dropout=1.5", "lora_dropout must be a number from 0 to 1", {"lora_dropout": 1.5}),
        Case("peft_type=LOHA", "LoRA adapters only", {"peft_type": "LOHA"}),
        Case("peft_type=null", "LoRA adapters only", {"peft_type": None}),
        Case("bias=all", "bias 'none'", {"bias": "all"}),
        Case("bias=5", "bias 'none'", {"bias": 5}),
        Case("task_type=SEQ_CLS", "causal language model", {"task_type": "SEQ_CLS"}),
        Case("task_type=5", "causal language model", {"task_type": 5}),
        Case("init_lora_weights=pissa", "PiSSA", {"init_lora_weights": "pissa"}),
        Case("init_lora_weights=1", "PiSSA", {"init_lora_weights": 1}),
        Case("use_dora", "DoRA", {"use_dora": True}),
        Case("use_dora='yes'", "use_dora must be false, null or empty", {"use_dora": "yes"}),
        Case("modules_to_save", "modules_to_save", {"modules_to_save": ["lm_head"]}),
        Case("lora_bias", "LoRA bias terms", {"lora_bias": True}),
        Case("layer_replication", "layer replication", {"layer_replication": [[0, 2]]}),
        Case("megatron_config", "Megatron", {"megatron_config": {"tensor_model_parallel_size": 2}}),
        Case("loftq_config", "LoftQ", {"loftq_config": {"loftq_bits": 4}}),
        Case("use_qalora", "QA-LoRA", {"use_qalora": True}),
        Case("eva_config", "a peft feature", {"eva_config": {"rho": 2.0}}),
        Case("unknown key", "a peft feature", {"frobnicate": 1}),
    ]
    return cases


def _targets() -> list[Case]:
    cases = [
        Case("targets empty list", "target_modules is an empty list", {"target_modules": []}),
        Case("targets null", "target_modules is null", {"target_modules": None}),
        Case("targets missing", "target_modules is null or missing", {"target_modules": DELETE}),
        Case("targets all-linear", "all-linear", {"target_modules": "all-linear"}),
        Case("targets ''", "target_modules is an empty string", {"target_modules": ""}),
        Case("targets [5]", "target_modules holds 5", {"target_modules": [5]}),
        Case("targets ['']", "target_modules holds", {"target_modules": [""]}),
        Case("targets 5", "target_modules must be", {"target_modules": 5}),
        Case("targets object", "target_modules must be", {"target_modules": {"q_proj": 1}}),
        Case("targets bad regex", "not a regular expression", {"target_modules": "(q_proj"}),
        Case("targets none match", "match no layer of LlamaForCausalLM", {"target_modules": ["nope"]}),
        Case("targets regex none match", "match no layer", {"target_modules": r"nope\..*"}),
        Case("targets regex everything", "match the whole model", {"target_modules": ".*"}),
        Case("targets embedding", "match model.embed_tokens (Embedding)", {"target_modules": ["embed_tokens"]}),
        Case("targets decoder layer", "match model.layers.0 (LlamaDecoderLayer)", {"target_modules": ["layers.0"]}),
        Case("targets regex layer", "(LlamaDecoderLayer)", {"target_modules": r"model\.layers\.\d+"}),
        Case("targets mlp", "(LlamaMLP)", {"target_modules": [*TARGETS, "mlp"]}),
        Case("targets norm", "(LlamaRMSNorm)", {"target_modules": [*TARGETS, "input_layernorm"]}),
        Case("targets more", "4 layers the file has no tensors for", {"target_modules": [*TARGETS, "k_proj"]}),
        Case("targets very many", "more than LlamaForCausalLM has",
             {"target_modules": [f"layer{i}" for i in range(10_000)]}),  # fmt: skip
        Case("targets fewer", "not wrap 4 layers the file has tensors for", {"target_modules": TARGETS[:-1]}),
        Case("layers_to_transform", "not wrap 12 layers", {"layers_to_transform": [0]}),
    ]
    return cases


def _shapes() -> list[Case]:
    """The config against its tensors, and tensors that are no LoRA pair of a Linear layer."""
    return [
        Case("r 8, tensors 4", "r is 8, but the tensors for", {"r": 8}),
        Case("r 2, tensors 4", "r is 2, but the tensors for", {"r": 2}),
        Case("rank_pattern 2, tensors 4", "rank_pattern['q_proj'] is 2, but", {"rank_pattern": {"q_proj": 2}}),
        Case("rank_pattern unused", 'rank_pattern key "nope" applies to none', {"rank_pattern": {"nope": 4}}),
        Case("alpha_pattern unused", 'alpha_pattern key "nope" applies to none', {"alpha_pattern": {"nope": 4}}),
        Case("rank_pattern very many", "rank_pattern has 10000 keys, more than the 16 layers",
             {"rank_pattern": {f"layer{i}": 4 for i in range(10_000)}}),  # fmt: skip
        Case("rank 65 both", "r is 65, more than", {"r": 65}, _tensors(_rank(65))),
        Case("pair ranks differ", "not one LoRA pair", weights=_tensors(_one("lora_B.weight", lambda t: t[:, :3]))),
        Case("tensor 3-D", "not a matrix", weights=_tensors(_one("lora_A.weight", lambda t: t[None]))),
        Case("tensor empty", "not a matrix", weights=_tensors(_one("lora_A.weight", lambda t: t[:0]))),
        Case("tensor int", "not a floating-point dtype", weights=_tensors(_one("lora_A.weight", lambda t: t.int()))),
        Case("embedding pair", "model.embed_tokens (Embedding, not a Linear layer)",
             {"target_modules": [*TARGETS, "embed_tokens"]}, _tensors(_embedding_pair),
             named=ADAPTER_WEIGHTS),  # fmt: skip
        Case("not LoRA", "is not a LoRA weight", weights=_tensors(lambda t: t.update(extra=torch.zeros(2)))),
        Case("lora_A alone", "not both lora_A and lora_B", weights=_tensors(
            lambda t: t.pop(next(k for k in sorted(t) if k.endswith("lora_B.weight"))))),  # fmt: skip
    ]


def _headers() -> list[Case]:
    huge = 2**63
    return [
        Case("header length huge", "over the limit of 8.00 MiB", weights=lambda d: huge.to_bytes(8, "little") + d[8:]),
        Case("header length over limit", "over the limit of 8.00 MiB",
             weights=lambda d: (MAX_HEADER_BYTES + 1).to_bytes(8, "little") + d[8:]),  # fmt: skip
        Case("header longer than file", "and the file has",
             weights=lambda d: (len(d) - 7).to_bytes(8, "little") + d[8:]),  # fmt: skip
        Case("file of 3 bytes", "and the file has", weights=lambda d: d[:3]),
        Case("header not JSON", "its header is not JSON oneke-plan reads (Expecting",
             weights=lambda d: _with_header(b"{" * 10, _header(d)[1])),  # fmt: skip
        Case("header not UTF-8", "its header is not UTF-8 text", weights=lambda d: _with_header(b"\xff\xfe", b"")),
        Case("header a list", "its header is not a JSON object", weights=lambda d: _with_header(b"[]", _header(d)[1])),
        Case("header deep", "nested deeper", weights=lambda d: _with_header(b"[" * 5000 + b"]" * 5000, b"")),
        Case("dtype unknown", 'has dtype "F99", not one of', weights=_set(0, dtype="F99")),
        Case("dtype not text", "has dtype [1]", weights=_set(0, dtype=[1])),
        Case("dtype I32", "not a floating-point dtype", weights=_set(0, dtype="I32")),
        Case("shape x dtype != span", "bytes its data_offsets span", weights=_set(0, shape=[4, 3])),
        Case("shape huge", "which is not the", weights=_set(0, shape=[10**30, 10**30])),
        Case("shape negative", "not a list of non-negative integers", weights=_set(0, shape=[-4, -128])),
        Case("shape floats", "not a list of non-negative integers", weights=_set(0, shape=[4.0, 128.0])),
        Case("offsets reversed", "end before they begin", weights=_set(0, data_offsets=[2048, 0])),
        Case("offsets missing", "not [begin, end]", weights=_set(0, data_offsets=None)),
        Case("offsets three", "not [begin, end]", weights=_set(0, data_offsets=[0, 2048, 4096])),
        Case("offsets out of file", "file shorter than its header says", weights=_edit_header(_past_the_end)),
        Case("offsets overlap", "overlaps the tensor before it", weights=_edit_header(_overlap)),
        Case("offsets gap", "leaves a gap", weights=lambda d: _edit_header(_shift_last)(d + bytes(8))),
        Case("bytes after the last tensor", "longer than its header says", weights=lambda d: d + bytes(4)),
        Case("__metadata__ not text", "__metadata__", weights=_edit_header(lambda h: h.update(__metadata__={"a": 1}))),
        Case("entry not an object", "is not a JSON object", weights=_edit_header(lambda h: h.update(x=5))),
        Case("no tensors", "holds no tensor", weights=lambda d: _with_header({}, b"")),
    ]


def _shift_last(header: dict[str, Any]) -> None:
    last = _entries(header)[-1]
    last["data_offsets"] = [n + 8 for n in last["data_offsets"]]


CASES = _types() + _values() + _targets() + _shapes() + _headers()


def _build(files: Files, case: Case, folder: Path) -> Path:
    shutil.copytree(files.adapter, folder)
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if case.text is not None:
        config_path.write_text(case.text)
    if case.config is not None:
        config = json.loads(config_path.read_text())
        for key, value in case.config.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        config_path.write_text(json.dumps(config))  # NaN and Infinity as Python's json writes and reads them
    if case.weights is not None:
        weights.write_bytes(case.weights(weights.read_bytes()))
    return folder


@pytest.fixture(scope="module")
def meta_model(files: Files) -> Any:
    return transformers_meta_model(AutoConfig.from_pretrained(files.base), dtype="bfloat16")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_validator_refuses_it_in_one_line(case: Case, files: Files, meta_model: Any, tmp_path: Path) -> None:
    folder = _build(files, case, tmp_path / "adapter")
    with pytest.raises(BadInput) as refused:
        check_base(read_adapter(folder), meta_model)
    message = str(refused.value)
    assert case.says in message and case.file in message and "\n" not in message, message
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in meta_model.modules())


def _outcome(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_oneke_plan_and_oneke_run_refuse_it_in_one_line(case: Case, files: Files, tmp_path: Path) -> None:
    folder = _build(files, case, tmp_path / "adapter")
    argv = [str(files.base), "--inventory", str(files.inventory), "--max-new-tokens", "2", "--adapter", str(folder)]
    code, lines = _outcome(plan_main, [*argv, "-o", str(tmp_path / "p.yaml")])
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].startswith("oneke-plan: error: ") and case.says in lines[0] and case.file in lines[0], lines
    assert not (tmp_path / "p.yaml").exists()
    # oneke-run: a profile planned with the peft adapter, its fingerprint that of this one where it can be read (as
    # if planned with it: the validator, not the fingerprint, must refuse it)
    profile = tmp_path / "run.yaml"
    text = files.profile.read_text()
    with contextlib.suppress(BadInput):
        text = text.replace(read_adapter(files.adapter).fingerprint, read_adapter(folder).fingerprint)
    profile.write_text(text)
    out = tmp_path / "out.jsonl"
    run = ["--profile", str(profile), "--input", str(files.input), "--output", str(out), "--no-progress"]
    code, lines = _outcome(run_main, [*run, "--adapter", str(folder)])
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].startswith("oneke-run: error: ") and case.says in lines[0] and case.file in lines[0], lines
    assert not out.exists()


def test_a_key_this_peft_does_not_know(files: Files, meta_model: Any, tmp_path: Path) -> None:
    """A field of another peft that changes what the adapter computes is refused by the peft that lacks it; one that
    changes nothing (peft_version) is not."""
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    folder = _build(files, Case("", "", {"peft_version": "99.0", "exclude_modules": ["lm_head"]}), tmp_path / "a")
    if "exclude_modules" in known:
        check_base(read_adapter(folder), meta_model)  # lm_head is not targeted anyway
        return
    with pytest.raises(BadInput, match=f"exclude_modules unknown to peft {peft.__version__}"):
        check_base(read_adapter(folder), meta_model)


VALID = {
    "rank and alpha patterns": {"rank_pattern": {"q_proj": 2, "down_proj": 8}, "alpha_pattern": {"v_proj": 32}},
    "full-name pattern": {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2}},
    "regex targets": {"target_modules": r".*\.(q_proj|v_proj)"},
    "layer indexes": {"layers_to_transform": [0, 2], "layers_pattern": "layers"},
    "rslora, gaussian": {"use_rslora": True, "init_lora_weights": "gaussian", "lora_dropout": 0.1},
    "rank at the layers' size": {"r": 64, "target_modules": ["q_proj", "v_proj"]},  # hidden 64: r = min(64, 64)
}


@pytest.mark.parametrize("name", list(VALID))
def test_adapters_peft_saved_are_accepted_as_peft_builds_them(name: str, files: Files, tmp_path: Path) -> None:
    """The independent route: peft's own build of the saved adapter (PeftModel.from_pretrained on the real tiny
    model) wraps the layers, with the ranks, that the file's tensors have; the validator accepts it, and oneke-plan
    plans it."""
    folder = _save_adapter(files.base, tmp_path / "adapter", **VALID[name])
    base = AutoModelForCausalLM.from_pretrained(files.base, **dtype_kw(torch.float32))
    loaded = peft.PeftModel.from_pretrained(base, str(folder))
    built = {n.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0]: tuple(p.shape)
             for n, p in loaded.named_parameters() if ".lora_A." in n}  # fmt: skip
    adapter = read_adapter(folder)
    assert built == {module: pair["lora_A"] for module, pair in adapter.modules.items()}
    check_base(adapter, transformers_meta_model(AutoConfig.from_pretrained(files.base), dtype="bfloat16"))
    argv = [str(files.base), "--inventory", str(files.inventory), "--max-new-tokens", "2", "--adapter", str(folder)]
    assert _outcome(plan_main, argv)[0] == 0


# ---------------------------------------------------------------- bounded memory

def test_a_huge_rank_is_refused_in_bounded_memory(files: Files, tmp_path: Path) -> None:
    """r = 2**22 on the tiny model: peft would create a 2**22 x 128 float32 lora_A (2 GiB) for each wrapped layer.
    The refusal's peak memory is within 300 MiB of what importing the libraries alone takes."""
    folder = _build(files, Case("", "", {"r": 2**22}), tmp_path / "adapter")
    argv = [str(files.base), "--inventory", str(files.inventory), "--max-new-tokens", "2", "--adapter", str(folder)]
    code = "import sys; from oneke_plan.cli.plan import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "r is 4194304, more than" in done.stderr, done.stderr
    baseline, refused = imports_peak_bytes(), measured([sys.executable, "-c", code, *argv]).peak_bytes
    print(f"peak RSS: imports {baseline / 2**20:.0f} MiB, refusal {refused / 2**20:.0f} MiB")
    assert refused - baseline < 300 * 2**20, (baseline, refused)
