"""Measuring: run the model's own forward on the meta device and account for every tensor it allocates.

Nothing here is a formula for an architecture. The model built on the meta device (no memory) runs its real
transformers code on meta inputs of the planned shapes, and a torch dispatch mode sees every tensor each op
creates and, through a weak reference to its storage, when it is freed. Each storage is charged to the block (a
decoder layer, the embeddings, the lm_head, ...) whose forward allocated it, or first used it when the model
allocated it before any block ran (some caches are preallocated). After the forward:

- *state*: storages still alive that are not the model's outputs: the KV cache of full, sliding-window or
  compressed (MLA) attention, the convolution and recurrent state of SSM / linear-attention layers, whatever the
  cache type. Storages, not tensors: a sliding-window layer's cache is a view that keeps the whole prefill's K/V
  storage alive until the next step, and that is what memory holds.
- *peak*: for each block, the most bytes of all other tensors alive while it ran: its own activations and what
  the model's forward holds for every block (hidden states, attention masks, position embeddings).

One assumption remains, because the meta device has no attention kernel: `scaled_dot_product_attention` is
accounted as GPUs run it (flash / memory-efficient kernels: the output and a float32 log-sum-exp per query, no
seq x seq scores; a boolean mask converted to the query's dtype, as torch does before any kernel). On the meta
device torch would run its math fallback, which materializes the scores in float32. Eager attention is measured
as it is. See docs/memory-model.md.

measurer.py turns a handful of such forwards into laws (laws.py) that give the bytes of any batch and length.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

OUTSIDE = ""  # the pseudo-block for what the model does outside every block (masks, position ids, ...)


class MeasureError(Exception):
    """The model's forward cannot be measured on the meta device (the message says why)."""


@dataclass(frozen=True)
class ForwardMemory:
    """One measured forward: per block, bytes of state left behind and peak bytes of everything else."""

    state_bytes: dict[str, int]
    peak_bytes: dict[str, int]
    signature: tuple[Any, ...]  # the ops it ran, to tell whether two forwards ran the same code path
    timelines: dict[str, tuple[int, ...]]  # per block, the live bytes at each op it ran (its peak is their max)
    block_ops: dict[str, tuple[Any, ...]]  # per block, the ops those values are at


@dataclass
class _Storage:
    nbytes: int
    block: str  # allocated in
    born: int  # op index
    died: int | None = None
    used_by: str | None = None  # first block that used it, for storages allocated outside blocks


@dataclass
class _Run:
    storages: list[_Storage] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    ranges: list[tuple[str, int, int]] = field(default_factory=list)  # block, first op, last op


def _tracker_classes() -> tuple[type, type]:
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    local_scalar = torch.ops.aten._local_scalar_dense.default

    class Tracker(TorchDispatchMode):
        def __init__(self, run: _Run, existing: Sequence[Any] = (), padded: bool = True) -> None:
            super().__init__()
            self.run = run
            self.padded = padded
            self.known: WeakIdKeyDictionary = WeakIdKeyDictionary()
            self.stack: list[str] = []
            self.refs: list[Any] = []
            for tensor in existing:  # weights and inputs: counted elsewhere, and views of them are not new memory
                self.known[tensor.untyped_storage()] = -1

        @property
        def block(self) -> str:
            return self.stack[-1] if self.stack else OUTSIDE

        def _died(self, index: int, _ref: Any = None) -> None:
            self.run.storages[index].died = len(self.run.ops) - 1  # the last op it was alive for

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is local_scalar:
                return _read_meta_value(args[0], self.padded)
            block = self.block
            storages = self.run.storages
            if block != OUTSIDE:
                for arg in _tensors(args):
                    index = self.known.get(arg.untyped_storage())
                    if index is not None and index >= 0 and storages[index].used_by is None:
                        storages[index].used_by = block
            out = func(*args, **(kwargs or {}))
            ops = self.run.ops
            ops.append(func)
            for tensor in _tensors(out if isinstance(out, tuple | list) else (out,)):
                storage = tensor.untyped_storage()
                if storage.device.type != "meta":  # fake tensors' storage is on meta too
                    continue  # a host-side scalar the model's code makes (a window size as a tensor): not GPU memory
                if storage not in self.known:
                    index = len(storages)
                    self.known[storage] = index
                    storages.append(_Storage(storage.nbytes(), block, len(ops) - 1))
                    self.refs.append(weakref.ref(storage, functools.partial(self._died, index)))
            return out

    grouped_mms = {getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None)} - {None}

    class FusedKernels(TorchFunctionMode):
        """Fused kernels as GPUs run them, by what they allocate.

        `scaled_dot_product_attention`: the output and a float32 log-sum-exp per query, and a boolean mask's
        conversion to the query's dtype. Grouped matmuls (the
        experts of transformers' MoE layers): the output. torch's meta kernel for them accepts only bfloat16, the
        GPU kernel's rule, while the CPU kernel also takes float32: the output is the same either way.
        """

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                names = ("query", "key", "value", "attn_mask")
                named = dict(zip(names, args, strict=False)) | kwargs  # some models pass names, some positions
                query, value, mask = named["query"], named["value"], named.get("attn_mask")
                # torch's SDPA turns a boolean mask into an additive one of the query's dtype before any kernel
                # (convert_boolean_attn_mask), alive until the kernel returns
                additive = query.new_empty(mask.shape) if mask is not None and mask.dtype == torch.bool else None
                logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
                out = query.new_empty((*query.shape[:-1], value.shape[-1]))
                del logsumexp, additive
                return out
            if func in grouped_mms and args[0].dim() == 2 and args[1].dim() == 3:  # tokens x (experts, in, out)
                dtype = kwargs.get("out_dtype") or args[0].dtype
                return args[0].new_empty((args[0].shape[0], args[1].shape[-1]), dtype=dtype)
            return func(*args, **kwargs)

    return Tracker, FusedKernels


