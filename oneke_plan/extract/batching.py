"""Which prompts go together: batches of similar length, groups that share a token prefix, runs to prefill at once.

Plain Python on token ids (no torch): the decoder (generation.py) asks these what to run; they never run anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Encoded:
    """A prompt's token ids (BOS included), and its position in the caller's list."""

    index: int
    ids: list[int]


def length_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Batches of prompts of similar length (longest first, so an out-of-memory shows up at once)."""
    ordered = sorted(encoded, key=lambda e: (-len(e.ids), e.index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


MAX_SPLIT_DEPTH = 64


@dataclass
class PrefixGroup:
    """Prompts that share their first `prefix_length` tokens (0: no shared prefix worth computing apart)."""

    prefix_length: int
    members: list[Encoded] = field(default_factory=list)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(prompts: Sequence[Encoded]) -> list[PrefixGroup]:
    """Group prompts so that computing each group's shared prefix once saves the most prefill tokens.

    Prompts sorted by their ids put those with long common prefixes side by side; a run of them shares the
    smallest common length between neighbours. A run is split where that minimum is (into runs that share more)
    when the parts save more tokens than the whole: a group of n prompts sharing p tokens saves (n - 1) * p. The
    prefix always leaves at least one token of each prompt to prefill. Prompts in no group worth it go in one
    group of prefix 0. Groups come longest prompt first, members longest first.
    """
    order = sorted(prompts, key=lambda e: (e.ids, e.index))
    common = [_common_length(order[i].ids, order[i + 1].ids) for i in range(len(order) - 1)]

    def best(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(tokens saved, [(prefix, lo, hi)]) for order[lo:hi], hi - lo >= 2."""
        low = min(common[lo : hi - 1])
        shared = min(low, min(len(order[i].ids) for i in range(lo, hi)) - 1)
        whole = (hi - lo - 1) * shared
        if depth >= MAX_SPLIT_DEPTH:  # prompts nested in each other hundreds deep: stop refining, never recurse out
            return whole, [(shared, lo, hi)]
        cuts = [i + 1 for i in range(lo, hi - 1) if common[i] == low]
        saved, runs = 0, []
        for start, end in zip([lo, *cuts], [*cuts, hi], strict=True):
            if end - start >= 2:
                part_saved, part_runs = best(start, end, depth + 1)
                saved += part_saved
                runs += part_runs
        if saved > whole:
            return saved, runs
        return whole, [(shared, lo, hi)]

    groups: list[PrefixGroup] = []
    grouped: set[int] = set()
    if len(order) >= 2:
        for shared, lo, hi in best(0, len(order), 0)[1]:
            if shared > 0:
                groups.append(PrefixGroup(shared, list(order[lo:hi])))
                grouped.update(range(lo, hi))
    loose = [order[i] for i in range(len(order)) if i not in grouped]
    if loose:
        groups.append(PrefixGroup(0, loose))
    for group in groups:
        group.members.sort(key=lambda e: (-len(e.ids), e.index))
    groups.sort(key=lambda g: (-len(g.members[0].ids), g.members[0].index))
    return groups


def similar_lengths(take: list[Encoded], length: int, split_tokens: int) -> list[list[Encoded]]:
    """`take` (longest first) cut into runs prefilled together: a row starts a new run when padding it to the
    run's longest rest would cost more than `split_tokens` tokens and more than half its length."""
    runs: list[list[Encoded]] = []
    for item in sorted(take, key=lambda e: -len(e.ids)):
        rest = len(item.ids) - length
        if runs:
            longest = len(runs[-1][0].ids) - length
            if longest - rest <= max(split_tokens, longest // 2):
                runs[-1].append(item)
                continue
        runs.append([item])
    return runs
