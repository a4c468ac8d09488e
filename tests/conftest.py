"""Shared pytest fixtures: tiny LLaMA checkpoints built once per session, and the DeepKE sample data."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

# The random checkpoint builder is a development tool, not part of the package: tools/tiny_checkpoint.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import real_checkpoint  # noqa: E402
from tiny_checkpoint import build_tiny_llama  # noqa: E402

from oneke_plan.measure.compat import TRANSFORMERS_BNB_CPU, bnb_quantizes_on_cpu, stay_offline  # noqa: E402

# Tests that build quantized models without going through the CLIs or the API import bitsandbytes too: the test
# process stays off the network as the tools do (tests/cli/test_offline.py checks the tools in fresh processes).
stay_offline()

# Version-specific tests (CI runs the oldest versions pyproject allows as well as the newest).
needs_bnb_on_cpu = pytest.mark.skipif(
    not bnb_quantizes_on_cpu(),
    reason=f"transformers < {TRANSFORMERS_BNB_CPU} runs bitsandbytes on the CPU only with Intel IPEX; oneke-run "
    "refuses such a load in one line (test_quantized_cpu_load_is_refused_on_old_transformers)",
)

DEEPKE_DIR = Path(__file__).parent.parent / "examples" / "deepke"


def put_in_hub_cache(model_dir: Path, hf_home: Path, repo_id: str, keep: bool = False) -> Path:
    """Lay `model_dir`'s files out as huggingface_hub's download does: content-addressed blobs, a snapshot folder of
    symbolic links to them named by the commit, and refs/main naming that commit (`keep`: copy the files there, not
    move them). Returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(model_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if keep:
            shutil.copyfile(path, blob)
        else:
            path.rename(blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


_META_MODELS: dict[tuple[str, str, str | None], object] = {}


def transformers_meta_model(config, dtype: str = "bfloat16", attn: str | None = None):  # type: ignore[no-untyped-def]
    """transformers' own AutoModelForCausalLM.from_config(config) on torch's meta device, weights tied: a build
    independent of the planner's (no planner or layout code), to check plans against. Cached per config, dtype and
    attention implementation."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from oneke_plan.measure.compat import dtype_kw

    key = (config.to_json_string(), dtype, attn)
    if key not in _META_MODELS:
        extra = {"attn_implementation": attn} if attn else {}
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, **dtype_kw(getattr(torch, dtype)), **extra)
        model.tie_weights()
        _META_MODELS[key] = model
    return _META_MODELS[key]


def llama2_zh_ids(tokenizer, instruction: str, bos: bool = True) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of DeepKE's llama2_zh chat prompt around `instruction`, BOS included (`bos`: checked to be there;
    a tokenizer that adds none, as SmolLM2's, passes False): the template written out here
    (/work/shared/oneke/README.md, "Prompt format"), not templates.Template.render or runner.encode_prompts."""
    prompt = (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n" + instruction + " [/INST]"
    )
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    assert ids[0] == tokenizer.bos_token_id or not bos
    return ids


def accelerate_device(name: str, device_map: dict):  # type: ignore[no-untyped-def]
    """The device_map entry that covers tensor or module `name`, by accelerate's own rule (the walk up the dotted
    name that its checkpoint loading does): an independent route to oneke_plan.plan.fit.device_owner's answer. Raises
    ValueError when no key covers `name`."""
    from accelerate.utils.modeling import _get_param_device

    return _get_param_device(name, device_map)


def quant_state_tensors(param) -> list:  # type: ignore[no-untyped-def]
    """The tensors bitsandbytes keeps beside a quantized weight: SCB (8-bit), or the 4-bit QuantState's."""
    extra = []
    if getattr(param, "SCB", None) is not None:
        extra.append(param.SCB)
    state = getattr(param, "quant_state", None)
    if state is not None:
        extra += [state.absmax, state.code]
        if getattr(state, "offset", None) is not None:
            extra.append(state.offset)
        if getattr(state, "state2", None) is not None:
            extra += [state.state2.absmax, state.state2.code]
    return extra


def storage_bytes_by_owner(model, keys) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Bytes of every parameter, buffer and bitsandbytes quant-state tensor, grouped by owning key.

    Each storage is counted once (tied weights share one), at its real size (untyped_storage().nbytes()).
    """
    seen: set[int] = set()
    out: dict[str, int] = {}
    owners = {key: key for key in keys}  # accelerate's rule for device_map keys, used for block names too
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        owner = accelerate_device(name, owners)
        for t in [tensor, *quant_state_tensors(tensor)]:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            out[owner] = out.get(owner, 0) + t.untyped_storage().nbytes()
    return out


@pytest.fixture(scope="module")
def quiet_accelerate():  # yields None
    """accelerate logs "Device N is not available" when a device_map names GPUs this machine lacks."""
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _real_model(get):  # type: ignore[no-untyped-def]
    """tools/real_checkpoint.py's SmolLM2-135M-Instruct (cached under .cache/). Where the package index cannot be
    reached the tests that need it skip, except under CI (CI=true), which must run them."""
    import os

    try:
        return get()
    except real_checkpoint.Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-weights tests: {exc}")
        pytest.skip(f"real weights unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct's trained weights as a float32 safetensors checkpoint with its tokenizer (its
    tokenizer.json and ChatML chat template), converted from the package index's GGUF by this transformers."""
    return _real_model(real_checkpoint.checkpoint_dir)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file itself (Q4_1), as the package index ships it."""
    return _real_model(real_checkpoint.gguf_file)


@pytest.fixture(scope="session")
def gguf_file(smollm2_gguf: Path) -> Path:
    """The real GGUF where this transformers loads GGUF files; skipped where oneke-plan refuses them (before 4.47:
    tests/measure/test_gguf.py checks that refusal)."""
    from gguf_files import gguf_unsupported

    why = gguf_unsupported(smollm2_gguf)
    if why:
        pytest.skip(f"{why}: oneke-plan refuses GGUF files here")
    return smollm2_gguf


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model: bf16, 4 layers, hidden 64, untied, one safetensors file."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Grouped-query attention: 4 query heads sharing 2 key/value heads."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_gqa"), num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings: no lm_head.weight on disk, transformers must tie it on load."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three safetensors shards with a model.safetensors.index.json, like the real OneKE checkpoint."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_sharded"), shards=3)


@pytest.fixture(scope="session")
def deepke_dir() -> Path:
    """examples/deepke: DeepKE's sample files, one <TASK>/test.json per task."""
    return DEEPKE_DIR


@pytest.fixture()
def single_torch_thread():  # yields None
    """One intra-op thread for the test: tiny models gain nothing from parallel matmuls, and on a busy 2-core
    machine OpenMP's spinning threads make them several times slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def small_tmpfs(tmp_path: Path):  # yields Path
    """A real 64 KiB tmpfs mounted in tmp_path, for disk-full and read-only cases that a chmod cannot make for
    root. Needs mount rights (root in a sandbox); skipped where mounting is not allowed. Unmounted afterwards."""
    import shutil
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture()
def read_only_tmpfs(small_tmpfs: Path) -> Path:
    """small_tmpfs, remounted read-only: a folder where even root cannot create a file."""
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, capture_output=True)
    return small_tmpfs


SPECIAL_KINDS = ("FIFO", "device", "hard link", "symbolic link")


def _make_special_file(kind: str, path: Path) -> Path:
    """An existing `path` that is not a plain file of its own: a FIFO, a copy of /dev/null (a device node: root,
    this suite's user, may make one), a hard link of an empty file, or a symbolic link to one."""
    import os
    import stat

    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "hard link":
        (path.parent / f"{path.name}.other-name").write_bytes(b"")
        os.link(path.parent / f"{path.name}.other-name", path)
    elif kind == "symbolic link":
        (path.parent / f"{path.name}.target").write_bytes(b"")
        os.symlink(path.parent / f"{path.name}.target", path)
    else:
        raise ValueError(kind)
    return path


@pytest.fixture()
def make_special_file():  # returns the factory
    """make_special_file(kind, path): see SPECIAL_KINDS; skips a device where mknod is not permitted."""

    def make(kind: str, path: Path) -> Path:
        try:
            return _make_special_file(kind, path)
        except PermissionError:
            pytest.skip(f"cannot make a {kind} here")

    return make


_SHARED_MEASUREMENTS: dict[tuple[str, bool], Any] = {}


@pytest.fixture(autouse=True)
def shared_measurements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # yields None
    """The suite plans the same few configs hundreds of times in one process (in-process CLI calls, api.plan): each
    planning run owns its measurements, so the suite hands every run of a config (without an adapter) the one
    Measurements it measured first, as the package's own module-level cache once did. Measuring is deterministic
    per config, so no answer changes, only the suite's time. Tests marked own_measurements (those about what a
    planning run builds and frees) plan as users do."""
    if request.node.get_closest_marker("own_measurements"):
        yield
        return
    import oneke_plan.api.planner as planner

    real = planner.Measurements

    def shared(config, trust_remote_code=False, adapter=None):  # type: ignore[no-untyped-def]
        if adapter is not None:
            return real(config, trust_remote_code, adapter)
        key = (config.to_json_string(use_diff=False), trust_remote_code)
        if key not in _SHARED_MEASUREMENTS:
            _SHARED_MEASUREMENTS[key] = real(config, trust_remote_code, adapter)
        return _SHARED_MEASUREMENTS[key]

    monkeypatch.setattr(planner, "Measurements", shared)
    yield


@pytest.fixture()
def no_hang():  # yields None
    """A check that opened a FIFO (or a device) for reading would wait for a writer for ever: an alarm turns that
    regression into a failure instead of a hung test run."""

    def stuck(signum: int, frame: object) -> None:
        raise AssertionError("blocked: a FIFO or device was opened for reading")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