def _tensors(values: Any) -> Iterator[Any]:
    """The tensors among an op's arguments or results (top level, or in a list such as cat's)."""
    import torch

    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if isinstance(v, torch.Tensor))


_MASK_FILES = ("transformers/masking_utils.py", "transformers/modeling_attn_mask_utils.py")


def _read_meta_value(tensor: Any, padded: bool) -> Any:
    """A meta tensor has no value. transformers reads one in one place we know the answer to: whether a batch's
    attention mask is all ones, to skip building the 4D mask (masking_utils; modeling_attn_mask_utils before 5.0).
    The answer is the planned run's: a batch of prompts of different lengths is padded (`padded`: no), a single
    prompt is not (yes). Which backends and steps then skip the mask (SDPA does where the query covers the whole
    cache or is one token; eager never does) is the installed transformers' own code, run as it is. Any other read
    is a value the measurement cannot know: the model cannot be measured."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith(_MASK_FILES):
            if tensor.dtype == __import__("torch").bool:
                return not padded
        frame = frame.f_back  # type: ignore[assignment]
    raise MeasureError("its forward reads a tensor's value (.item()), which the meta device does not have")


@contextlib.contextmanager
def _block_hooks(model: Any, blocks: Sequence[str], tracker: Any) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = []

    def enter(name: str) -> Any:
        def hook(*_: Any) -> None:
            tracker.stack.append(name)
            tracker.run.ranges.append((name, len(tracker.run.ops), -1))

        return hook

    def leave(name: str) -> Any:
        def hook(*_: Any) -> None:
            tracker.stack.pop()
            for i in range(len(tracker.run.ranges) - 1, -1, -1):
                block, start, end = tracker.run.ranges[i]
                if block == name and end == -1:
                    tracker.run.ranges[i] = (block, start, len(tracker.run.ops) - 1)
                    break

        return hook

    for name in blocks:
        module = modules.get(name)
        if module is not None:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _storages_of(obj: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t.untyped_storage() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _summarize(run: _Run, outputs: set[int], blocks: Sequence[str], first: int, end: int) -> ForwardMemory:
    """What the ops [first, end) left behind, and per block the live bytes at each op it ran.

    State: storages alive after op end - 1 (outputs excepted), per owning block. Live bytes at an op: every storage
    alive then that is not state, plus the old storage of state being replaced while its replacement lives too (a
    cache that grows by concatenation holds both for a moment): the state terms (after the prefill, after the
    step) cover the rest. Sizes stay polynomials of batch and length, and do not depend on how many layers there
    are."""
    owner = [s.block if s.block != OUTSIDE else (s.used_by or OUTSIDE) for s in run.storages]
    state = dict.fromkeys([OUTSIDE, *blocks], 0)
    kind = []  # "new": state the window leaves; "old": state it found (born before it); "": anything else
    for index, s in enumerate(run.storages):
        alive_at_end = s.born < end and (s.died is None or s.died >= end) and index not in outputs
        found = s.born < first and (s.died is None or s.died >= first) and index not in outputs
        kind.append("new" if alive_at_end and s.born >= first else "old" if found else "")
        if alive_at_end:
            state[owner[index]] = state.get(owner[index], 0) + s.nbytes
    # Pair each block's state being replaced with its replacement, in allocation order (keys with keys, values
    # with values).
    pair_of: dict[int, tuple[str, int]] = {}
    counts: dict[tuple[str, str], int] = {}
    for index, which in enumerate(kind):
        if which:
            n = counts.get((owner[index], which), 0)
            counts[owner[index], which] = n + 1
            pair_of[index] = (owner[index], n)
    plain = [0] * (end + 1)
    events: list[list[tuple[tuple[str, int], str, int]]] = [[] for _ in range(end + 1)]
    for index, s in enumerate(run.storages):
        if s.born >= end or (kind[index] == "" and index not in outputs and s.died is None and s.born < end):
            continue  # a storage alive at the end that is neither: state born before the window, kept unchanged
        died = end - 1 if s.died is None else min(s.died, end - 1)  # alive at every op in [born, died]
        if died < first:
            continue
        born = max(s.born, first)
        if kind[index]:
            events[born].append((pair_of[index], kind[index], s.nbytes))
            events[died + 1].append((pair_of[index], kind[index], -s.nbytes))
        else:
            plain[born] += s.nbytes
            plain[died + 1] -= s.nbytes
    old_new: dict[tuple[str, int], list[int]] = {}
    replacing = 0  # over pairs whose old and new storage both live: the old one's bytes

    def extra(pair: list[int]) -> int:
        return pair[0] if pair[0] > 0 and pair[1] > 0 else 0

    live, running = [], 0
    for t in range(end):
        running += plain[t]
        for key, which, change in events[t]:
            pair = old_new.setdefault(key, [0, 0])
            replacing -= extra(pair)
            pair[0 if which == "old" else 1] += change
            replacing += extra(pair)
        live.append(running + replacing)
    timelines: dict[str, list[int]] = {}
    block_ops: dict[str, list[Any]] = {}
    covered = [False] * end
    for block, start, stop in run.ranges:
        stop = end - 1 if stop == -1 else stop
        lo, hi = max(start, first), min(stop, end - 1)
        if lo > hi:
            continue
        timelines.setdefault(block, []).extend(live[lo : hi + 1])
        block_ops.setdefault(block, []).extend(run.ops[lo : hi + 1])
        covered[lo : hi + 1] = [True] * (hi + 1 - lo)
    rest = [i for i in range(first, end) if not covered[i]]
    timelines[OUTSIDE] = [live[i] for i in rest] or [0]
    block_ops[OUTSIDE] = [run.ops[i] for i in rest] or [None]
    peak = {block: max(values) for block, values in timelines.items()}
    for block in blocks:
        peak.setdefault(block, 0)
        timelines.setdefault(block, [0])
        block_ops.setdefault(block, [None])
    ops = tuple(run.ops[first:end])
    return ForwardMemory(
        state,
        peak,
        ops,
        {block: tuple(values) for block, values in timelines.items()},
        {block: tuple(names) for block, names in block_ops.items()},
    )


def measure_step(
    model: Any, blocks: Sequence[str], batch: int, tokens: int, forward_kwargs: dict[str, Any] | None = None
) -> tuple[ForwardMemory, ForwardMemory]:
    """A prefill of batch x tokens, then one decode step with its cache, as generation runs them: with an
    attention mask, padded where the batch holds more than one prompt (transformers then builds a 4D mask; for a
    single prompt SDPA skips it). Returns (prefill, decode): the state each leaves behind and the peak of each
    block during it. Raises MeasureError if the model's forward cannot run on the meta device.

    Prefill peaks count tensors that do not outlive the forward. Decode peaks count everything alive beyond the
    state the step leaves: a cache that grows by concatenation holds its old and new storage for a moment.
    """
    import torch

    tracker_class, fused_class = _tracker_classes()
    run = _Run()
    tracker = tracker_class(run, [*model.parameters(), *model.buffers()], padded=batch > 1)
    kwargs = dict(forward_kwargs or {})
    kwargs.update(last_logits_only(model))
    takes_positions = "position_ids" in forward_parameters(model)
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            _block_hooks(model, blocks, tracker),
            _inputs_mode(model) as device,
            fused_class(),
            tracker,
        ):
            warnings.simplefilter("ignore")
            inputs = _generation_inputs(batch, tokens, tokens, device, takes_positions)
            out = model(**inputs, use_cache=True, **kwargs)
            prefill_end = len(run.ops)
            prefill = _summarize(run, _storages_known(tracker, out, inputs), blocks, 0, prefill_end)
            cache = _cache_object(_cache_of(out))
            del out, inputs
            inputs = _generation_inputs(batch, 1, tokens + 1, device, takes_positions)
            out = model(**inputs, use_cache=True, **{cache_argument(model): cache}, **kwargs)
            del cache  # the step's own cache replaces it (4.x: the legacy tuple would keep the old storage alive)
    except MeasureError:
        raise
    except Exception as exc:  # the model's own code: any failure means it cannot be measured here
        raise MeasureError(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    decode = _summarize(run, _storages_known(tracker, out, inputs), blocks, prefill_end, len(run.ops))
    del out, inputs
    return prefill, decode


def _generation_inputs(batch: int, tokens: int, mask_tokens: int, device: str, positions: bool) -> dict[str, Any]:
    """What generation passes a forward of `tokens` new tokens per row, made under the tracker so that their bytes
    count while it runs: ids, an attention mask over the `mask_tokens` positions so far, and (where the forward
    takes them) position ids per row, counted from the mask so that padding does not count; a model's rotary
    embeddings are then batch x tokens, not 1 x tokens as from the cache's positions."""
    import torch

    inputs = {
        "input_ids": torch.zeros((batch, tokens), dtype=torch.long, device=device),
        "attention_mask": torch.ones((batch, mask_tokens), dtype=torch.long, device=device),
    }
    if positions:
        inputs["position_ids"] = torch.zeros((batch, tokens), dtype=torch.long, device=device)
    return inputs


