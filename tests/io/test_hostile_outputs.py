"""No run destroys a file it reads (oneke_plan.io.files.output_target, the one check of every output path).

Every output flag (oneke-plan -o and --plot, oneke-run --output) is pointed, through the real CLIs, at every file and
folder the command reads: the model's weights, its config.json, a new file in its folder, a weights file the model
folder only links to, a Hugging Face cache snapshot's link and the blob behind it, the adapter's file and folder, the
inventory, the offload folder, the profile, the input file (an earlier output of oneke-run, so that only the
read-check stands between it and --overwrite) and the --schema file; and at another model's or adapter's files,
which the command does not read. Each is refused with exit 2 and one line naming the path, with and without
--overwrite (and --resume), and the file's bytes, its folder's listing, and a path that did not exist, stay as they
were. Then the positive side: --overwrite still replaces the tool's own earlier output (and an empty file), and an
output beside the read files in an ordinary folder is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import put_in_hub_cache

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.measure.compat import dtype_kw
from oneke_plan.plan.report import drawn_by_oneke_plan

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

peft = pytest.importorskip("peft")  # the [lora] extra: the adapter is one of the files a run reads

NER_LINE = json.loads(
    (Path(__file__).parents[2] / "examples" / "deepke" / "NER" / "test.json").read_text("utf-8").splitlines()[0]
)
REPO_ID = "someone/tiny"


@dataclass(frozen=True)
class World:
    """One planned tiny model and everything around it, shared by the module (nothing here is ever changed: each
    test checks that)."""

    root: Path
    model: Path  # a copied tiny checkpoint
    linked: Path  # a model folder whose model.safetensors is a link to store/weights.safetensors
    hub: Path  # HF_HUB_CACHE
    snapshot: Path  # the tiny model as a Hugging Face cache snapshot of REPO_ID (links into blobs/)
    adapter: Path  # a LoRA for the tiny model, saved by peft
    other: Path  # another model folder, which the commands do not read
    other_adapter: Path
    inventory: Path
    offload: Path
    profile: Path  # oneke-plan's, with the adapter: oneke-run reads the profile, the model and the adapter
    earlier: Path  # an earlier output of oneke-run, used as the input file
    raw: Path  # raw text lines, for --task NER --schema schema.json
    schema: Path


def _lora(model: Path, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, **dtype_kw(torch.float32))
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("outputs")
    model = Path(shutil.copytree(tiny_model_dir, root / "model"))
    linked = Path(shutil.copytree(tiny_model_dir, root / "linked"))
    (root / "store").mkdir()
    (linked / "model.safetensors").rename(root / "store" / "weights.safetensors")
    (linked / "model.safetensors").symlink_to(root / "store" / "weights.safetensors")
    snapshot = put_in_hub_cache(tiny_model_dir, root, REPO_ID, keep=True)
    adapter = _lora(model, root / "adapter")
    other = Path(shutil.copytree(tiny_model_dir, root / "other"))
    other_adapter = Path(shutil.copytree(adapter, root / "other-adapter"))
    inventory = root / "inventory.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    (root / "offload").mkdir()
    profile = root / "profile.yaml"
    planned = [model, "--inventory", inventory, "--max-new-tokens", "2", "--adapter", adapter, "-o", profile]
    assert plan_main([str(a) for a in planned]) == 0
    earlier = root / "earlier.jsonl"  # what oneke-run writes: the input line with its key and answer
    earlier.write_text(json.dumps({**NER_LINE, "key": "1", "output": "[]"}, ensure_ascii=False) + "\n", "utf-8")
    raw = root / "raw.jsonl"
    raw.write_text(json.dumps({"text": "张三在北京工作。"}, ensure_ascii=False) + "\n", "utf-8")
    schema = root / "schema.json"
    schema.write_text(json.dumps(["人物", "地点"], ensure_ascii=False), "utf-8")
    return World(root, model, linked, root / "hub", snapshot, adapter, other, other_adapter, inventory,
                 root / "offload", profile, earlier, raw, schema)  # fmt: skip


@pytest.fixture(autouse=True)
def hub_cache(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(world.hub))


def _blob(world: World, name: str) -> Path:
    return Path(os.path.realpath(world.snapshot / name))


# name -> (the path an output flag is pointed at, the model the command is given)
ModelOf = Callable[[World], str]
READ_BY_BOTH: dict[str, tuple[Callable[[World], Path], ModelOf]] = {
    "model weights": (lambda w: w.model / "model.safetensors", lambda w: str(w.model)),
    "model config.json": (lambda w: w.model / "config.json", lambda w: str(w.model)),
    "new file in the model folder": (lambda w: w.model / "model.safetensors.index.json", lambda w: str(w.model)),
    "weights the model folder links to": (lambda w: w.root / "store" / "weights.safetensors", lambda w: str(w.linked)),
    "cache snapshot link": (lambda w: w.snapshot / "model.safetensors", lambda w: REPO_ID),
    "cache blob": (lambda w: _blob(w, "model.safetensors"), lambda w: REPO_ID),
    "new file in the cache snapshot": (lambda w: w.snapshot / "new.jsonl", lambda w: REPO_ID),
    "adapter weights": (lambda w: w.adapter / "adapter_model.safetensors", lambda w: str(w.model)),
    "adapter config": (lambda w: w.adapter / "adapter_config.json", lambda w: str(w.model)),
    "new file in the adapter folder": (lambda w: w.adapter / "adapter_model.bin", lambda w: str(w.model)),
    "offload folder": (lambda w: w.offload, lambda w: str(w.model)),
    "new file in the offload folder": (lambda w: w.offload / "index.json", lambda w: str(w.model)),
}
READ_BY_PLAN = {"inventory": lambda w: w.inventory}
READ_BY_RUN = {
    "profile": lambda w: w.profile,
    "input file (an earlier output)": lambda w: w.earlier,
    "schema file": lambda w: w.schema,
}
NOT_READ = {  # another model's and adapter's files, and the cache: the command does not read them
    "another model's config.json": lambda w: w.other / "config.json",
    "another model's weights": lambda w: w.other / "model.safetensors",
    "a new file in another model's folder": lambda w: w.other / "tokenizer.model",
    "another adapter's config": lambda w: w.other_adapter / "adapter_config.json",
    "a new file in another adapter's folder": lambda w: w.other_adapter / "notes.yaml",
}


def _state(path: Path) -> tuple:
    """What must not change: whether `path` exists, its bytes' hash (through a link), what it is (lstat), and the
    listing of its folder (no journal or temporary file left)."""
    listing = sorted(os.listdir(path.parent)) if path.parent.is_dir() else None
    if not os.path.lexists(path):
        return False, None, None, listing
    info = os.lstat(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return True, digest, (info.st_ino, info.st_mode, info.st_nlink), listing


def _refused(prog: str, code: int, err: str, path: Path, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err and str(path) in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def _plan(world: World, model: str, flag: str, target: Path, *extra: str) -> list[str]:
    argv = [model, "--inventory", world.inventory, "--max-new-tokens", "2", "--adapter", world.adapter,
            "--offload-dir", world.offload, flag, target, *extra]  # fmt: skip
    return [str(a) for a in argv]


def _run(world: World, model: str, target: Path, *extra: str, raw: bool = False) -> list[str]:
    given = ["--input", world.raw, "--task", "NER", "--schema", world.schema] if raw else ["--input", world.earlier]
    argv = ["--profile", world.profile, "--model", model, *given, "--offload-dir", world.offload,
            "--output", target, "--no-progress", *extra]  # fmt: skip
    return [str(a) for a in argv]


PLAN_CASES = [(n, *READ_BY_BOTH[n]) for n in READ_BY_BOTH] + [(n, f, lambda w: str(w.model)) for n, f in
                                                               READ_BY_PLAN.items()]  # fmt: skip
RUN_CASES = [(n, *READ_BY_BOTH[n]) for n in READ_BY_BOTH] + [(n, f, lambda w: str(w.model)) for n, f in
                                                             READ_BY_RUN.items()]  # fmt: skip


@pytest.mark.parametrize("extra", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("flag", ["-o", "--plot"])
@pytest.mark.parametrize(("name", "target_of", "model_of"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_oneke_plan_never_writes_what_it_reads(
    world: World, capsys: pytest.CaptureFixture[str], name: str, target_of, model_of, flag: str, extra: tuple
) -> None:  # type: ignore[no-untyped-def]
    target = target_of(world)
    before = _state(target)
    code = plan_main(_plan(world, model_of(world), flag, target, *extra))
    _refused("oneke-plan", code, capsys.readouterr().err, target, "which this command reads")
    assert _state(target) == before


@pytest.mark.parametrize("extra", [(), ("--overwrite",), ("--resume",)], ids=["new", "overwrite", "resume"])
@pytest.mark.parametrize(("name", "target_of", "model_of"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_oneke_run_never_writes_what_it_reads(
    world: World, capsys: pytest.CaptureFixture[str], name: str, target_of, model_of, extra: tuple
) -> None:  # type: ignore[no-untyped-def]
    target = target_of(world)
    before = _state(target)
    code = run_main(_run(world, model_of(world), target, *extra, raw=name == "schema file"))
    _refused("oneke-run", code, capsys.readouterr().err, target, "which this command reads")
    assert _state(target) == before


@pytest.mark.parametrize("name", list(NOT_READ))
def test_no_output_goes_into_a_model_or_adapter_folder_it_does_not_read(
    world: World, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    target = NOT_READ[name](world)
    before = _state(target)
    for flag in ("-o", "--plot"):  # planned from the built-in config: no folder is read at all
        code = plan_main(["oneke", "--gpu", "24GiB", flag, str(target), "--overwrite"])
        _refused("oneke-plan", code, capsys.readouterr().err, target, "folder (it holds")
        assert _state(target) == before
    for extra in ((), ("--overwrite",)):
        code = run_main(_run(world, str(world.model), target, *extra))
        _refused("oneke-run", code, capsys.readouterr().err, target, "folder (it holds")
        assert _state(target) == before


def test_no_output_goes_into_the_hugging_face_cache(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    for target in (world.snapshot / "new.yaml", _blob(world, "config.json")):
        before = _state(target)
        code = plan_main(["oneke", "--gpu", "24GiB", "-o", str(target), "--overwrite"])
        _refused("oneke-plan", code, capsys.readouterr().err, target, "Hugging Face cache")
        assert _state(target) == before


# -- what --overwrite is for -----------------------------------------------------------------------------------------


def test_overwrite_replaces_the_tools_own_earlier_output(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """oneke-run: an earlier output is refused without --overwrite, replaced with it (after a real run of the tiny
    model); an empty file likewise. Beside the profile and inventory, in an ordinary folder, writing is fine."""
    out = tmp_path / "out.jsonl"
    earlier = json.dumps({**NER_LINE, "key": "1", "output": "an earlier answer"}, ensure_ascii=False) + "\n"
    out.write_text(earlier, "utf-8")
    _refused("oneke-run", run_main(_run(world, str(world.model), out)), capsys.readouterr().err, out, "--overwrite")
    assert out.read_text("utf-8") == earlier
    assert run_main(_run(world, str(world.model), out, "--overwrite")) == 0
    lines = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert len(lines) == 1 and lines[0]["key"] == "1" and lines[0]["output"] != "an earlier answer"
    out.write_bytes(b"")
    assert run_main(_run(world, str(world.model), out)) == 2  # an empty file needs --overwrite too
    assert out.read_bytes() == b""
    assert run_main(_run(world, str(world.model), out, "--overwrite")) == 0
    assert [json.loads(line)["key"] for line in out.read_text("utf-8").splitlines()] == ["1"]


def test_plot_and_o_replace_their_own_earlier_output_beside_what_they_read(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(world.inventory, tmp_path / "inventory.yaml")  # read, in the folder written to: only it is kept
    inventory = tmp_path / "inventory.yaml"
    picture, profile = tmp_path / "machine.svg", tmp_path / "machine.yaml"
    argv = [str(world.model), "--inventory", str(inventory), "--max-new-tokens", "2"]
    for extra in ((), (), ("--overwrite",)):  # written, replaced as its own, and again with --overwrite
        assert plan_main([*argv, "-o", str(profile), "--plot", str(picture), *extra]) == 0
        assert drawn_by_oneke_plan(picture) and yaml.safe_load(profile.read_text())["created_by"]
    assert inventory.read_text() == world.inventory.read_text()
    picture.write_bytes(b"")
    assert plan_main([*argv, "--plot", str(picture), "--overwrite"]) == 0 and drawn_by_oneke_plan(picture)
    capsys.readouterr()


def test_never_the_gguf_file_it_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gguf_files import gguf_unsupported, write_gguf

    gguf = write_gguf(tmp_path / "tiny.gguf", "llama")
    why = gguf_unsupported(gguf)
    if why:
        pytest.skip(f"{why}: oneke-plan refuses GGUF files here")
    before = _state(gguf)
    for flag in ("-o", "--plot"):
        for extra in ((), ("--overwrite",)):
            code = plan_main([str(gguf), "--gpu", "24GiB", flag, str(gguf), *extra])
            _refused("oneke-plan", code, capsys.readouterr().err, gguf, "the model's GGUF file", "which this command")
            assert _state(gguf) == before
