"""A Hugging Face cache's refs/main, in every form a disk can hold it: the 40-digit commit huggingface_hub writes is
followed, anything else is one line, read with a bound (a FIFO never blocks, /dev/zero or a 4 GiB sparse file is
never read)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile import cli, measured, replaced

from oneke_plan.core.errors import BadInput
from oneke_plan.plan.model_source import resolve_model

REPO = "zjunlp/OneKE"
COMMIT = hashlib.sha1(b"zjunlp/OneKE").hexdigest()
CONFIG = '{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000}'


def hub_cache(root: Path, commits: tuple[str, ...] = (COMMIT,)) -> Path:
    """A cache with `commits` as snapshots holding config.json, and refs/main naming the first. Returns refs/main."""
    repo = root / "hub" / "models--zjunlp--OneKE"
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(CONFIG)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commits[0])
    return repo / "refs" / "main"


@pytest.fixture()
def ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return hub_cache(tmp_path)


def test_the_commit_huggingface_hub_writes_is_followed(ref: Path, tmp_path: Path) -> None:
    other = hashlib.sha1(b"older").hexdigest()
    hub_cache(tmp_path / "second", (COMMIT, other))  # a later-sorting snapshot must not win over refs/main
    source = resolve_model(REPO)
    assert source.kind == "hub-cache" and source.directory == ref.parents[1] / "snapshots" / COMMIT
    ref.write_text(COMMIT + "\n")  # a trailing newline, as an editor leaves it
    assert resolve_model(REPO).directory == ref.parents[1] / "snapshots" / COMMIT


REFS: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (
        lambda p: p.write_text(""),
        "is not a commit hash (40 hexadecimal digits, as huggingface_hub writes): it is empty",
    ),
    "a path": (lambda p: p.write_text("../../../../etc"), "it holds '../../../../etc'"),
    "short": (lambda p: p.write_text(COMMIT[:39]), f"it holds '{COMMIT[:39]}'"),
    "binary": (lambda p: p.write_bytes(b"\xff\x00" * 20), "is not a commit hash"),
    "fifo": (replaced(os.mkfifo), "is a FIFO (named pipe), not a regular file"),
    "dev-zero": (replaced(lambda p: p.symlink_to("/dev/zero")), "is a symbolic link to /dev/zero, a character device"),
    "folder": (replaced(lambda p: p.mkdir()), "is a folder, not a regular file"),
    "4 GiB sparse": (lambda p: os.truncate(p, 4 * 2**30), "larger than 256 B (it is 4.00 GiB)"),
}


@pytest.mark.parametrize("kind", REFS)
def test_anything_else_in_refs_main_is_one_line(ref: Path, kind: str, no_hang: None) -> None:
    damage, expected = REFS[kind]
    damage(ref)
    with pytest.raises(BadInput) as caught:
        resolve_model(REPO)
    message = str(caught.value)
    assert message.startswith(f"{ref}: ") and expected in message and "\n" not in message, message
    assert message.endswith(f"download the model again (hf download {REPO}) to rewrite it")


def test_a_4_gib_sparse_refs_main_costs_no_memory(tmp_path: Path) -> None:
    ref = hub_cache(tmp_path / "hf")
    os.truncate(ref, 4 * 2**30)  # sparse: no disk taken
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = measured([*cli("oneke-plan"), REPO], env, tmp_path)
    code, peak, stderr = done.code, done.peak_bytes, done.stderr
    assert code == 2 and stderr.splitlines() == [
        f"oneke-plan: error: {ref}: larger than 256 B (it is 4.00 GiB), more "
        "than any file of its kind; download the model again (hf download "
        f"{REPO}) to rewrite it"
    ], stderr
    assert peak < 600 * 2**20  # read whole, it would be 4 GiB (before: MemoryError at 4 GB)