def _fake_mode_of(model: Any) -> Any:
    """The FakeTensorMode a model built under it needs for its forward (see compat.measures_on_meta), else a
    no-op context."""
    param = next(model.parameters(), None)
    mode = getattr(param, "fake_mode", None)
    return mode if mode is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _inputs_mode(model: Any) -> Iterator[str]:
    """Where inputs for `model` are made: meta tensors, or fake CPU tensors for a model built as fake tensors."""
    mode = _fake_mode_of(model)
    with mode:
        yield "meta" if isinstance(mode, contextlib.nullcontext) else "cpu"


def forward_parameters(model: Any) -> set[str]:
    """The names the model's forward takes (they differ across transformers versions and models)."""
    return set(inspect.signature(model.forward).parameters)


def last_logits_only(model: Any) -> dict[str, int]:
    """The forward's request for the last position's logits only (`logits_to_keep`, `num_logits_to_keep` before
    transformers 4.50), as generation makes it; {} for models without one."""
    params = forward_parameters(model)
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})


def cache_argument(model: Any) -> str:
    """The name the model's forward takes the cache under: `cache` in recent transformers 5.x (where
    `past_key_values` still works through a slower deprecation shim), `past_key_values` before."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def _storages_known(tracker: Any, out: Any, inputs: dict[str, Any]) -> set[int]:
    """Indexes of the storages of the model's logits and of its inputs: alive while it runs, but not state."""
    storages = [*_storages_of(getattr(out, "logits", None)), *_storages_of(list(inputs.values()))]
    indexes = (tracker.known.get(storage) for storage in storages)
    return {i for i in indexes if i is not None and i >= 0}


