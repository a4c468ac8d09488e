"""Reading the YAML files users hand us (profiles, inventories): safe_load only, one clear line per failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from oneke_plan.errors import BadInput


def read_yaml(path: Path, what: str, remedy: str) -> Any:
    """The data in `path`, read with yaml.safe_load (a file is data: no tag can make code run).

    Failures are BadInput naming the file (and line), `what` it was meant to be, and `remedy`.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} not found; {remedy}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{path}{line}: not valid YAML; {remedy}") from None
