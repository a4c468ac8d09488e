"""The package's layers, read from README's module map: each module is on the map, and imports only from its own
group and the groups above it (base, planning, measuring, loading, extraction, api, cli); the planning group, pure
byte arithmetic, imports no torch.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "oneke_plan"


def module_map() -> dict[str, tuple[int, str]]:
    """README's module map (the first code block of "## Development"): module -> (group's place, group's name)."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Development\n", 1)[1]
    block = section.split("```\n", 2)[1]
    found: dict[str, tuple[int, str]] = {}
    place, group = -1, ""
    for line in block.splitlines():
        match = re.match(r"^(\w+)?\s+([\w/]+)\s{2,}\S", line)
        assert match, f"README module map: cannot read {line!r}"
        if match.group(1):
            place, group = place + 1, match.group(1)
        found[match.group(2).rstrip("/")] = (place, group)
    return found


def package_modules() -> dict[str, Path]:
    """Every module of oneke_plan by dotted name (a package by its own name), but the package itself."""
    names = {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}  # fmt: skip
    names.pop("__init__")
    return names


def imported(path: Path) -> set[str]:
    """The oneke_plan modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oneke_plan"):
            module = node.module.removeprefix("oneke_plan").lstrip(".")
            found |= {module} if module else {a.name for a in node.names if a.name != "__version__"}
    return found


def group_of(module: str, groups: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The map's line for a module, or for the package holding it (`cli/` holds cli.run)."""
    return groups.get(module) or groups.get(module.split(".")[0])


def test_every_module_is_on_the_map_and_imports_go_one_way() -> None:
    groups = module_map()
    modules = package_modules()
    missing = sorted(m for m in modules if group_of(m, groups) is None)
    assert not missing, f"README's module map lacks {missing}"
    assert not sorted(set(groups) - {m.split(".")[0] for m in modules}), "README's module map lists modules gone"
    upward = []
    for module, path in sorted(modules.items()):
        mine = group_of(module, groups)
        for target in imported(path):
            theirs = group_of(target, groups)
            if mine is not None and theirs is not None and theirs[0] > mine[0]:
                upward.append(f"{module} ({mine[1]}) imports {target} ({theirs[1]})")
    assert not upward


def test_planning_imports_no_torch() -> None:
    planning = sorted(m for m, (_, group) in module_map().items() if group == "planning")
    assert {"memory", "fit", "blocks"} <= set(planning)
    code = f"import sys; import {', '.join('oneke_plan.' + m for m in planning)}; "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