def _cache_object(cache: Any) -> Any:
    """A transformers 4.x legacy cache (a tuple of key/value tensors per layer) as the DynamicCache object generation
    keeps, so that a step replaces each layer's storage in place instead of keeping the whole old tuple alive."""
    if isinstance(cache, tuple):
        from transformers import DynamicCache

        return DynamicCache.from_legacy_cache(cache)  # type: ignore[attr-defined]  # 4.x only
    return cache


def _cache_of(out: Any) -> Any:
    for name in ("cache", "past_key_values", "cache_params"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise MeasureError("the model returned no cache to continue generating with")


def sliding_windows(model: Any, blocks: Sequence[str]) -> set[int]:
    """Sliding windows of the cache transformers builds for this model (its cache layers' `sliding_window`)."""
    import torch

    with _inputs_mode(model) as device:
        ids = torch.zeros((1, 4), dtype=torch.long, device=device)
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            _fake_mode_of(model),
        ):
            warnings.simplefilter("ignore")
            out = model(input_ids=ids, use_cache=True, **last_logits_only(model))
        cache = _cache_of(out)
    except Exception:  # noqa: BLE001 - the laws' own forwards report what fails
        return set()
    found = set()
    for layer in getattr(cache, "layers", None) or []:
        window = getattr(layer, "sliding_window", None)
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            found.add(window)
    return found
