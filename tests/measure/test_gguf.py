"""GGUF files as a model source, planned as transformers loads them: the weights planned for SmolLM2-135M-Instruct's
Q4_1 GGUF equal those of the model transformers itself loads from it (dequantized) and those planned for the same
weights converted to a float32 safetensors checkpoint; the chat template flag, the key check by transformers' GGUF
name map, and every refusal (not a GGUF, truncated, two GGUFs in a folder, an architecture transformers cannot
load, bitsandbytes or disk offload for a GGUF) in one line, exit 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from gguf_files import gguf_unsupported, write_gguf

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.core.errors import EXIT_BAD_INPUT

PLAN_ARGS = ["--max-input-tokens", "256", "--max-new-tokens", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inventory") / "cpu.yaml"
    path.write_text("gpus: []\ncpu_memory: 16GiB\n")
    return path


def plan(model: Path | str, out: Path, inventory: Path, *extra: str) -> dict[str, Any]:
    assert plan_main([str(model), "--inventory", str(inventory), *PLAN_ARGS, "-o", str(out), *extra]) == 0
    return yaml.safe_load(out.read_text())


def plan_error(capsys: pytest.CaptureFixture[str], model: Path | str, *extra: str) -> str:
    code = plan_main([str(model), "--gpu", "24GiB", *PLAN_ARGS, *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and lines[0].startswith("oneke-plan: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def gguf_profile(gguf_file: Path, inventory: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return plan(gguf_file, tmp_path_factory.mktemp("profiles") / "gguf.yaml", inventory)


@pytest.fixture(scope="module")
def transformers_loaded(gguf_file: Path) -> Any:
    """The model as transformers itself loads the GGUF with dtype="auto" (no oneke_plan code involved)."""
    from transformers import AutoModelForCausalLM

    from oneke_plan.measure.compat import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, **{dtype_kwarg(): "auto"}
    )
    yield model
    del model


def test_planned_weights_equal_transformers_own_load(gguf_profile: dict[str, Any], transformers_loaded: Any) -> None:
    """--dtype auto is the dtype transformers loads the GGUF in, and the planned weight bytes are those of the
    model it loaded: its parameters (tied embeddings once: `parameters()` yields a shared one once) and buffers
    (the rotary embedding's inverse frequencies)."""
    model = transformers_loaded
    assert gguf_profile["dtype"] == str(model.dtype).removeprefix("torch.") == "float32"
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: counted once above
    assert gguf_profile["device_map"] == {"": "cpu"}
    assert gguf_profile["estimate"]["cpu"]["weights_bytes"] == params + buffers
    assert gguf_profile["model"]["parameter_count"] == sum(p.numel() for p in model.parameters())


def test_planned_like_the_converted_checkpoint(
    gguf_profile: dict[str, Any], smollm2_dir: Path, inventory: Path, tmp_path: Path
) -> None:
    """The same weights converted to float32 safetensors (an independent route: config.json and safetensors
    headers) plan to the same bytes on the same devices."""
    converted = plan(smollm2_dir, tmp_path / "converted.yaml", inventory, "--dtype", "float32")
    assert converted["estimate"] == gguf_profile["estimate"]
    assert converted["device_map"] == gguf_profile["device_map"]
    assert converted["model"]["parameter_count"] == gguf_profile["model"]["parameter_count"]


def test_folder_with_one_gguf_is_the_gguf(
    gguf_file: Path, gguf_profile: dict[str, Any], inventory: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / gguf_file.name).symlink_to(gguf_file)
    by_folder = plan(folder, tmp_path / "folder.yaml", inventory)
    assert by_folder["model"]["source"] == str(folder)
    assert by_folder["model"]["config_fingerprint"] == gguf_profile["model"]["config_fingerprint"]
    assert by_folder["estimate"] == gguf_profile["estimate"]


def test_source_chat_template_and_fingerprint(gguf_file: Path, tmp_path: Path) -> None:
    """ModelSource.chat_template says whether the tokenizer transformers builds from the GGUF carries one; the
    fingerprint is that of transformers' config of the file (another GGUF's differs)."""
    from transformers import AutoTokenizer

    from oneke_plan.api.checks import model_source

    source = model_source(str(gguf_file))
    assert source.kind == "gguf" and source.gguf_file == gguf_file and source.directory == gguf_file.parent
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert source.chat_template is bool(tokenizer.chat_template) is True
    assert source.config["num_hidden_layers"] == 30 and source.config["hidden_size"] == 576
    other = model_source(str(write_gguf(tmp_path / "tiny" / "tiny.gguf", "llama")))
    assert other.chat_template is False
    assert other.fingerprint != source.fingerprint
    templated = model_source(str(write_gguf(tmp_path / "chat" / "tiny.gguf", "llama", chat_template="{{ x }}")))
    assert templated.chat_template is True and templated.fingerprint == other.fingerprint


def test_key_check_by_transformers_name_map(gguf_file: Path) -> None:
    """Every parameter of the meta model is filled by a tensor of the file, through transformers' GGUF name map;
    a model with one layer more than the file has is refused by name before any weight is read."""
    from oneke_plan.api.checks import model_source
    from oneke_plan.measure.compat import transformers_at_least
    from oneke_plan.measure.gguf import gguf_key_mismatch
    from oneke_plan.measure.layout import build_meta_model, load_config

    if not transformers_at_least("4.47"):
        pytest.skip("transformers < 4.47 has no GGUF-to-model name map (get_gguf_hf_weights_map)")
    source = model_source(str(gguf_file))
    config = load_config(source)
    assert gguf_key_mismatch(build_meta_model(copy.deepcopy(config), "float32"), gguf_file) is not None
    assert not gguf_key_mismatch(build_meta_model(copy.deepcopy(config), "float32"), gguf_file)
    config.num_hidden_layers = 31
    mismatch = gguf_key_mismatch(build_meta_model(config, "float32"), gguf_file)
    assert mismatch and mismatch.missing and all(k.startswith("model.layers.30.") for k in mismatch.missing)


# -- refusals ----------------------------------------------------------------------------------------------------
def test_not_a_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text('{"model_type": "llama"}')
    assert "not a GGUF file" in plan_error(capsys, path)


@pytest.mark.parametrize("keep", [1000, 0.5])
def test_truncated_gguf(capsys: pytest.CaptureFixture[str], gguf_file: Path, tmp_path: Path, keep: float) -> None:
    """Cut inside the metadata, and halfway through the tensor data."""
    size = int(keep if keep > 1 else gguf_file.stat().st_size * keep)
    path = tmp_path / "cut.gguf"
    with gguf_file.open("rb") as source, path.open("wb") as target:
        target.write(source.read(size))
    line = plan_error(capsys, path)
    assert "not a complete GGUF file" in line and "truncated" in line


def test_folder_with_two_ggufs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for name in ("a.Q4_1.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    line = plan_error(capsys, tmp_path)
    assert "holds 2 GGUF files" in line and "a.Q4_1.gguf" in line


def test_unsupported_architecture(capsys: pytest.CaptureFixture[str], gguf_file: Path, tmp_path: Path) -> None:
    """The architectures named are transformers' own list."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    line = plan_error(capsys, write_gguf(tmp_path / "odd.gguf", "notanarch"))
    assert "'notanarch'" in line and "cannot load" in line
    assert all(name in line for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer"))


@pytest.mark.parametrize(
    "extra, needle",
    [(["--quantize", "4bit"], "cannot quantize a GGUF"), (["--offload-dir", "off"], "to disk")],
)
def test_what_transformers_cannot_load_from_a_gguf(
    capsys: pytest.CaptureFixture[str], gguf_file: Path, extra: list[str], needle: str
) -> None:
    assert needle in plan_error(capsys, gguf_file, *extra)


def test_unsupported_environment_refused(
    capsys: pytest.CaptureFixture[str], smollm2_gguf: Path, tmp_path: Path
) -> None:
    """Where oneke-plan cannot plan a GGUF as transformers loads it (transformers before 4.47; a gguf package that
    cannot read files), one line saying what to upgrade."""
    why = gguf_unsupported(smollm2_gguf)
    if not why:
        pytest.skip("GGUF files are planned here (the tests above)")
    line = plan_error(capsys, smollm2_gguf)
    assert "upgrade transformers" in line or ("cannot read GGUF files here" in line and "upgrade gguf" in line)
