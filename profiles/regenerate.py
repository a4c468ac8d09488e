"""Regenerate every checked-in OneKE profile in this folder: `python profiles/regenerate.py`.

Each entry is (file name, oneke-plan arguments). GPUs are described by size only (no catalog lookup) and
`--cpu-memory 0` keeps the profiles independent of the RAM of the machine that regenerates them.
tests/project/test_profiles.py re-plans each entry and fails if a checked-in file drifts from what the tool writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROFILES: list[tuple[str, list[str]]] = [
    (
        "oneke-24gib+12gib-bf16.yaml",
        ["oneke", "--gpu", "24GiB", "--gpu", "12GiB", "--cpu-memory", "0"],
    ),
    (
        "oneke-2x24gib-bf16.yaml",
        ["oneke", "--gpu", "24GiB", "--gpu", "24GiB", "--cpu-memory", "0", "--batch-size", "8"],
    ),
    (
        "oneke-16gib-8bit.yaml",
        ["oneke", "--gpu", "16GiB", "--cpu-memory", "0", "--quantize", "8bit", "--batch-size", "1"],
    ),
    (
        "oneke-12gib-4bit.yaml",
        ["oneke", "--gpu", "12GiB", "--cpu-memory", "0", "--quantize", "4bit", "--batch-size", "2"],
    ),
    (
        "oneke-24gib+12gib+8gib-bf16.yaml",
        [
            "oneke",
            "--gpu", "24GiB",
            "--gpu", "12GiB",
            "--gpu", "8GiB",
            "--cpu-memory", "0",
            "--max-input-tokens", "1024",
            "--batch-size", "8",
        ],
    ),
]  # fmt: skip


DOC = HERE.parent / "docs" / "profile-format.md"
DOC_EXAMPLE = "oneke-12gib-4bit.yaml"  # the profile docs/profile-format.md shows under "## Example"


def regenerate(folder: Path = HERE) -> int:
    """Write every profile into `folder`; return 0, or the first non-zero exit code of oneke-plan."""
    from oneke_plan.cli.plan import main

    for name, args in PROFILES:
        code = main([*args, "-o", str(folder / name)])
        if code != 0:
            print(f"regenerate: {name}: oneke-plan exited with {code}", file=sys.stderr)
            return code
    return 0


def doc_with_example(doc: str, profile: str) -> str:
    """docs/profile-format.md with its example replaced by `profile` (the YAML block after "## Example")."""
    start = doc.index("```yaml\n", doc.index("## Example")) + len("```yaml\n")
    return doc[:start] + profile + doc[doc.index("```", start) :]


if __name__ == "__main__":
    code = regenerate()
    if code == 0:
        DOC.write_text(doc_with_example(DOC.read_text(encoding="utf-8"), (HERE / DOC_EXAMPLE).read_text("utf-8")))
    sys.exit(code)
