"""Batched greedy decoding gives each prompt's one-at-a-time tokens; the Runner writes every record exactly once,
halving batches on out-of-memory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import llama2_zh_ids
from reference import alone as transformers_alone
from transformers import AutoModelForCausalLM, AutoTokenizer

from oneke_plan.extract.answer_lines import OutputWriter
from oneke_plan.extract.batching import Encoded, length_batches
from oneke_plan.extract.generation import GreedyGenerator
from oneke_plan.extract.inputs import PromptRecord, read_converted
from oneke_plan.extract.runner import Runner, encode_prompts
from oneke_plan.measure.compat import dtype_kw

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
MAX_NEW = 12
BF16_EPS = 2.0**-7  # bfloat16 keeps 8 significant bits: neighbouring values differ by up to 2**-7 relative


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def deepke_prompts(tokenizer: Any, deepke_dir: Path) -> list[list[int]]:
    """Eight DeepKE prompts of eight different lengths, at least one per task (the shortest ones, to keep the
    test fast), in task order rather than by length."""
    by_task = {
        task: sorted(
            (item.ids for item in encode_prompts(tokenizer, read_converted(deepke_dir / task / "test.json"))), key=len
        )
        for task in TASKS
    }
    prompts = [ids[0] for ids in by_task.values()]
    prompts.append(next(ids for ids in by_task["NER"] if len(ids) not in set(map(len, prompts))))
    assert len(prompts) == 8 and len(set(map(len, prompts))) == 8
    return prompts


def last_logits(model: Any, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Next-token logits of each row, left-padded with an attention mask, as generate's first step sees them."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, row in enumerate(rows):
        ids[k, width - len(row) :] = torch.tensor(list(row))
        mask[k, width - len(row) :] = 1
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits[:, -1].float()


# -- 3. batched == transformers' generate one at a time ----------------------------------------------------------------
def test_fp32_batched_greedy_equals_one_at_a_time(tiny_model_dir: Path, tokenizer: Any, deepke_prompts: list) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kw(torch.float32)).eval()
    generator = GreedyGenerator(model, tokenizer, MAX_NEW)
    batched = generator.generate(deepke_prompts)
    alone = [transformers_alone(model, prompt, generator.eos, MAX_NEW) for prompt in deepke_prompts]
    assert batched == alone
    assert all(len(answer) == MAX_NEW for answer in alone)  # long enough to compare (random weights rarely EOS)
    # and the first step's logits agree to float32 rounding: left padding is masked and positions start at the
    # first real token, whatever the padding
    first = last_logits(model, deepke_prompts)
    for row, prompt in enumerate(deepke_prompts):
        assert torch.allclose(first[row], last_logits(model, [prompt])[0], rtol=0, atol=1e-5)


def test_bf16_batched_greedy_equals_one_at_a_time_up_to_rounding(
    tiny_model_dir: Path, tokenizer: Any, deepke_prompts: list
) -> None:
    """bf16: the padded batch changes matmul shapes, so logits differ by bf16 rounding (a few units in the last
    place). Tokens must match transformers' own generate on each prompt alone, except where that run's top two
    logits are closer than that rounding: a difference anywhere else means masking or positions are wrong, and
    fails."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kw(torch.bfloat16)).eval()
    generator = GreedyGenerator(model, tokenizer, MAX_NEW)
    batched = generator.generate(deepke_prompts)
    alone = [transformers_alone(model, prompt, generator.eos, MAX_NEW) for prompt in deepke_prompts]

    first = last_logits(model, deepke_prompts)
    alone_first = torch.stack([last_logits(model, [p])[0] for p in deepke_prompts])
    tolerance = 4 * BF16_EPS * float(alone_first.abs().max())
    noise = (first - alone_first).abs().amax(dim=1)
    assert bool((noise <= tolerance).all()), f"batched vs alone logits differ by {noise.tolist()} > {tolerance}"
    # the check can fail: without the attention mask, padding is attended and every padded row moves far beyond it
    padded = [r for r, p in enumerate(deepke_prompts) if len(p) < max(map(len, deepke_prompts))]
    width = max(map(len, deepke_prompts))
    unmasked = torch.stack([torch.tensor([0] * (width - len(p)) + p) for p in deepke_prompts])
    with torch.inference_mode():
        no_mask = model(input_ids=unmasked).logits[:, -1].float()
    assert all(float((no_mask[r] - alone_first[r]).abs().max()) > 10 * tolerance for r in padded)

    for row, prompt in enumerate(deepke_prompts):
        if batched[row] == alone[row]:
            continue
        step = next(i for i, (a, b) in enumerate(zip(alone[row], batched[row], strict=False)) if a != b)
        logits = last_logits(model, [prompt + alone[row][:step]])[0]
        gap = float(logits[alone[row][step]] - logits[batched[row][step]])
        assert abs(gap) <= tolerance, (
            f"prompt {row}: batched decoding chose {batched[row][step]} at step {step} where alone chose "
            f"{alone[row][step]}, {gap:.4f} apart (more than bf16 rounding, {tolerance:.4f})"
        )
    assert sum(b == a for b, a in zip(batched, alone, strict=True)) >= len(alone) // 2


