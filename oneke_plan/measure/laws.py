"""Laws: the bytes of any batch and length, as exact integer polynomials fitted through a few measured forwards.

Pure arithmetic on the numbers measure_step returns (no torch): measurer.py fits them and checks them against the
whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from typing import Any


def _monomials(batch: int, tokens: int) -> tuple[int, ...]:
    """The terms a tensor's size can have in a transformer's forward: constant, T, T^2, B, B*T, B*T^2 (T: the
    prompt's length for a prefill, the cache's for a decode step). A law of one batch size has the first three."""
    return (1, tokens, tokens * tokens, batch, batch * tokens, batch * tokens * tokens)


def _inverse(rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], int] | None:
    """(A, d) with A / d the inverse of the square integer matrix `rows`: exact, so that fitting many value vectors
    at the same shapes is integer dot products. None if singular."""
    n = len(rows)
    matrix = [[Fraction(v) for v in row] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(rows)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if matrix[r][col] != 0), None)
        if pivot is None:
            return None
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        head = matrix[col][col]
        matrix[col] = [v / head for v in matrix[col]]
        for r in range(n):
            if r != col and matrix[r][col] != 0:
                factor = matrix[r][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[col], strict=True)]
    inverse = [row[n:] for row in matrix]
    denominator = 1
    for row in inverse:
        for v in row:
            denominator = denominator * v.denominator // gcd(denominator, v.denominator)
    return [[int(v * denominator) for v in row] for row in inverse], denominator


@dataclass(frozen=True)
class Law:
    """bytes(B, T) = the most of a few polynomials c . (1, T, T^2, B, B*T, B*T^2) / denominator, exact integers.

    Every tensor a transformer's forward allocates has such a size (a product of batch, length and model sizes),
    so the live bytes at each op are such a polynomial, and a block's peak is the most of them: the polynomials of
    the block's ops (those no other one exceeds term by term), fitted through the same six shapes. A law for one
    batch size (a single prompt runs another code path: nothing is padded, so SDPA gets no attention mask) is
    c . (1, T, T^2), fitted through three lengths at that batch, and holds at that batch only."""

    terms: tuple[tuple[int, ...], ...]
    denominator: int

    def __call__(self, batch: int, tokens: int) -> int:
        monomials = _monomials(batch, tokens)
        best = max(sum(c * m for c, m in zip(term, monomials[: len(term)], strict=True)) for term in self.terms)
        return -((-best) // self.denominator)  # ceil: never below the fitted bytes

    @staticmethod
    def fit(
        shapes: Sequence[tuple[int, int]], series: Sequence[Sequence[int]], ops: Sequence[Sequence[Any]] | None = None
    ) -> Law:
        """Through `shapes` (six (batch, tokens), or three lengths of one batch): `series[k]` holds the values at
        shape k, one per op (`ops[k]`). Ops are lined up across the shapes (a shape may run an op the others do
        not); where the peaks are not at ops they share, the law is one polynomial through the peaks, which the
        whole-model check then confirms or refuses. ValueError if the shapes do not determine the polynomials."""
        one_batch = len(shapes) == 3 and len({b for b, _ in shapes}) == 1
        inverse = (
            _inverse([_monomials(b, t)[: len(shapes)] for b, t in shapes]) if one_batch or len(shapes) == 6 else None
        )
        if inverse is None:
            raise ValueError("the shapes do not determine a polynomial")
        columns = _line_up(series, ops) if ops is not None else list(zip(*series, strict=True))
        if not columns or any(max(c[k] for c in columns) != max(values) for k, values in enumerate(series)):
            columns = [tuple(max(values) for values in series)]
        matrix, denominator = inverse
        terms = {tuple(sum(a * v for a, v in zip(row, values, strict=True)) for row in matrix) for values in columns}
        kept = [t for t in terms if not any(o != t and all(x >= y for x, y in zip(o, t, strict=True)) for o in terms)]
        return Law(tuple(sorted(kept)), denominator)


def _line_up(series: Sequence[Sequence[int]], ops: Sequence[Sequence[Any]]) -> list[tuple[int, ...]]:
    """The values of the ops every shape ran, lined up by op (difflib on the op sequences), one tuple per op."""
    import difflib

    if all(len(o) == len(ops[0]) and list(o) == list(ops[0]) for o in ops):
        return list(zip(*series, strict=True))
    positions: list[list[int]] = [list(range(len(ops[0])))]
    for k in range(1, len(ops)):
        matcher = difflib.SequenceMatcher(None, list(ops[0]), list(ops[k]), autojunk=False)
        mapping = {a + i: b + i for a, b, size in matcher.get_matching_blocks() for i in range(size)}
        positions.append([mapping.get(i, -1) for i in range(len(ops[0]))])
    return [
        tuple(series[k][positions[k][i]] for k in range(len(series)))
        for i in range(len(ops[0]))
        if all(positions[k][i] >= 0 for k in range(len(series)))
    ]


@dataclass(frozen=True)
class BlockLaws:
    """One block's bytes for any workload: state and transient peak after (or during) the prefill, in the batch
    and prompt length, and at a decode step, in the batch and the cache's length."""

    prefill_state: Law
    prefill_peak: Law
    decode_state: Law
    decode_peak: Law
