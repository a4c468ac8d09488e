"""The package's layers: pyproject's import-linter contracts cover the whole tree, and what they promise holds.

`lint-imports` (make lint) checks the imports against the contracts; these tests check what it cannot: that every
module lives in a layer the contract names (a new folder outside every layer would go unchecked), and that the
layers below measuring load no torch when imported (the contract reads source; this imports it for real).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "oneke_plan"


def contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_every_module_is_in_a_layer_of_the_contract() -> None:
    layers = [str(name).removeprefix("oneke_plan.") for name in contracts()["layers"]["layers"]]  # type: ignore[attr-defined]
    outside = sorted(
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "__init__.py" and path.relative_to(PACKAGE).parts[0] not in layers
    )
    assert not outside, f"modules in no layer of pyproject's import-linter contract: {outside}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(layers) == folders


def test_the_root_package_holds_only_the_version() -> None:
    # Everything else lives in a layer, so nothing can import "up" through oneke_plan/__init__.py.
    assert (PACKAGE / "__init__.py").read_text(encoding="utf-8").count("\n") <= 3
    assert "import" not in (PACKAGE / "__init__.py").read_text(encoding="utf-8")


def test_the_pure_layers_import_no_torch() -> None:
    pure = contracts()["pure"]
    sources = [str(s) for s in pure["source_modules"]]  # type: ignore[attr-defined]
    assert {"oneke_plan.plan", "oneke_plan.io", "oneke_plan.core"} <= set(sources)
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for source in sources
        for path in (ROOT / source.replace(".", "/")).rglob("*.py")
    )
    assert "oneke_plan.plan.memory" in modules and "oneke_plan.plan.fit" in modules
    forbidden = [str(m) for m in pure["forbidden_modules"]]  # type: ignore[attr-defined]
    code = f"import sys; import {', '.join(modules)}; "
    code += f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_tests_mirror_the_layers() -> None:
    layers = {str(name).removeprefix("oneke_plan.") for name in contracts()["layers"]["layers"]}  # type: ignore[attr-defined]
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders - layers == {"project"}  # the repository's own checks: docs, profiles, benchmarks, this file
    assert not list((ROOT / "tests").glob("test_*.py")), "a test module outside every layer's folder"
