"""Regenerate the parts of the docs that show what the code prints: `make docs` (or `python tools/gen_docs.py`).

Each generated part sits between two marker lines in its Markdown file:

    <!-- generated: NAME; ENVIRONMENT; make docs rewrites this -->
    ...
    <!-- end generated: NAME -->

ENVIRONMENT says what the text depends on besides this repository: the Python version for `--help` texts (argparse
lays them out differently across versions), the transformers major version for planned numbers (profiles/ are
written with transformers 5, see tests/project/test_profiles.py). tests/project/test_docs.py renders every part
again and fails when a file differs, where the environment is the one recorded; `python tools/gen_docs.py --check`
does the same and lists the parts that drifted. The profile example in docs/profile-format.md is rewritten by
`python profiles/regenerate.py` (`make profiles`, which `make docs` runs first).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELP_COLUMNS = 100  # the terminal width the --help texts are laid out for
GiB = 2**30


def python_env() -> str:
    return f"Python {sys.version_info.major}.{sys.version_info.minor}"


def transformers_env() -> str:
    import transformers

    return f"transformers {transformers.__version__.split('.')[0]}"


@dataclass(frozen=True)
class Part:
    """A generated part: `name` in `file`, rendered by `render`, valid in the environment `env()` returns."""

    file: str
    name: str
    render: Callable[[], str]
    env: Callable[[], str]


# -- what the commands print ---------------------------------------------------------------------------------------
def help_text(module: str) -> str:
    """`--help` of a command, laid out for a HELP_COLUMNS-wide terminal."""
    import importlib

    parser = importlib.import_module(f"oneke_plan.cli.{module}").build_parser()
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # argparse reads the width from the terminal, or from COLUMNS
    try:
        return parser.format_help()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def plan_stderr(*argv: str) -> str:
    """What `oneke-plan ARGV` prints on stderr (its messages and tables; the profile goes to stdout or -o FILE), with
    the temporary folder -o writes into shown as the current one. bitsandbytes' warning about optional CPU kernels
    is left out: it depends on the host's CPU, not on oneke-plan."""
    from oneke_plan.cli.plan import main

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        args = [a.replace("OUT/", f"{folder}/") for a in argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(args)
        return err.getvalue().replace(f"{folder}/", "").strip("\n") + "\n"


def command_block(command: str, text: str) -> str:
    return f"```\n$ {command}\n{text}```\n"


def fenced(text: str) -> str:
    return f"```\n{text}```\n"


HEADLINE = ["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0"]


def summary() -> str:
    """The per-GPU table `oneke-plan` prints for the README's headline machine."""
    return fenced(plan_stderr(*HEADLINE))


def fit_log() -> str:
    argv = [*HEADLINE, "-v", "-o", "OUT/my-machine.yaml"]
    return command_block("oneke-plan " + " ".join(argv).replace("OUT/", ""), plan_stderr(*argv))


def does_not_fit() -> str:
    argv = ["oneke", "--gpu", "10GiB", "--gpu", "6GiB", "--cpu-memory", "0"]
    return command_block("oneke-plan " + " ".join(argv), plan_stderr(*argv))


def cli_help(module: str) -> Callable[[], str]:
    return lambda: command_block(f"oneke-{module} --help", help_text(module))


# -- profiles/README.md's table ------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GiB:g} GiB"


def profiles_table() -> str:
    """One row per checked-in profile (profiles/regenerate.py's list, in its order), read from the files."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("profiles_regenerate", ROOT / "profiles" / "regenerate.py")
    assert spec is not None and spec.loader is not None
    regenerate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regenerate)
    rows = [
        "| file | GPUs | dtype / quantization | workload (batch x (input + new) tokens) | planned use per GPU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, _ in regenerate.PROFILES:
        data = yaml.safe_load((ROOT / "profiles" / name).read_text(encoding="utf-8"))
        gpus = [d for d in data["devices"] if isinstance(d["id"], int)]
        sizes = [d["total_bytes"] for d in gpus]
        machine = f"{len(sizes)} x {_gib(sizes[0])}" if len(sizes) > 1 and len(set(sizes)) == 1 else " + ".join(
            _gib(s) for s in sizes
        )
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[data["dtype"]]
        quant = data["quantization"]
        if quant["mode"] == "8bit":
            dtype += " compute, bitsandbytes 8-bit"
        elif quant["mode"] == "4bit":
            double = "double quant" if quant["double_quant"] else "no double quant"
            dtype += f" compute, bitsandbytes 4-bit {quant['quant_type']}, {double}"
        w = data["workload"]
        workload = f"{w['batch_size']} x ({w['max_input_tokens']} + {w['max_new_tokens']})"
        planned = [data["estimate"][d["id"]]["total_bytes"] for d in gpus]
        use = ", ".join(f"{used / GiB:.2f} / {size / GiB:g}" for used, size in zip(planned, sizes, strict=True))
        rows.append(f"| `{name}` | {machine} | {dtype} | {workload} | {use} GiB |")
    return "\n".join(rows) + "\n"


# -- README's module map --------------------------------------------------------------------------------------------
MAP_WIDTH = 118  # the map's lines are wrapped to this width, continuation lines under the module's description
MAP_INDENT = 18  # where descriptions start: two spaces, the module's name, padding


def layers() -> list[str]:
    """oneke_plan's layers, bottom first: pyproject's import-linter `layers` contract lists them top first."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c.get("id") == "layers"]
    return [name.removeprefix("oneke_plan.") for name in reversed(contract["layers"])]


def summary_sentence(path: Path) -> str:
    """The first sentence of a module's docstring (its first paragraph when no sentence ends in it)."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?[.?!])(?=\s|$)", paragraph)
    return match.group(1) if match else paragraph


def _imports_within(path: Path, package: str) -> set[str]:
    """The modules of oneke_plan.`package` that the module at `path` imports (by their names inside it)."""
    import ast

    found = set()
    prefix = f"oneke_plan.{package}"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == prefix:
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix + "."):
            found.add(node.module.removeprefix(prefix + ".").split(".")[0])
    return found


def reading_order(folder: Path) -> list[Path]:
    """A layer's modules, each after those of its layer it imports (ties alphabetical): the order to read them in."""
    import graphlib

    modules = {path.stem: path for path in sorted(folder.glob("*.py")) if path.name != "__init__.py"}
    sorter = graphlib.TopologicalSorter(
        {name: sorted(_imports_within(path, folder.name) & set(modules) - {name}) for name, path in modules.items()}
    )
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        order += ready
        sorter.done(*ready)
    return [modules[name] for name in order]


def _map_rows(name: str, text: str) -> list[str]:
    import textwrap

    lines = textwrap.wrap(text, MAP_WIDTH - MAP_INDENT, break_on_hyphens=False) or [""]
    head = f"{name:<{MAP_INDENT - 2}}  " if len(name) <= MAP_INDENT - 2 else f"{name}\n{'':<{MAP_INDENT}}"
    return [head + lines[0]] + [" " * MAP_INDENT + line for line in lines[1:]]


def module_map() -> str:
    """oneke_plan/ layer by layer, bottom first: each package's summary sentence, then each module's."""
    rows = []
    for layer in layers():
        folder = ROOT / "oneke_plan" / layer
        rows += _map_rows(f"{layer}/", summary_sentence(folder / "__init__.py"))
        for path in reading_order(folder):
            rows += _map_rows(f"  {path.stem}", summary_sentence(path))
    return fenced("\n".join(rows) + "\n")


PARTS = [
    Part("README.md", "module-map", module_map, lambda: "oneke_plan/"),
    Part("README.md", "oneke-plan-summary", summary, transformers_env),
    Part("docs/memory-model.md", "oneke-plan-summary", summary, transformers_env),
    Part("profiles/README.md", "profiles-table", profiles_table, lambda: "profiles/"),
    Part("docs/cli.md", "oneke-plan-help", cli_help("plan"), python_env),
    Part("docs/cli.md", "oneke-run-help", cli_help("run"), python_env),
    Part("docs/cli.md", "oneke-score-help", cli_help("score"), python_env),
    Part("docs/cli.md", "fit-log", fit_log, transformers_env),
    Part("docs/cli.md", "does-not-fit", does_not_fit, transformers_env),
]


# -- markers -------------------------------------------------------------------------------------------------------
def _span(text: str, name: str) -> re.Match[str]:
    pattern = rf"<!-- generated: {re.escape(name)}; (?P<env>[^;]*); make docs rewrites this -->\n(?P<body>.*?)"
    pattern += rf"<!-- end generated: {re.escape(name)} -->"
    match = re.search(pattern, text, re.S)
    if match is None:
        raise ValueError(f"no generated part {name!r} (its two marker lines are missing)")
    return match


def recorded(text: str, name: str) -> tuple[str, str]:
    """(environment, body) of the part `name` as the file has it."""
    match = _span(text, name)
    return match["env"], match["body"]


def with_part(text: str, name: str, env: str, body: str) -> str:
    """`text` with the part `name` replaced by `body`, generated in `env`."""
    match = _span(text, name)
    head = f"<!-- generated: {name}; {env}; make docs rewrites this -->\n"
    return text[: match.start()] + head + body + f"<!-- end generated: {name} -->" + text[match.end() :]


def drifted(parts: list[Part] = PARTS) -> list[str]:
    """'FILE: NAME' for each part whose text differs from what the code prints now, in the recorded environment
    (parts recorded in another environment are not compared)."""
    out = []
    for part in parts:
        env, body = recorded((ROOT / part.file).read_text(encoding="utf-8"), part.name)
        if env == part.env() and body != part.render():
            out.append(f"{part.file}: {part.name}")
    return out


def write(parts: list[Part] = PARTS) -> list[str]:
    """Rewrite every part; return 'FILE: NAME' for those that changed."""
    changed = []
    for part in parts:
        path = ROOT / part.file
        text = path.read_text(encoding="utf-8")
        new = with_part(text, part.name, part.env(), part.render())
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(f"{part.file}: {part.name}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/gen_docs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list the parts that drifted (exit 1 if any)")
    args = parser.parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if args.check:
        stale = drifted()
        for line in stale:
            print(f"drifted: {line}", file=sys.stderr)
        if stale:
            print("run `make docs` (python tools/gen_docs.py) and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for line in write():
        print(f"rewrote {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
