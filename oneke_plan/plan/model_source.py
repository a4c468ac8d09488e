"""Where a model comes from: a local directory, a Hugging Face repo id in the local cache, a GGUF file (or a folder
holding one GGUF and no config.json), or the built-in `oneke`.

Planning reads only config.json; nothing here touches the network or runs code from the model directory. A GGUF
file's config is what transformers makes of its metadata, so it is read by the caller's `read_gguf` (measure.gguf:
this layer imports no transformers); here it is only found.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.io.files import read_regular
from oneke_plan.io.jsonfile import read_json_file
from oneke_plan.io.limits import MAX_REF_BYTES

BUILTIN_MODELS = {"oneke": "oneke_config.json"}
ONEKE_REPO_ID = "zjunlp/OneKE"
# Keys that decide the model's tensor shapes, and so the plan: the fingerprint covers these only, so a config saved
# by another transformers version, or with other token ids or generation defaults, still matches its profile.
_STRUCTURAL_KEY = re.compile(
    r"^(architectures|model_type|tie_word_embeddings|head_dim|vocab_size|max_position_embeddings)$"
    r"|_size$|^(n|num)_|layers|heads|experts|embd|inner|positions"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"[0-9a-f]{40}")  # what huggingface_hub writes to refs/main: the commit's SHA-1, in hex
GGUF_SUFFIX = ".gguf"

GgufReader = Callable[[Path], tuple[dict[str, Any], bool]]
"""Reads a GGUF file: (transformers' config for it as a dict, whether it carries a chat template); BadInput for a
file that is not a complete GGUF or whose architecture transformers cannot load (measure.gguf.read_gguf)."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user typed, the directory holding it (None for a built-in), its config dict."""

    name: str
    kind: str  # "builtin", "directory", "hub-cache" or "gguf"
    directory: Path | None  # for a GGUF: the folder that holds the file
    config: dict[str, Any]  # for a GGUF: transformers' config built from its metadata, as a dict
    gguf_file: Path | None = None  # the GGUF file the weights, config and tokenizer come from (kind "gguf")
    # Whether the model's tokenizer carries a chat template of its own: for a GGUF, its metadata key
    # `tokenizer.chat_template`; for a directory, tokenizer_config.json's `chat_template` or a chat_template.jinja /
    # chat_template.json file beside it; None where that was not read (built-in configs, damaged tokenizer files).
    chat_template: bool | None = None

    @property
    def fingerprint(self) -> str:
        return config_fingerprint(self.config)


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the config's structural keys (those that set tensor shapes)."""
    stable = {k: v for k, v in config.items() if _STRUCTURAL_KEY.search(k)}
    blob = json.dumps(stable, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or BadInput naming the file and the problem."""
    config = read_json_file(path, "a model directory needs a valid config.json: fix or re-download it")
    if not isinstance(config, dict):
        raise BadInput(f"{path}: config.json must hold a JSON object, not {type(config).__name__}")
    return config


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` in the local Hugging Face cache (refs/main first), or None."""
    repo_dir = _hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    commit = _ref_commit(repo_dir / "refs" / "main", repo_id)
    if commit is not None and (snapshots / commit / "config.json").is_file():
        return snapshots / commit
    if snapshots.is_dir():
        found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
        if found:
            return found[-1]
    return None


def _ref_commit(ref: Path, repo_id: str) -> str | None:
    """The commit a hub-cache ref file names, None if there is none; BadInput for anything but the 40-digit hash
    huggingface_hub writes there, read with a bound (a FIFO, a device or a 4 GiB file is refused, never read)."""
    remedy = f"download the model again (hf download {repo_id}) to rewrite it"
    data = read_regular(ref, MAX_REF_BYTES, remedy)
    if data is None:
        return None
    commit = data.decode("ascii", "replace").strip()
    if not _COMMIT.fullmatch(commit):
        shown = "it is empty" if not commit else f"it holds {commit[:48]!r}"
        raise BadInput(
            f"{ref}: is not a commit hash (40 hexadecimal digits, as huggingface_hub writes): {shown}; {remedy}"
        )
    return commit


def directory_chat_template(directory: Path) -> bool | None:
    """Whether a model directory's tokenizer carries a chat template (tokenizer_config.json's `chat_template`, or
    the chat_template.jinja / chat_template.json files newer transformers save beside it); None when
    tokenizer_config.json cannot be read (the loader says why, with the tokenizer)."""
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    if not (directory / "tokenizer_config.json").is_file():
        return False
    try:
        data = read_json_file(directory / "tokenizer_config.json", "")
    except BadInput:
        return None
    return isinstance(data, dict) and bool(data.get("chat_template"))


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself (a .gguf), or the one .gguf of a folder without config.json;
    None for a folder with config.json or without GGUF files. BadInput for a folder holding several."""
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise BadInput(
            f"{path}: holds {len(found)} GGUF files ({names}) and no config.json; name the one to use "
            f"(e.g. {path / found[0].name})"
        )
    return found[0] if found else None


def resolve_model(name: str, read_gguf: GgufReader | None = None) -> ModelSource:
    """Turn what the user typed into a ModelSource, or BadInput saying what was looked for and where.

    `read_gguf` reads a GGUF's config (measure.gguf.read_gguf, passed in by the api layer); without it a GGUF
    source is refused."""
    if name.lower() in BUILTIN_MODELS:
        text = resources.files("oneke_plan.data").joinpath(BUILTIN_MODELS[name.lower()]).read_text("utf-8")
        return ModelSource(name.lower(), "builtin", None, json.loads(text))
    path = Path(name).expanduser()
    gguf = find_gguf(path)
    if gguf is not None:
        if read_gguf is None:
            raise BadInput(f"{name}: a GGUF file, which only oneke_plan.api's planning and loading read")
        config, chat_template = read_gguf(gguf)
        return ModelSource(name, "gguf", gguf.parent, config, gguf_file=gguf, chat_template=chat_template)
    if path.is_dir():
        config = read_config(path / "config.json")
        return ModelSource(name, "directory", path, config, chat_template=directory_chat_template(path))
    if path.exists():
        raise BadInput(
            f"{name}: is a file, not a GGUF file (.gguf); give the model's directory (the one holding config.json) "
            "or a .gguf file"
        )
    if _REPO_ID.match(name) and not name.startswith(("./", "../")):
        snapshot = find_in_hub_cache(name)
        if snapshot is not None:
            config = read_config(snapshot / "config.json")
            return ModelSource(name, "hub-cache", snapshot, config, chat_template=directory_chat_template(snapshot))
        raise BadInput(
            f"{name}: not a directory and not in the local Hugging Face cache ({_hub_cache_dir()}); "
            f"download it first (hf download {name}; huggingface-cli download {name} before huggingface_hub 1.0) "
            "or give a local directory"
        )
    raise BadInput(
        f"{name}: no such directory or file; give a model directory, a GGUF file or a cached repo id "
        "(or 'oneke' to plan from the built-in config: it has no weights to run)"
    )
