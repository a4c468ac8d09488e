"""How hard the code is to change, in figures: the longest functions, the API's parameter counts, and what oneke-run
does before the first weight loads (the oneke_plan modules it imports and runs, and the checks it runs twice).

A development tool (issue 29 measured its before/after with it), not part of the installed package:

    python tools/code_metrics.py            # a tiny checkpoint in a temp dir, planned, then run once under a tracer

"Before the first weight loads" ends at the first call of transformers' PreTrainedModel.from_pretrained, the call
that reads the checkpoint's tensors. A check is a function of oneke_plan whose name says it checks, refuses, detects
or reads (check_*, refuse*, detect_*, read_*, *_settings, load_tokenizer); a real run calls each of them once.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oneke_plan"
CHECK_NAME = re.compile(r"^(_?check|_?refuse|detect_|read_|.*_settings$|load_tokenizer$|.*preflight)")


def longest_functions(count: int = 12) -> list[tuple[int, str]]:
    """(lines, module:function) of the package's longest functions and methods, longest first."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{module}:{node.name}"))  # type: ignore[operator]
    return sorted(found, reverse=True)[:count]


def parameter_counts() -> dict[str, int]:
    from oneke_plan import api

    return {
        name: len([p for p in inspect.signature(getattr(api, name)).parameters.values() if p.kind != p.VAR_KEYWORD])
        for name in ("plan", "run", "load", "extract", "read_records")
    }


class BeforeFirstWeight:
    """A sys.setprofile hook: the oneke_plan functions called until PreTrainedModel.from_pretrained starts
    (`calls`), and over the whole run (`all_calls`)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.all_calls: Counter[tuple[str, str]] = Counter()
        self.modules_at_load: set[str] | None = None

    def __call__(self, frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if module == "transformers.modeling_utils" and name == "from_pretrained" and self.modules_at_load is None:
            self.modules_at_load = {m for m in sys.modules if m.startswith("oneke_plan.")}
        elif module.startswith("oneke_plan.") and name != "<module>":
            self.all_calls[(module, name)] += 1
            if self.modules_at_load is None:
                self.calls[(module, name)] += 1


def trace_run(workdir: Path) -> BeforeFirstWeight:
    """Build a tiny checkpoint, plan it (a subprocess), then run oneke-run in this process under the tracer."""
    model, profile = workdir / "model", workdir / "profile.yaml"
    records, output = workdir / "in.jsonl", workdir / "out.jsonl"
    python = sys.executable
    subprocess.run([python, str(ROOT / "tools" / "tiny_checkpoint.py"), str(model)], check=True, capture_output=True)
    subprocess.run(
        [python, "-m", "oneke_plan.cli.plan", str(model), "--max-new-tokens", "4", "-o", str(profile)],
        check=True,
        capture_output=True,
    )
    records.write_text('{"id": "1", "text": "张三在北京工作。"}\n', encoding="utf-8")
    from oneke_plan.cli.run import main

    tracer = BeforeFirstWeight()
    sys.setprofile(tracer)
    try:
        code = main(
            ["--profile", str(profile), "--input", str(records), "--output", str(output), "--no-progress"]
            + ["--task", "NER", "--schema", '["人物"]']
        )
    finally:
        sys.setprofile(None)
    if code != 0 or tracer.modules_at_load is None:
        raise SystemExit(f"the traced run failed (exit {code}) or loaded no weight")
    return tracer


def main() -> int:
    total = sum(1 for _ in PACKAGE.rglob("*.py") if _.name != "__init__.py")
    print(f"modules in oneke_plan (without __init__): {total}")
    print("longest functions (lines):")
    for lines, name in longest_functions():
        print(f"  {lines:4d}  {name}")
    print(f"API parameters (without **kwargs): {parameter_counts()}")
    with tempfile.TemporaryDirectory() as tmp:
        tracer = trace_run(Path(tmp))
    loaded = tracer.modules_at_load or set()
    ran = {module for module, _ in tracer.calls}
    modules = [m for m in loaded if not str(getattr(sys.modules[m], "__file__", "")).endswith("__init__.py")]
    print(f"oneke-run before the first weight loads: {len(modules)} modules imported, {len(ran)} with a function run")
    # the profile's generic field reader runs once per field: a validator, not a check of the run
    checks = {k: n for k, n in tracer.all_calls.items() if CHECK_NAME.match(k[1]) and k[0] != "oneke_plan.core.records"}
    print(f"checks in the whole run: {len(checks)}; more than once (per-line input checks repeat by design):")
    for (module, name), n in sorted(checks.items()):
        if n > 1:
            print(f"    {n}x {module}:{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
