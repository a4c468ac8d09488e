"""Where a model comes from: a local directory, a Hugging Face repo id in the local cache, or the built-in `oneke`.

Planning reads only config.json; nothing here touches the network or runs code from the model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.io.jsonfile import read_json_file

BUILTIN_MODELS = {"oneke": "oneke_config.json"}
ONEKE_REPO_ID = "zjunlp/OneKE"
# Keys that decide the model's tensor shapes, and so the plan: the fingerprint covers these only, so a config saved
# by another transformers version, or with other token ids or generation defaults, still matches its profile.
_STRUCTURAL_KEY = re.compile(
    r"^(architectures|model_type|tie_word_embeddings|head_dim|vocab_size|max_position_embeddings)$"
    r"|_size$|^(n|num)_|layers|heads|experts|embd|inner|positions"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user typed, the directory holding it (None for a built-in), its config dict."""

    name: str
    kind: str  # "builtin", "directory" or "hub-cache"
    directory: Path | None
    config: dict[str, Any]

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


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
"""Where transformers >= 4.43 (json) and >= 4.52 (jinja) save a tokenizer's chat template beside its config."""


def carries_chat_template(source: ModelSource) -> bool:
    """Whether the model's tokenizer carries a chat template: a `chat_template` in tokenizer_config.json or a file
    transformers saves it in. Read from the files alone (planning loads no tokenizer)."""
    if source.directory is None:
        return False
    if any((source.directory / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    path = source.directory / "tokenizer_config.json"
    if not path.is_file():
        return False
    data = read_json_file(path, "the tokenizer files are damaged: copy them again from the model's release")
    return isinstance(data, dict) and bool(data.get("chat_template"))


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` in the local Hugging Face cache (refs/main first), or None."""
    repo_dir = _hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    if snapshots.is_dir():
        found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
        if found:
            return found[-1]
    return None


def resolve_model(name: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, or BadInput saying what was looked for and where."""
    if name.lower() in BUILTIN_MODELS:
        text = resources.files("oneke_plan.data").joinpath(BUILTIN_MODELS[name.lower()]).read_text("utf-8")
        return ModelSource(name.lower(), "builtin", None, json.loads(text))
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name, "directory", path, read_config(path / "config.json"))
    if path.exists():
        raise BadInput(f"{name}: is a file; give the model's directory (the one holding config.json)")
    if _REPO_ID.match(name) and not name.startswith(("./", "../")):
        snapshot = find_in_hub_cache(name)
        if snapshot is not None:
            return ModelSource(name, "hub-cache", snapshot, read_config(snapshot / "config.json"))
        raise BadInput(
            f"{name}: not a directory and not in the local Hugging Face cache ({_hub_cache_dir()}); "
            f"download it first (hf download {name}; huggingface-cli download {name} before huggingface_hub 1.0) "
            "or give a local directory"
        )
    raise BadInput(
        f"{name}: no such directory; give a model directory or a cached repo id "
        "(or 'oneke' to plan from the built-in config: it has no weights to run)"
    )
