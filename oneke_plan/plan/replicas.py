"""Splitting a machine's GPUs into groups that each hold a whole copy of the model (replicas).

Pure search over GPU indexes: whether a group of GPUs holds a copy is a callback (the planner plans the model on
those GPUs alone), memoized by the group's cards (two groups of the same cards fit alike). The goal is the most
replicas. Up to EXHAUSTIVE_LIMIT GPUs every way of splitting them is tried; beyond, a bin-covering heuristic:
each new group starts from the largest card left and takes the smallest cards that complete it, so big cards are
not spent together where one of them and a few small ones would do. `replica_groups` runs that search for one
workload, planning each group with the planning function it is given (solve.py's PlanFn).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from oneke_plan.plan.inventory import Inventory
from oneke_plan.plan.plans import PlanSettings
from oneke_plan.plan.solve import PlanFn, bisect_largest

EXHAUSTIVE_LIMIT = 8  # Bell(8) = 4,140 splits; the test suite checks the heuristic against it up to 6 cards
MAX_CPU_COPIES = 64  # the most copies "auto" tries on a machine without GPUs


def set_partitions(items: Sequence[int]) -> Iterator[list[list[int]]]:
    """Every way of splitting `items` into non-empty groups (each once)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


class GroupFits:
    """fits(group of GPU indexes) -> bool, memoized by the group's card key (e.g. memory and capability)."""

    def __init__(self, fits: Callable[[tuple[int, ...]], bool], card_key: Callable[[int], tuple[Any, ...]]):
        self._fits = fits
        self._key = card_key
        self._known: dict[tuple[Any, ...], bool] = {}

    def __call__(self, group: Sequence[int]) -> bool:
        key = tuple(sorted(self._key(i) for i in group))
        if key not in self._known:
            self._known[key] = self._fits(tuple(sorted(group)))
        return self._known[key]


def most_replicas(gpus: Sequence[int], fits: GroupFits, size: Callable[[int], int]) -> list[list[int]]:
    """Groups of `gpus` that each fit, as many as can be found (exhaustive up to EXHAUSTIVE_LIMIT GPUs), each in
    index order, groups in order of their first GPU; GPUs left over are in no group."""
    if len(gpus) <= EXHAUSTIVE_LIMIT:
        return exhaustive(gpus, fits)
    return covering(gpus, fits, size)


def exhaustive(gpus: Sequence[int], fits: GroupFits) -> list[list[int]]:
    """The split with the most fitting groups (ties: the one using fewer GPUs, then the first found)."""
    best: list[list[int]] = []
    best_used = 0
    for partition in set_partitions(list(gpus)):
        groups = [g for g in partition if fits(g)]
        used = sum(len(g) for g in groups)
        if len(groups) > len(best) or (len(groups) == len(best) and groups and used < best_used):
            best, best_used = groups, used
    return sorted((sorted(g) for g in best), key=lambda g: g[0])


def covering(gpus: Sequence[int], fits: GroupFits, size: Callable[[int], int]) -> list[list[int]]:
    """Bin covering: each group starts from the largest GPU left; while it does not fit, the smallest GPU left
    joins it (then the next smallest...). Smallest-first completion keeps large cards for groups of their own."""
    left = sorted(gpus, key=lambda i: (-size(i), i))
    groups: list[list[int]] = []
    while left:
        group = [left.pop(0)]
        while not fits(group) and left:
            group.append(left.pop())  # the smallest left
        if not fits(group):
            break
        groups.append(sorted(group))
    return sorted(groups, key=lambda g: g[0])


def split_into(gpus: Sequence[int], count: int, fits: GroupFits, size: Callable[[int], int]) -> list[list[int]] | None:
    """`count` fitting groups that together use every GPU (leftover GPUs join the groups, largest first, each to
    the group with the least memory), or None if fewer than `count` fit."""
    groups = most_replicas(gpus, fits, size)
    if len(groups) < count:
        return None
    # More groups than asked for: merge the smallest groups into others (more room per replica).
    while len(groups) > count:
        groups.sort(key=lambda g: sum(size(i) for i in g))
        smallest = groups.pop(0)
        groups[0] = sorted(groups[0] + smallest)
    used = {i for g in groups for i in g}
    for gpu in sorted((i for i in gpus if i not in used), key=lambda i: -size(i)):
        poorest = min(groups, key=lambda g: sum(size(i) for i in g))
        poorest.append(gpu)
        poorest.sort()
    return sorted(groups, key=lambda g: g[0])


def replica_inventory(inventory: Inventory, group: Sequence[int], copies: int = 1) -> Inventory:
    """The machine as one replica sees it: its GPUs (their indexes kept), no offload; without GPUs, its share
    of the CPU memory."""
    gpus = tuple(g for g in inventory.gpus if g.index in group)
    cpu = 0 if gpus else inventory.cpu_bytes // copies
    return replace(inventory, gpus=gpus, cpu_bytes=cpu, offload_dir=None, disk_bytes=None)


def replica_groups(plan: PlanFn, inventory: Inventory, settings: PlanSettings, count: int | str) -> list[list[int]]:
    """GPU groups that each hold a whole copy for the workload: `count` of them using every GPU, or with
    "auto" as many as can be found (exhaustive up to EXHAUSTIVE_LIMIT GPUs). [] if not even one; [[]] * count for
    a machine without GPUs, whose CPU memory the copies share evenly."""
    if not inventory.gpus:

        def copies_fit(copies: int) -> bool:
            return plan(replica_inventory(inventory, [], copies), settings).fits

        copies = bisect_largest(copies_fit, MAX_CPU_COPIES) if count == "auto" else int(count) * copies_fit(int(count))
        return [[] for _ in range(copies)]
    by_index = {g.index: g for g in inventory.gpus}
    fits = GroupFits(
        lambda group: plan(replica_inventory(inventory, group), settings).fits,
        lambda i: (by_index[i].free_bytes, str(by_index[i].reserve_bytes), by_index[i].compute_capability),
    )
    indexes = [g.index for g in inventory.gpus]
    size = lambda i: by_index[i].free_bytes  # noqa: E731
    if count == "auto":
        return most_replicas(indexes, fits, size)
    return split_into(indexes, int(count), fits, size) or []
