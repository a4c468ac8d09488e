"""Long Chinese texts for --split-long's tests and benchmark: DeepKE's own inputs joined (real text), and random text
of a given length with sentence and line ends where a seed puts them. A development tool, not part of the package.

Sentences end with 。！？； and both kinds of text are cut after a sentence end, as oneke-run cuts windows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "deepke"
FILLER = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"


def deepke_text(chars: int, samples: bool = True) -> str:
    """The inputs of DeepKE's test files (examples/deepke/*/test.json, every task, in file order), then with
    `samples` the texts of their sample.json files, joined and cut after the first sentence end past `chars`
    characters (all of it when there is none): some 22,000 characters in all."""
    text = ""
    for path in sorted(EXAMPLES.glob("*/test.json")):
        for line in path.read_text(encoding="utf-8").splitlines():
            text += json.loads(json.loads(line)["instruction"])["input"]
    for path in sorted(EXAMPLES.glob("*/sample.json")) if samples else []:
        text += "".join(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines())
    end = next((k + 1 for k, c in enumerate(text) if k + 1 >= chars and c in "。！？；"), len(text))
    return text[:end]


def chinese_text(chars: int, seed: int = 0, sentence: tuple[int, int] = (8, 40), newlines: float = 0.1) -> str:
    """At least `chars` characters of random Chinese: sentences of `sentence` characters (bounds included) ending
    with one of 。！？；, a line end after a `newlines` share of them."""
    rng = random.Random(seed)
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        parts.append("".join(rng.choice(FILLER) for _ in range(rng.randint(*sentence))) + rng.choice("。！？；"))
        if rng.random() < newlines:
            parts.append("\n")
    return "".join(parts)
