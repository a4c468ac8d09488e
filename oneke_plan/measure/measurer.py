"""The Measurer: the measured memory of one model, per block, for any workload, from a handful of forwards.

It fits laws (laws.py) through forwards at a few small shapes (forward.py's measure_step), on a two-layer copy of
the model where its layers are alike, and checks them against a forward of the whole model, so that planning many
workloads (bisection for --solve, what-would-fit suggestions) stays arithmetic; where a law cannot be trusted it
measures each workload. A single prompt and a padded batch run different code (with SDPA, transformers builds no
attention mask where nothing is padded), so each has its own laws: three lengths at batch 1, six shapes at batches
2 and 3, each set fitted when a plan first asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oneke_plan.measure.forward import OUTSIDE, MeasureError, measure_step, sliding_windows
from oneke_plan.measure.laws import BlockLaws, Law


@dataclass(frozen=True)
class BlockMemory:
    """Measured bytes of one block for one workload: the state (KV cache, recurrent state) it keeps after the
    prefill and at the last decode step (a sliding window's cache can be larger after the prefill), and the
    transient bytes while it runs, besides every block's state."""

    prefill_state_bytes: int
    decode_state_bytes: int
    peak_bytes: int

    @property
    def state_bytes(self) -> int:
        return max(self.prefill_state_bytes, self.decode_state_bytes)


Regime = tuple[int, int | None]  # token counts [low, high) a set of laws holds for (high None: unbounded)
Laws = dict[str, BlockLaws]


class Measurer:
    """The measured memory of one model (built on the meta device), per block, for any workload.

    Laws are fitted from forwards at a few small shapes (batch 1 apart from batches of two and more: a single
    prompt is never padded), on a two-layer copy of the model when its decoder layers are all alike (same
    classes, tensors and layer type), and checked against a forward of the whole model at a shape they were not
    fitted on. Sliding windows (read off the cache transformers builds) split token counts
    into two regimes, below the smallest window and from the largest, each with its own laws and check. Where a
    check fails, or for lengths between two windows of different sizes, each workload is measured directly
    (slower, as exact). MeasureError: the model's forward cannot run on the meta device.
    """

    def __init__(
        self,
        model: Any,
        blocks: Sequence[str],
        layers: Sequence[str],
        reduced: Callable[[], tuple[Any, Sequence[str], Sequence[str]]] | None = None,
        max_tokens: int | None = None,
    ):
        self.model = model
        self.blocks = list(blocks)
        self.layers = list(layers)
        self.reduced = reduced
        self.max_tokens = max_tokens or (1 << 20)
        self.log: list[str] = []
        self._direct: dict[tuple[int, int, int], dict[str, BlockMemory]] = {}
        self._laws: dict[bool, list[tuple[Regime, Laws | None]]] = {}  # batch 1 (True) or >= 2: per regime
        self._regime_list: list[Regime] | None = None  # read once (_regimes)
        self._reduced: tuple[Any, Sequence[str], Sequence[str]] | None = None  # the two-layer copy, if any
        self._margin = 0  # bytes added to every law's peak (laws from the two-layer copy: see _check)

    # -- public ------------------------------------------------------------------------------------------------
    def block_memory(self, batch: int, input_tokens: int, total_tokens: int) -> dict[str, BlockMemory]:
        """Per block (and OUTSIDE): the most state it holds and its transient peak, for a generation of `batch`
        prompts of `input_tokens` growing to `total_tokens`."""
        prefill, decode = self._laws_for(batch, input_tokens), self._laws_for(batch, total_tokens)
        if prefill is None or decode is None:
            return self.measure_directly(batch, input_tokens, total_tokens)
        return {
            name: BlockMemory(
                prefill[name].prefill_state(batch, input_tokens),
                decode[name].decode_state(batch, total_tokens),
                max(prefill[name].prefill_peak(batch, input_tokens), decode[name].decode_peak(batch, total_tokens), 0)
                + self._margin,
            )
            for name in prefill
        }

    def measure_directly(self, batch: int, input_tokens: int, total_tokens: int) -> dict[str, BlockMemory]:
        """Two forwards of the whole model at exactly this workload: the prefill, and the last decode step."""
        key = (batch, input_tokens, total_tokens)
        if key not in self._direct:
            prefill, _ = measure_step(self.model, self.blocks, batch, input_tokens)
            _, last = measure_step(self.model, self.blocks, batch, total_tokens - 1)
            self._direct[key] = {
                name: BlockMemory(
                    prefill.state_bytes[name],
                    last.state_bytes[name],
                    max(prefill.peak_bytes[name], last.peak_bytes[name], 0),
                )
                for name in [OUTSIDE, *self.blocks]
            }
        return self._direct[key]

    # -- laws --------------------------------------------------------------------------------------------------
    def _laws_for(self, batch: int, tokens: int) -> Laws | None:
        """The laws for `batch` prompts of `tokens` (None: measure it directly). The laws of a single prompt and of a
        batch are fitted the first time each is asked for: a plan for one batch size needs one set."""
        single = batch == 1
        if single not in self._laws:
            self._laws[single] = [(regime, self._fit_checked(regime, single)) for regime in self._regimes()]
        for (low, high), laws in self._laws[single]:
            if tokens >= low and (high is None or tokens < high):
                return laws
        return None

    def _regimes(self) -> list[Regime]:
        """The token regimes laws are fitted for (split by sliding windows), read once, with the two-layer copy
        (`_reduced`) the laws are fitted on first."""
        if self._regime_list is None:
            if self.reduced is not None:
                try:
                    self._reduced = self.reduced()
                except Exception as exc:  # noqa: BLE001 - the whole model is measured instead
                    self.log.append(f"measuring: the whole model (no two-layer copy: {_first_line(exc)})")
            model, blocks = (self._reduced[0], self._reduced[1]) if self._reduced else (self.model, self.blocks)
            windows = sliding_windows(model, blocks)
            self._regime_list = [(0, min(windows))] if windows else [(0, None)]
            if windows:
                self._regime_list.append((max(windows), None))
                self.log.append(f"measuring: sliding windows of {', '.join(map(str, sorted(windows)))} tokens")
        return self._regime_list

    def _fit_checked(self, regime: Regime, single: bool) -> Laws | None:
        """Laws for batch 1 (`single`) or for batches of two and more, from the two-layer copy or else the whole
        model, the first whose laws the whole model confirms; None (each workload measured) if neither does."""
        which = "a single prompt" if single else "batches"
        candidates = ([self._reduced] if self._reduced else []) + [(self.model, self.blocks, self.layers)]
        for candidate in candidates:
            try:
                laws = self._fit(candidate, regime, single)
            except (ValueError, MeasureError) as exc:
                self.log.append(f"measuring: no laws for {which} of {_span(regime)} tokens ({_first_line(exc)})")
                continue
            tolerance = self._tolerance() if candidate is self._reduced else 0
            if self._check(laws, regime, single, tolerance):
                self._margin = max(self._margin, tolerance)
                return laws
        self.log.append(f"measuring: {which} of {_span(regime)} tokens are measured one workload at a time")
        return None

    def _fit(self, candidate: tuple[Any, Sequence[str], Sequence[str]], regime: Regime, single: bool) -> Laws:
        model, blocks, layers = candidate
        low, high = regime
        base = low + 8 if low else 16
        if high is not None and base + 41 >= high:
            raise ValueError(f"{_span(regime)} is too short to fit laws in")
        if base + 41 >= self.max_tokens:
            raise ValueError(f"the model takes at most {self.max_tokens} tokens")
        lengths = (base, base + 16, base + 40)
        shapes = [(1, t) for t in lengths] if single else [(b, t) for b in (2, 3) for t in lengths]
        runs = [measure_step(model, blocks, b, t) for b, t in shapes]
        decode_shapes = [(b, t + 1) for b, t in shapes]
        prefills = [prefill for prefill, _ in runs]
        decodes = [decode for _, decode in runs]

        def laws(name: str) -> BlockLaws:
            return BlockLaws(
                Law.fit(shapes, [[m.state_bytes[name]] for m in prefills]),
                Law.fit(shapes, [m.timelines[name] for m in prefills], [m.block_ops[name] for m in prefills]),
                Law.fit(decode_shapes, [[m.state_bytes[name]] for m in decodes]),
                Law.fit(decode_shapes, [m.timelines[name] for m in decodes], [m.block_ops[name] for m in decodes]),
            )

        own = {name: laws(name) for name in [OUTSIDE, *blocks]}
        if model is self.model:
            return own
        # A two-layer copy: its first layer stands for the whole model's first, its second for every other.
        mapped = {name: own[name] for name in [OUTSIDE, *blocks] if name not in layers}
        for i, name in enumerate(self.layers):
            mapped[name] = own[layers[0] if i == 0 else layers[-1]]
        missing = [name for name in self.blocks if name not in mapped]
        if missing:
            raise ValueError(f"the two-layer copy has no block {missing[0]}")
        return mapped

    def _tolerance(self) -> int:
        """How far laws from the two-layer copy may miss the whole model's bytes: a model's code can keep a few
        bytes per layer alive (a window size or offset as a tensor, 8 bytes each) that two layers do not show.
        1 KiB plus 64 bytes a layer, added to every peak when such laws are used: nothing next to a plan's reserve."""
        return 1024 + 64 * len(self.layers)

    def _check(self, laws: Laws, regime: Regime, single: bool, tolerance: int = 0) -> bool:
        """Whether the laws give what the whole model measures, within `tolerance` bytes, at a shape they were
        not fitted on (batch 1 for a single prompt's laws, 4 for the others)."""
        low, high = regime
        tokens = (low + 71) if high is None or low + 72 < high else (low + high) // 2
        batch, total = (1 if single else 4), tokens + 1
        if total >= self.max_tokens:
            return True  # nothing that long can be planned
        prefill, decode = measure_step(self.model, self.blocks, batch, tokens)
        pairs = [
            (name, law.prefill_state(batch, tokens), prefill.state_bytes[name], 0) for name, law in laws.items()
        ] + [(name, law.decode_state(batch, total), decode.state_bytes[name], 0) for name, law in laws.items()]
        pairs += [
            (name, law.prefill_peak(batch, tokens), prefill.peak_bytes[name], tolerance) for name, law in laws.items()
        ]
        pairs += [
            (name, law.decode_peak(batch, total), decode.peak_bytes[name], tolerance) for name, law in laws.items()
        ]
        bad = list(dict.fromkeys(name for name, law, measured, slack in pairs if abs(law - measured) > slack))
        if bad:
            where = bad[0] or "outside every block"
            self.log.append(f"measuring: the laws missed the bytes of {where} (and {len(bad) - 1} more blocks)")
        return not bad


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _span(regime: Regime) -> str:
    low, high = regime
    return f"[{low}, {high})" if high is not None else f"[{low}, ...)"
