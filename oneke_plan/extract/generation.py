"""Greedy decoding of many prompts: shared prompt prefixes computed once, and a batch kept full while work remains.

Every OneKE prompt is the system prompt + the task's instruction + a schema chunk, then the input text; in the
DeepKE files that shared prefix is most of each prompt, with a handful of distinct prefixes per file. Two ideas
from vLLM, written for transformers models however they are placed (split over devices, 16-bit or bitsandbytes):

- Prefix reuse: prompts are grouped by a common token prefix (`prefix_groups`); the KV cache of a group's prefix
  is computed once (batch 1) for its first rows, and rows that join later take it from a row of the group still
  in the batch; either way a joining row gets a view of it and prefills only the rest of its prompt. Row layout
  in the cache: [left padding][prefix][padding][rest of the prompt][answer]; position ids count real tokens only
  (from the attention mask), so padding anywhere changes nothing.
- Continuous batching: when rows finish (EOS or max_new_tokens), waiting prompts are prefilled and merged into
  the running cache in their place, so the batch stays at the plan's batch size while work remains.

This needs a cache of plain full-attention layers (LLaMA and its kin: OneKE). Any other cache (sliding windows,
linear-attention or convolution states, hybrids) is decoded in length-sorted batches without either idea; its
finished rows leave the batch through the cache's own `reorder_cache` where every layer type of it is known to
select all the state it holds, and otherwise the batch is kept whole. Models transformers gives no standard
cache go through `generate` itself.

What is held, for the memory model (docs/memory-model.md): at most `batch_size` rows, each at most
max_input_tokens + max_new_tokens - 1 positions wide (leading columns that are padding in every row are cut when
rows leave, and finished rows leave before others join), on each layer's own device. No prefix is kept apart: a
computed prefix lives only as the views the joining rows' forward concatenates, and each layer's goes once that
layer has run, so what the batch holds never exceeds batch_size rows.

Which prompts go together (length batches, prefix groups, prefill runs) is batching.py's; making, reading and
merging caches across transformers versions is kv_cache.py's; this module is the decoding loop over them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneke_plan.extract.batching import Encoded, PrefixGroup, length_batches, prefix_groups, similar_lengths
from oneke_plan.extract.kv_cache import (
    cache_layers,
    can_shrink,
    copy_rows,
    filled_cache,
    is_plain_kv_cache,
    kv_pairs,
    new_cache,
    pairs_bytes,
    release_layer,
    set_kv_pairs,
    shrink,
    supports_standard_cache,
    uses_sliding_window,
)
from oneke_plan.load.loader import input_device
from oneke_plan.measure.forward import cache_argument, forward_parameters, last_logits_only


@dataclass
class DecodeStats:
    """What the decoder did, for benchmarks: seconds in prefill (prefixes and joining rows) and in decode steps,
    and the tokens each computed (prefill tokens include padding); `peak_cache_bytes` is the most KV bytes held
    at once (the rows in flight plus the prefix, every layer, measured on the tensors)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    prefix_tokens: int = 0
    prefixes_computed: int = 0
    prefixes_reused: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    peak_cache_bytes: int = 0


# ---------------------------------------------------------------------------------------------- EOS


