"""The doc parts that show what the code prints (tools/gen_docs.py: `--help` texts, plan tables, the fit log) are
what it prints now. A failure means the code's output changed: if the change is intended, run `make docs`
(python tools/gen_docs.py) and commit the files it rewrites."""

from __future__ import annotations

import re

import gen_docs
import pytest

FIX = "run `make docs` (python tools/gen_docs.py) and commit the result"


@pytest.mark.parametrize("part", gen_docs.PARTS, ids=[f"{p.file}:{p.name}" for p in gen_docs.PARTS])
def test_generated_doc_part_has_not_drifted(part: gen_docs.Part) -> None:
    env, body = gen_docs.recorded((gen_docs.ROOT / part.file).read_text(encoding="utf-8"), part.name)
    if env != part.env():
        pytest.skip(f"{part.file}: {part.name} was generated with {env}; this is {part.env()}")
    assert body == part.render(), f"{part.file}: {part.name} differs from what the code prints now; {FIX}"


def test_every_generated_marker_in_the_docs_has_a_part() -> None:
    """A marker left behind (a part renamed or removed) would never be checked again."""
    known = {(p.file, p.name) for p in gen_docs.PARTS}
    for path in [gen_docs.ROOT / "README.md", *gen_docs.ROOT.glob("docs/*.md"), *gen_docs.ROOT.glob("*/README.md")]:
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"<!-- generated: ([^;]+);", text):
            assert (str(path.relative_to(gen_docs.ROOT)), name) in known, (path, name)


def test_a_changed_part_is_reported_and_rewritten() -> None:
    """The check can fail: a stale copy of a part is found, and rewriting it gives the rendered text back."""
    part = next(p for p in gen_docs.PARTS if p.name == "profiles-table")
    text = (gen_docs.ROOT / part.file).read_text(encoding="utf-8")
    env, body = gen_docs.recorded(text, part.name)
    stale = gen_docs.with_part(text, part.name, env, body.replace("/ 24", "/ 23", 1))
    assert gen_docs.recorded(stale, part.name)[1] != part.render()
    assert gen_docs.recorded(gen_docs.with_part(stale, part.name, env, part.render()), part.name)[1] == part.render()
    with pytest.raises(ValueError, match="marker lines are missing"):
        gen_docs.recorded(text.replace(f"<!-- end generated: {part.name} -->", ""), part.name)

