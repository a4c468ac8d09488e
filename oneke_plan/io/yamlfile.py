"""Reading the YAML files users hand us (profiles, inventories): plain data only, bounded, one clear line per failure.

yaml.safe_load already refuses tags that would run code, but not the other ways a small file can hurt: a 1.3 KB
"billion laughs" (anchors and aliases nested ten deep) expands to a billion nodes, 20,000 nested brackets exhaust
Python's stack, a 5,000-digit integer raises a plain ValueError, and a "\\ud800" escape makes a string that cannot
be printed or written. Profiles and inventories need none of these, so the loader here refuses each at the line it
occurs: aliases at all, nesting beyond limits.MAX_NESTING, files beyond limits.MAX_YAML_BYTES, integers too long
for Python, and strings that are not valid Unicode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from oneke_plan.core.errors import BadInput
from oneke_plan.io.files import os_error
from oneke_plan.io.jsonfile import read_bounded
from oneke_plan.io.limits import MAX_NESTING, MAX_YAML_BYTES, is_valid_unicode


class _Refused(yaml.MarkedYAMLError):
    """A YAML file that is well-formed but breaks one of our bounds: the message is ours, not a syntax error."""


class DataLoader(yaml.SafeLoader):
    """yaml.SafeLoader, refusing aliases, deep nesting, integers too long for Python and lone surrogates."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Aliases are refused before they are resolved, so a billion laughs costs nothing; the depth is counted
        # here because composing is the one recursive step (the parser keeps an explicit stack).
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(problem="aliases (*name) are not allowed here: write the value out", problem_mark=mark)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _Refused(
                    problem=f"nested deeper than {MAX_NESTING} levels", problem_mark=self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_scalar(self, node: Any) -> Any:
        value = super().construct_scalar(node)
        if isinstance(value, str) and not is_valid_unicode(value):
            raise _Refused(
                problem="a lone surrogate escape (\\ud800-\\udfff without its pair), which is not valid Unicode text",
                problem_mark=node.start_mark,
            )
        return value

    def construct_yaml_int(self, node: Any) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python's bound on integer digits (sys.get_int_max_str_digits)
            raise _Refused(problem="an integer too long for any field", problem_mark=node.start_mark) from None


DataLoader.add_constructor("tag:yaml.org,2002:int", DataLoader.construct_yaml_int)


def loads(text: str) -> Any:
    """The data in YAML `text`, read with DataLoader; raises yaml.YAMLError."""
    loader = DataLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str, remedy: str) -> Any:
    """The data in `path`, read with DataLoader (a file is data: no tag can make code run, no alias expand).

    Failures are BadInput naming the file (and line), `what` it was meant to be, and `remedy`.
    """
    try:
        data = read_bounded(path, MAX_YAML_BYTES, remedy)
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} not found; {remedy}") from None
    except OSError as exc:
        raise os_error(path, "be read", exc, remedy) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: cannot be read as UTF-8 text ({exc.reason}); {remedy}") from None
    try:
        return loads(text)
    except _Refused as exc:
        line = f":{exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        raise BadInput(f"{path}{line}: {exc.problem}; {remedy}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{path}{line}: not valid YAML; {remedy}") from None
