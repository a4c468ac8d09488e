"""Common GPUs by name: memory as the driver reports it (bytes) and CUDA compute capability.

Memory is the nominal size in GiB as `nvidia-smi` shows it (a "24 GB" RTX 3090 reports 24576 MiB); the usable
part is smaller by the CUDA context, which the planner counts separately as its runtime reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

from oneke_plan.sizes import GiB


@dataclass(frozen=True)
class CardSpec:
    name: str
    total_bytes: int
    compute_capability: tuple[int, int]


def _card(name: str, gib: float, cc: tuple[int, int]) -> CardSpec:
    return CardSpec(name, int(gib * GiB), cc)


CARDS: tuple[CardSpec, ...] = (
    _card("GTX 1080 Ti", 11, (6, 1)),
    _card("Tesla P40", 24, (6, 1)),
    _card("Tesla P100", 16, (6, 0)),
    _card("Tesla V100 16GB", 16, (7, 0)),
    _card("Tesla V100", 32, (7, 0)),
    _card("Tesla T4", 15, (7, 5)),
    _card("RTX 2080 Ti", 11, (7, 5)),
    _card("TITAN RTX", 24, (7, 5)),
    _card("RTX 3060", 12, (8, 6)),
    _card("RTX 3070", 8, (8, 6)),
    _card("RTX 3080", 10, (8, 6)),
    _card("RTX 3080 12GB", 12, (8, 6)),
    _card("RTX 3080 Ti", 12, (8, 6)),
    _card("RTX 3090", 24, (8, 6)),
    _card("RTX 3090 Ti", 24, (8, 6)),
    _card("RTX A4000", 16, (8, 6)),
    _card("RTX A5000", 24, (8, 6)),
    _card("RTX A6000", 48, (8, 6)),
    _card("A10", 24, (8, 6)),
    _card("A10G", 24, (8, 6)),
    _card("A30", 24, (8, 0)),
    _card("A40", 48, (8, 6)),
    _card("A100 40GB", 40, (8, 0)),
    _card("A100", 80, (8, 0)),
    _card("A800", 80, (8, 0)),
    _card("RTX 4060 Ti", 8, (8, 9)),
    _card("RTX 4060 Ti 16GB", 16, (8, 9)),
    _card("RTX 4070", 12, (8, 9)),
    _card("RTX 4070 Ti", 12, (8, 9)),
    _card("RTX 4080", 16, (8, 9)),
    _card("RTX 4090", 24, (8, 9)),
    _card("RTX 6000 Ada", 48, (8, 9)),
    _card("L4", 24, (8, 9)),
    _card("L40", 48, (8, 9)),
    _card("L40S", 48, (8, 9)),
    _card("RTX 5090", 32, (12, 0)),
    _card("H100", 80, (9, 0)),
    _card("H800", 80, (9, 0)),
    _card("H200", 141, (9, 0)),
)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum()).removeprefix("nvidia").removeprefix("geforce")


_BY_KEY = {_key(card.name): card for card in CARDS}


def find_card(name: str) -> CardSpec | None:
    """The card called `name`, ignoring case, spaces and an 'NVIDIA'/'GeForce' prefix; None if unknown."""
    key = _key(name)
    return _BY_KEY.get(key) or _BY_KEY.get(key.removeprefix("geforce"))


def card_names() -> list[str]:
    return [card.name for card in CARDS]