def end_token_ids(
    declared: Sequence[Any], tokenizer: Any, directory: str | Path | None = None, stop_ids: Sequence[int] = ()
) -> list[int]:
    """The token ids that end an answer, each once, in this order: `declared` (what the model itself declares as
    EOS, each an int, a list of them, or None: a loaded model's config and generation config, or config.json's
    where the model is loaded elsewhere), the checkpoint's generation_config.json (where Llama-3 Instruct style
    lists are declared only), the tokenizer's EOS, and a chat template's `stop_ids` (Qwen's <|im_end|>, LLaMA-3's
    <|eot_id|>), which end an answer as EOS does."""
    values: list[Any] = list(declared)
    if directory is not None and (Path(directory) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        values.append(GenerationConfig.from_pretrained(str(directory)).eos_token_id)
    values.append(tokenizer.eos_token_id)
    ids: list[int] = []
    for value in values:
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return list(dict.fromkeys([*ids, *stop_ids]))


def _declared_eos(model: Any) -> list[Any]:
    """What a loaded model declares as EOS: its config's and its generation config's (either may be None)."""
    return [
        getattr(getattr(model, "config", None), "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ]


# ---------------------------------------------------------------------------------------------- the model's API


def _forward_names(model: Any) -> tuple[dict[str, int], str, set[str]]:
    """Keyword arguments that differ across transformers versions and models, as the planner measured the forward
    with them (measure.forward): the request for the last position's logits only, the KV cache's name, and the
    names forward takes."""
    return last_logits_only(model), cache_argument(model), forward_parameters(model)


# ---------------------------------------------------------------------------------------------- the decoder


@dataclass
class _Running:
    """The rows in flight: one cache row each, right-aligned (every row's next token goes in the same column)."""

    cache: Any
    mask: Any  # [rows, width] long, 1 = a real token, on the CPU
    positions: Any  # [rows] long: the position of each row's next token
    tokens: Any  # [rows] long: each row's last generated token, fed next
    prompts: list[int]  # the Encoded.index of each row
    groups: list[int]  # the prefix group of each row
    done: list[bool]  # rows that finished but still sit in the cache (they leave at the next merge)


class GreedyGenerator:
    """Greedy decoding over many token-id prompts: answers equal to decoding each prompt alone.

    `run(prompts, batch_size)` yields (prompt index, answer ids) as each answer ends, cut before the first EOS;
    `in_flight` names the prompts started and not yet answered (for an out-of-memory retry). `generate(batch)`
    answers one list in order.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int,
        model_dir: str | Path | None = None,
        prefix_reuse: bool = True,
        refill_fraction: float = 0.25,
        split_tokens: int = 64,
        stop_ids: Sequence[int] = (),
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos = end_token_ids(_declared_eos(model), tokenizer, model_dir, stop_ids)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.device = input_device(model)
        self.last_only, self.cache_name, self.forward_params = _forward_names(model)
        self.prefix_reuse = prefix_reuse
        # Joining rows costs a prefill and a copy of the cache: wait until this share of the batch is free.
        self.refill_fraction = refill_fraction
        # A forward reads every weight once: worth it for a separate prefill when it saves this many padding tokens.
        self.split_tokens = split_tokens
        self.in_flight: set[int] = set()
        self.stats = DecodeStats()

    # -- public ---------------------------------------------------------------------------------------------------

    def generate(self, batch: Sequence[Sequence[int]]) -> list[list[int]]:
        """New tokens for each prompt of `batch` (decoded together), cut before the first EOS."""
        prompts = [Encoded(i, list(ids)) for i, ids in enumerate(batch)]
        answers = dict(self.run(prompts, len(batch)))
        return [answers[i] for i in range(len(batch))]

    def run(self, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]:
        """Answer every prompt, at most `batch_size` rows at a time; yields (Encoded.index, answer ids)."""
        self.in_flight = set()
        if not prompts:
            return
        mode = self.mode()
        if mode == "continuous":
            yield from self._run_continuous(prompts, batch_size)
        elif mode == "batches":
            for batch in length_batches(prompts, batch_size):
                yield from self._run_batch(batch)
        else:
            for batch in length_batches(prompts, batch_size):
                yield from self._run_generate(batch)

    def mode(self) -> str:
        """'continuous' (prefix reuse and continuous batching), 'batches' (length-sorted batches through our
        loop) or 'generate' (transformers' generate, for models without a standard cache or mask)."""
        needed = {"attention_mask", "position_ids", self.cache_name}
        if not supports_standard_cache(self.model) or not needed <= self.forward_params:
            return "generate"
        cache = new_cache(self.model)
        if cache_layers(cache) is None and uses_sliding_window(self.model.config):
            # transformers 4.x keeps full KV and applies windows by cache slot, which padding inside a row would
            # shift (and its hybrid models bring their own caches): leave those to generate
            return "generate"
        return "continuous" if is_plain_kv_cache(cache) else "batches"

    # -- forward calls --------------------------------------------------------------------------------------------

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """Next-token ids (on the CPU) of each row, from the last position's logits; `cache` is updated in place."""
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self.cache_name: cache},
            **self.last_only,
        )
        return out.logits[:, -1, :].argmax(dim=-1).cpu()

    def _ends(self, answer: list[int], token: int) -> bool:
        """Record `token` in `answer` unless it is an EOS; True when the answer is complete."""
        if token in self.eos:
            return True
        answer.append(token)
        return len(answer) >= self.max_new_tokens

    def _note_cache(self, cache: Any, extra: int = 0) -> None:
        if is_plain_kv_cache(cache):
            held = pairs_bytes(kv_pairs(cache)) + extra
            self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, held)

    # -- continuous batching with prefix reuse ---------------------------------------------------------------------

    def _run_continuous(self, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]:
        import torch

        # A batch of one has no other row to take a prefix from, so each prefix would be computed again for its
        # prompt; and a prompt prefilled after its prefix makes transformers build the 4D attention mask that a
        # single prompt prefilled at once does not need, and the plan does not count at batch 1.
        reuse = self.prefix_reuse and batch_size > 1
        groups = prefix_groups(prompts) if reuse else [PrefixGroup(0, list(prompts))]
        if not reuse:
            groups[0].members.sort(key=lambda e: (-len(e.ids), e.index))
        queue = [(g, item) for g, group in enumerate(groups) for item in group.members]
        answers: dict[int, list[int]] = {}
        running: _Running | None = None
        refill = max(1, int(batch_size * self.refill_fraction))
        head = 0
        with torch.inference_mode():
            while head < len(queue) or running is not None:
                live = 0 if running is None else running.done.count(False)
                free = batch_size - live
                if head < len(queue) and (free >= refill or live == 0):
                    group = queue[head][0]
                    source = self._source_row(running, group) if groups[group].prefix_length else None
                    borrowed = source is not None and running is not None and running.done[source]
                    if borrowed and free < 2:
                        source, borrowed = None, False  # no room for a finished row: compute the prefix again
                    if running is not None and any(running.done):
                        # finished rows leave before others join, so the cache never holds more than batch_size
                        # rows; a finished row of the group may stay as the prefix's source, in one joining row's place
                        running = self._compact(running, source if borrowed else None)
                    limit = free - 1 if borrowed else free
                    take = [item for g, item in queue[head : head + limit] if g == group]
                    head += len(take)
                    self.in_flight.update(item.index for item in take)  # before any forward can run out of memory
                    length = groups[group].prefix_length
                    running = self._join(
                        take, group, length, self._prefix_views(group, take[0].ids[:length], running), answers, running
                    )
                    joined = set() if running is None else set(running.prompts)
                    for index in [item.index for item in take if item.index not in joined]:
                        self.in_flight.discard(index)
                        yield index, answers.pop(index)
                    continue
                if running is None:
                    break
                running = self._step(running, answers)
                for row, index in enumerate(running.prompts):
                    if running.done[row] and index in answers:
                        self.in_flight.discard(index)
                        yield index, answers.pop(index)
                if head >= len(queue) and (all(running.done) or running.done.count(True) >= refill):
                    running = self._compact(running)  # while prompts wait, the next join drops finished rows

    @staticmethod
    def _source_row(running: _Running | None, group: int) -> int | None:
        """A row of `group` in the cache (unfinished first), whose first real positions hold the group's prefix."""
        if running is None:
            return None
        rows = [row for row, g in enumerate(running.groups) if g == group]
        return min(rows, key=lambda row: running.done[row]) if rows else None

    def _prefix_views(self, group: int, ids: list[int], running: _Running | None) -> list[tuple[Any, Any]]:
        """KV of a group's prefix (batch 1, each layer on its device): views into a row of the group in the batch
        (its first real positions are that prefix), or, when there is none, computed now."""
        if not ids:
            return []
        if running is not None:
            for row, row_group in enumerate(running.groups):
                if row_group == group:
                    first = int(running.mask[row].argmax())  # the row's first real position
                    end = first + len(ids)
                    self.stats.prefixes_reused += 1
                    return [
                        (k[row : row + 1, :, first:end], v[row : row + 1, :, first:end])
                        for k, v in kv_pairs(running.cache)
                    ]
        return self._prefix_cache(ids, running)

    def _prefix_cache(self, ids: list[int], running: _Running | None) -> list[tuple[Any, Any]]:
        """KV of one prefix (batch 1), each layer on its own device."""
        import torch

        start = time.perf_counter()
        cache = new_cache(self.model)
        row = torch.tensor([ids], dtype=torch.long)
        self._forward(row, torch.ones_like(row), torch.arange(len(ids))[None, :], cache)
        pairs = kv_pairs(cache)
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.prefill_tokens += len(ids)
        self.stats.prefix_tokens += len(ids)
        self.stats.prefixes_computed += 1
        held = 0 if running is None else pairs_bytes(kv_pairs(running.cache))
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, held + pairs_bytes(pairs))
        return pairs

    def _join(
        self,
        take: list[Encoded],
        group: int,
        length: int,
        prefix: list[tuple[Any, Any]],
        answers: dict[int, list[int]],
        running: _Running | None,
    ) -> _Running | None:
        """Prefill `take` after their shared prefix of `length` tokens, then merge them with the running rows.

        New rows are laid out [prefix][padding][rest]: the prefix KV is a view (the forward's concatenation makes
        each row's copy, layer by layer), the rest is left-padded to the longest rest. Rests of very different
        lengths are prefilled in separate forwards (`similar_lengths`), whose rows are all merged with one copy;
        later forwards take the prefix from the first one's rows. This holds the only reference to a computed
        prefix, so each layer's is freed once that layer has run in the first forward.
        """
        start = time.perf_counter()
        held = 0 if running is None else pairs_bytes(kv_pairs(running.cache))
        parts: list[_Running] = []
        holder = [prefix]  # the callee takes it out, so that nothing here keeps a computed prefix alive
        del prefix
        for sub in similar_lengths(take, length, self.split_tokens):
            if parts and length:
                holder = [[(k[:1, :, :length], v[:1, :, :length]) for k, v in kv_pairs(parts[0].cache)]]
            parts.append(self._prefill_rest(sub, group, length, holder, answers))
            held += pairs_bytes(kv_pairs(parts[-1].cache))
            self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, held)
        merged = self._merge([running, *parts])
        self.stats.prefill_seconds += time.perf_counter() - start
        return merged

    def _prefill_rest(
        self,
        take: list[Encoded],
        group: int,
        length: int,
        holder: list[list[tuple[Any, Any]]],
        answers: dict[int, list[int]],
    ) -> _Running:
        """One forward over the rests of `take` after a prefix of `length` tokens (the KV in `holder`, taken out)."""
        import torch

        prefix = holder.pop() if holder else []
        ids, rest_mask = _left_padded([item.ids[length:] for item in take], self.pad)
        mask = torch.cat([torch.ones((len(take), length), dtype=torch.long), rest_mask], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, length:]
        rows = len(take)
        views = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix]
        cache = filled_cache(self.model, views) if length else new_cache(self.model)
        del views, prefix
        tokens = self._forward(ids, mask, positions, cache)
        self.stats.prefill_tokens += ids.numel()
        done = []
        for item, token in zip(take, tokens.tolist(), strict=True):
            answers[item.index] = []
            done.append(self._ends(answers[item.index], token))
        return _Running(cache, mask, positions[:, -1] + 1, tokens, [item.index for item in take], [group] * rows, done)

    def _step(self, running: _Running, answers: dict[int, list[int]]) -> _Running:
        """One decoding step for every row in the cache (finished rows are fed padding; their tokens are dropped)."""
        import torch

        start = time.perf_counter()
        rows = len(running.prompts)
        ids = torch.where(torch.tensor(running.done), self.pad, running.tokens)[:, None]
        running.mask = torch.cat([running.mask, torch.ones((rows, 1), dtype=torch.long)], dim=-1)
        tokens = self._forward(ids, running.mask, running.positions[:, None], running.cache)
        running.positions = running.positions + 1
        running.tokens = tokens
        for row, token in enumerate(tokens.tolist()):
            if not running.done[row]:
                running.done[row] = self._ends(answers[running.prompts[row]], token)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.decode_rows += running.done.count(False)
        self._note_cache(running.cache)
        return running

    def _compact(self, running: _Running, keep_row: int | None = None) -> _Running | None:
        """Drop finished rows but `keep_row` (and columns that are padding in every remaining row)."""
        return self._merge([running], keep_row)

    def _merge(self, runs: Sequence[_Running | None], keep_row: int | None = None) -> _Running | None:
        """One cache holding the unfinished rows of `runs` in order (and row `keep_row` of the first), right-aligned,
        with the leading columns that are padding in every row cut. One copy of each layer's keys and values,
        layer by layer, on the layer's own device."""
        import torch

        parts: list[tuple[_Running, Any]] = []
        for number, run in enumerate(runs):
            if run is not None:
                unfinished = [row for row, done in enumerate(run.done) if not done or (number == 0 and row == keep_row)]
                if unfinished:
                    parts.append((run, torch.tensor(unfinished, dtype=torch.long)))
        if not parts:
            return None
        widths = []
        for run, keep in parts:
            mask = run.mask[keep]
            first = int((mask.cumsum(-1) == 0).sum(-1).min())  # leading all-padding columns
            widths.append((first, mask.shape[1] - first))
        width = max(w for _, w in widths)
        rows = sum(len(keep) for _, keep in parts)
        pairs_by_part = [kv_pairs(run.cache) for run, _ in parts]
        merged_pairs = []
        for layer in range(len(pairs_by_part[0])):
            merged = []
            for which in (0, 1):  # keys, values
                first_tensor = pairs_by_part[0][layer][which]
                out = first_tensor.new_empty((rows, first_tensor.shape[1], width, first_tensor.shape[3]))
                row = 0
                for (_, keep), (first, w), pairs in zip(parts, widths, pairs_by_part, strict=True):
                    copy_rows(pairs[layer][which], keep, first, out[row : row + len(keep)], width - w)
                    row += len(keep)
                merged.append(out)
            merged_pairs.append((merged[0], merged[1]))
            for pairs in pairs_by_part:  # let this layer's old tensors go before the next layer is copied
                pairs[layer] = (None, None)
            for run, _ in parts:
                release_layer(run.cache, layer)
        mask = torch.zeros((rows, width), dtype=torch.long)
        row = 0
        for (run, keep), (first, w) in zip(parts, widths, strict=True):
            mask[row : row + len(keep), width - w :] = run.mask[keep][:, first:]
            row += len(keep)
        cache = parts[0][0].cache
        set_kv_pairs(cache, merged_pairs)
        return _Running(
            cache,
            mask,
            torch.cat([run.positions[keep] for run, keep in parts]),
            torch.cat([run.tokens[keep] for run, keep in parts]),
            [run.prompts[i] for run, keep in parts for i in keep.tolist()],
            [run.groups[i] for run, keep in parts for i in keep.tolist()],
            [run.done[i] for run, keep in parts for i in keep.tolist()],
        )

    # -- length-sorted batches (caches that cannot take prefix reuse) -------------------------------------------

    def _run_batch(self, batch: list[Encoded]) -> Iterator[tuple[int, list[int]]]:
        """One left-padded batch through our loop: finished rows leave through the cache's own reorder_cache
        where it can shrink (can_shrink), else stay in the batch with their tokens dropped."""
        import torch

        start = time.perf_counter()
        ids, mask = _left_padded([item.ids for item in batch], self.pad)
        width = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        answers: dict[int, list[int]] = {item.index: [] for item in batch}
        rows = [item.index for item in batch]
        done = [False] * len(batch)
        cache = new_cache(self.model)
        shrinkable = None
        self.in_flight.update(rows)
        with torch.inference_mode():
            tokens = self._forward(ids, mask, positions, cache)
            self.stats.prefill_seconds += time.perf_counter() - start
            self.stats.prefill_tokens += len(batch) * width
            while True:
                for row, token in enumerate(tokens.tolist()):
                    if not done[row]:
                        done[row] = self._ends(answers[rows[row]], token)
                for row, index in enumerate(rows):
                    if done[row] and index in self.in_flight:
                        self.in_flight.discard(index)
                        yield index, answers[index]
                if all(done):
                    return
                start = time.perf_counter()
                shrinkable = can_shrink(cache) if shrinkable is None else shrinkable
                if shrinkable and any(done):
                    keep = torch.tensor([row for row, d in enumerate(done) if not d], dtype=torch.long)
                    shrink(cache, keep)
                    rows = [rows[row] for row in keep.tolist()]
                    tokens, mask, positions = tokens[keep], mask[keep], positions[keep]
                    done = [False] * len(rows)
                ids = torch.where(torch.tensor(done), self.pad, tokens)[:, None]
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=-1)
                positions = positions[:, -1:] + 1
                tokens = self._forward(ids, mask, positions, cache)
                self.stats.decode_seconds += time.perf_counter() - start
                self.stats.decode_steps += 1

    def _run_generate(self, batch: list[Encoded]) -> Iterator[tuple[int, list[int]]]:
        """transformers' own generate, left-padded, for models whose cache or inputs our loop does not drive."""
        import torch

        ids, mask = _left_padded([item.ids for item in batch], self.pad)
        width = ids.shape[1]
        self.in_flight.update(item.index for item in batch)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
            )
        self.stats.decode_seconds += time.perf_counter() - start
        for item, row in zip(batch, out[:, width:].tolist(), strict=True):
            answer: list[int] = []
            for token in row:
                if self._ends(answer, token):
                    break
            self.in_flight.discard(item.index)
            yield item.index, answer


def _left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Token ids [rows, longest] padded on the left with `pad`, and the attention mask (1 = a real token)."""
    import torch

    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, width - len(tokens) :] = 1
    return ids, mask