def test_sequences_that_finish_early_leave_the_batch_without_changing_the_others(
    tiny_model_dir: Path, tokenizer: Any, deepke_prompts: list
) -> None:
    """Make a token that some answers produce mid-way the EOS: rows then finish at different steps and are dropped
    from the batch and its KV cache. Every answer must still equal its one-at-a-time run and transformers' own
    generate with that EOS."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kw(torch.float32)).eval()
    generator = GreedyGenerator(model, tokenizer, MAX_NEW)
    free = [generator.generate([prompt])[0] for prompt in deepke_prompts]
    counts: dict[int, int] = {}
    for answer in free:
        for token in set(answer[1:-1]):
            counts[token] = counts.get(token, 0) + 1
    stop = max(counts, key=lambda t: (0 < counts[t] < len(free), counts[t]))
    generator.eos = [stop]
    batched = generator.generate(deepke_prompts)
    alone = [generator.generate([prompt])[0] for prompt in deepke_prompts]
    assert batched == alone
    lengths = {len(answer) for answer in batched}
    assert len(lengths) > 1 and min(lengths) < MAX_NEW  # some rows really left the batch early
    for prompt, answer in zip(deepke_prompts, batched, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            reference = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert answer == (reference[: reference.index(stop)] if stop in reference else reference)


def test_length_batches_sort_longest_first_and_keep_every_prompt() -> None:
    encoded = [Encoded(i, [1] * n) for i, n in enumerate([5, 9, 2, 9, 7])]
    batches = length_batches(encoded, 2)
    assert [[e.index for e in b] for b in batches] == [[1, 3], [4, 0], [2]]


# -- 7. out-of-memory halving ----------------------------------------------------------------------------------------
def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def ner_records(deepke_dir: Path) -> list[PromptRecord]:
    """6 NER + 6 EEA + 5 KG lines: 17 prompts, so batches of 8 are uneven; keys made unique across the files."""
    return [
        replace(r, key=f"{task}:{r.key}")
        for task in ("NER", "EEA", "KG")
        for r in read_converted(deepke_dir / task / "test.json")
    ]


def test_runner_halves_batches_on_out_of_memory(tokenizer: Any, ner_records: list, tmp_path: Path) -> None:
    encoded = encode_prompts(tokenizer, ner_records)
    key_of = {tuple(item.ids): ner_records[item.index].key for item in encoded}
    assert len(key_of) == len(ner_records)
    poison = ner_records[4].key
    calls: list[tuple[int, bool]] = []

    def generate(batch: Sequence[Sequence[int]]) -> list[list[int]]:
        keys = [key_of[tuple(ids)] for ids in batch]
        if len(batch) > 2 or poison in keys:
            calls.append((len(batch), False))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        calls.append((len(batch), True))
        return [tokenizer.encode(json.dumps({key: []}), add_special_tokens=False) for key in keys]

    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as writer:
        runner = Runner(generate, tokenizer, writer, batch_size=8, max_input_tokens=4096, progress=False)
        stats = runner.run(ner_records)

    lines = read_lines(out)
    assert sorted(line["key"] for line in lines) == sorted(r.key for r in ner_records)  # each exactly once
    by_key = {line["key"]: line for line in lines}
    for record in ner_records:
        line = by_key[record.key]
        assert line["id"] == record.id and line["instruction"] == record.instruction
        if record.key == poison:
            assert line["output"] == "" and "parsed" not in line
            assert "out of memory" in line["error"]
        else:
            assert line["output"] == json.dumps({record.key: []})  # its own answer, after any split
            assert line["parsed"] == {record.key: []}
    assert all(size <= 2 for size, ok in calls if ok)
    failed_splits = sum(1 for size, ok in calls if not ok and size > 1)
    assert stats.oom_retries == failed_splits > 0
    assert stats.out_of_memory == 1
    assert stats.prompts == len(ner_records) - 1
    assert stats.too_long == 0


def test_cublas_alloc_failed_halves_the_batch_too(tokenizer: Any, ner_records: list, tmp_path: Path) -> None:
    """cuBLAS failing to allocate its handle or workspace is out of memory under another name: torch raises it as
    a RuntimeError built by TORCH_CUDABLAS_CHECK (ATen/cuda/Exceptions.h: "CUDA error: " + the status's name +
    " when calling `EXPR`"), with no "out of memory" in it. The runner must halve the batch, not end the run."""
    sizes: list[int] = []

    def generate(batch: Sequence[Sequence[int]]) -> list[list[int]]:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return [[5] for _ in batch]

    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as writer:
        stats = Runner(generate, tokenizer, writer, batch_size=8, max_input_tokens=10_000, progress=False).run(
            ner_records
        )
    assert sizes[:3] == [8, 4, 2] and max(sizes[2:]) <= 2  # 8 and 4 failed; 2 and below ran
    assert stats.oom_retries == 2 and stats.out_of_memory == 0
    assert stats.prompts == len(ner_records)
    assert sorted(line["key"] for line in read_lines(out)) == sorted(r.key for r in ner_records)
    assert all("error" not in line for line in read_lines(out))


def test_runner_does_not_swallow_other_errors(tokenizer: Any, ner_records: list, tmp_path: Path) -> None:
    def generate(batch: Sequence[Sequence[int]]) -> list[list[int]]:
        raise ValueError("a bug, not memory")

    with OutputWriter(tmp_path / "out.jsonl") as writer:
        runner = Runner(generate, tokenizer, writer, batch_size=4, max_input_tokens=4096, progress=False)
        with pytest.raises(ValueError, match="a bug"):
            runner.run(ner_records)


def test_runner_reports_too_long_prompts_without_cutting(tokenizer: Any, ner_records: list, tmp_path: Path) -> None:
    lengths = {r.key: len(llama2_zh_ids(tokenizer, r.instruction)) for r in ner_records}
    limit = sorted(lengths.values())[len(lengths) // 2]
    seen: list[int] = []

    def generate(batch: Sequence[Sequence[int]]) -> list[list[int]]:
        seen.extend(len(ids) for ids in batch)
        return [tokenizer.encode("{}", add_special_tokens=False) for _ in batch]

    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as writer:
        stats = Runner(generate, tokenizer, writer, 4, limit, progress=False).run(ner_records)
    too_long = {k for k, n in lengths.items() if n > limit}
    assert too_long and stats.too_long == len(too_long)
    assert sorted(seen) == sorted(n for n in lengths.values() if n <= limit)  # the model never saw a cut prompt
    for line in read_lines(out):
        if line["key"] in too_long:
            assert f"prompt has {lengths[line['key']]} tokens" in line["error"]
            assert "not cut" in line["error"] and line["output"] == ""
        else:
            assert line["parsed"] == {}


def test_out_of_memory_retry_runs_after_the_failed_batch_is_freed(
    tokenizer: Any, ner_records: list, tmp_path: Path
) -> None:
    """The failed call's tensors (its KV cache, on a GPU) must be garbage by the time the halves run."""
    import weakref

    alive: list[weakref.ref] = []

    class Cache:
        pass

    def generate(batch: Sequence[Sequence[int]]) -> list[list[int]]:
        assert all(ref() is None for ref in alive), "a failed attempt's cache is still alive during the retry"
        cache = Cache()
        if len(batch) > 2:
            alive.append(weakref.ref(cache))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return [[5] for _ in batch]

    with OutputWriter(tmp_path / "out.jsonl") as writer:
        stats = Runner(generate, tokenizer, writer, 8, 10_000, progress=False).run(ner_records)
    assert stats.prompts == len(ner_records) and stats.oom_retries > 0 and alive
