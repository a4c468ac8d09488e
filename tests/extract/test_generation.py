"""The decoder (oneke_plan/extract/generation.py) against transformers' own greedy `generate`, one prompt at a time.

- float32: with shared prefixes computed once and rows joining a running batch, every answer on every DeepKE test
  file equals decoding the prompt alone; in 8-bit and 4-bit (bitsandbytes on CPU) too.
- the KV the decoder holds at its peak is what the plan charges: batch x (input + new) positions per layer, the
  shared prefixes included (they live in the rows).
- EOS ids declared only in generation_config.json end answers (Llama-3 Instruct style lists).
- sliding-window and hybrid models (Mistral, Gemma-3, LFM2's convolutions, Qwen3-Next's linear attention): finished
  rows leave through the cache's own reorder_cache, or the batch is kept whole; answers equal generate's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import needs_bnb_on_cpu
from reference import alone, frequent_stop
from tiny_checkpoint import build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from oneke_plan.extract import kv_cache
from oneke_plan.extract.batching import Encoded, prefix_groups
from oneke_plan.extract.generation import GreedyGenerator
from oneke_plan.extract.inputs import read_converted
from oneke_plan.extract.runner import encode_prompts
from oneke_plan.measure.compat import dtype_kw

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
MAX_NEW = 10


# -- helpers ---------------------------------------------------------------------------------------------------------
def numbered(prompts: list[Encoded]) -> list[Encoded]:
    return [Encoded(i, item.ids) for i, item in enumerate(prompts)]


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_fp32"), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(fp32_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(fp32_dir)


@pytest.fixture(scope="module")
def fp32_model(fp32_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(fp32_dir, **dtype_kw(torch.float32)).eval()


@pytest.fixture(scope="module")
def deepke_prompts(tokenizer: Any, deepke_dir: Path) -> list[Encoded]:
    """All 341 prompts of the seven DeepKE test files."""
    prompts = [
        item for task in TASKS for item in encode_prompts(tokenizer, read_converted(deepke_dir / task / "test.json"))
    ]
    return numbered(prompts)


@pytest.fixture(scope="module")
def reference(fp32_model: Any, deepke_prompts: list[Encoded]) -> tuple[list[int], dict[int, list[int]]]:
    """(EOS ids, each prompt's answer decoded alone by transformers' generate)."""
    eos = [2, frequent_stop(fp32_model, deepke_prompts)]
    return eos, {item.index: alone(fp32_model, item.ids, eos) for item in deepke_prompts}


# -- grouping by prefix ------------------------------------------------------------------------------------------
def test_prefix_groups_by_hand() -> None:
    a = [1, 5, 6, 7, 8]
    b = [1, 5, 6, 9, 9, 9]
    prompts = [
        Encoded(0, [*a, 10, 11]),
        Encoded(1, [*a, 12]),
        Encoded(2, [*a, 10, 13, 14]),
        Encoded(3, [*b, 20]),
        Encoded(4, [*b, 21, 22]),
        Encoded(5, [3, 4]),
    ]
    groups = prefix_groups(prompts)
    # a-prompts share 5 tokens (3 of them: 2 x 5 = 10 saved), b-prompts 6 (1 x 6), better than all five sharing
    # [1, 5, 6] (4 x 3 = 12 < 16); the last prompt shares nothing
    got = sorted((g.prefix_length, sorted(m.index for m in g.members)) for g in groups)
    assert got == [(0, [5]), (5, [0, 1, 2]), (6, [3, 4])]
    # a prefix always leaves one token to prefill, even for identical prompts
    same = prefix_groups([Encoded(0, [1, 2, 3]), Encoded(1, [1, 2, 3])])
    assert [(g.prefix_length, len(g.members)) for g in same] == [(2, 2)]
    # prompts nested in each other thousands deep: every prompt in exactly one group, each group's prefix shared
    nested = [Encoded(i, list(range(1, i + 3))) for i in range(3000)]
    groups = prefix_groups(nested)
    assert sorted(m.index for g in groups for m in g.members) == list(range(3000))
    for group in groups:
        assert all(m.ids[: group.prefix_length] == group.members[0].ids[: group.prefix_length] for m in group.members)
        assert all(len(m.ids) > group.prefix_length for m in group.members)


def test_deepke_files_share_long_prefixes(deepke_prompts: list[Encoded]) -> None:
    groups = [g for g in prefix_groups(deepke_prompts) if g.prefix_length]
    assert sum(len(g.members) for g in groups) >= 0.95 * len(deepke_prompts)
    shared = sum(g.prefix_length * len(g.members) for g in groups)
    assert shared > 0.4 * sum(len(item.ids) for item in deepke_prompts)


# -- answers equal decoding alone --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [3, 8])
def test_fp32_answers_equal_one_at_a_time_on_every_deepke_file(
    fp32_model: Any, tokenizer: Any, deepke_prompts: list[Encoded], reference: tuple, batch_size: int
) -> None:
    eos, expected = reference
    generator = GreedyGenerator(fp32_model, tokenizer, MAX_NEW)
    generator.eos = eos
    assert generator.mode() == "continuous"
    answers = dict(generator.run(deepke_prompts, batch_size))
    assert answers == expected
    lengths = {len(answer) for answer in expected.values()}
    assert len(lengths) > 3 and min(lengths) < MAX_NEW  # answers really ended at different steps
    stats = generator.stats
    # each group's prefix was computed once (again only if all of the group's rows had left before more joined),
    # later rows took it from rows in the batch, and much of every prompt was not prefilled again
    groups = [g for g in prefix_groups(deepke_prompts) if g.prefix_length]
    assert len(groups) <= stats.prefixes_computed <= 1.2 * len(groups)
    assert stats.prefixes_reused > len(groups)
    assert stats.prefill_tokens < 0.65 * sum(len(item.ids) for item in deepke_prompts)
    # the batch stayed full: fewer decoding steps than length-sorted batches need (each runs to its longest answer);
    # those batches by hand: longest prompt first, batch_size at a time
    by_length = sorted(deepke_prompts, key=lambda item: -len(item.ids))
    static = [by_length[k : k + batch_size] for k in range(0, len(by_length), batch_size)]
    static_steps = sum(max(len(expected[item.index]) for item in batch) for batch in static)
    assert stats.decode_steps < static_steps


def test_without_prefix_reuse_the_answers_are_the_same(
    fp32_model: Any, tokenizer: Any, deepke_prompts: list[Encoded], reference: tuple
) -> None:
    eos, expected = reference
    generator = GreedyGenerator(fp32_model, tokenizer, MAX_NEW, prefix_reuse=False)
    generator.eos = eos
    assert dict(generator.run(deepke_prompts, 5)) == expected
    assert generator.stats.prefix_tokens == 0


class _AttentionMasks(torch.overrides.TorchFunctionMode):
    """The attn_mask of every scaled_dot_product_attention call (None where transformers passes none)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.masks.append(None if mask is None else tuple(mask.shape))
        return func(*args, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_single_prompt_runs_without_an_attention_mask(
    fp32_model: Any, tokenizer: Any, deepke_prompts: list[Encoded], reference: tuple, batch_size: int
) -> None:
    """The plan counts no 4D attention mask at batch 1 (measure.forward: nothing is padded, so SDPA skips it) and
    counts one for a batch. What transformers really passes to SDPA while the decoder runs prompts that share
    prefixes: at batch 1 never a mask (the decoder prefills each prompt at once, not after its prefix, which would
    need one), at batch 3 a mask in the prefills of padded rows. Answers equal decoding alone either way."""
    eos, expected = reference
    prompts = numbered(deepke_prompts[:6])
    assert [g for g in prefix_groups(prompts) if g.prefix_length]  # the prompts share prefixes
    generator = GreedyGenerator(fp32_model, tokenizer, MAX_NEW)
    generator.eos = eos
    with _AttentionMasks() as seen:
        answers = dict(generator.run(prompts, batch_size))
    assert answers == {item.index: expected[deepke_prompts[item.index].index] for item in prompts}
    assert seen.masks
    if batch_size == 1:
        assert set(seen.masks) == {None}
        assert generator.stats.prefix_tokens == 0
    else:
        assert any(mask is not None and mask[-2] > 1 for mask in seen.masks)  # a prefill of padded rows


@needs_bnb_on_cpu
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_answers_equal_one_at_a_time(fp32_dir: Path, tokenizer: Any, deepke_dir: Path, bits: int) -> None:
    """8-bit and 4-bit models (bitsandbytes on CPU, float32 compute): prefix reuse and joining rows change
    nothing."""
    from transformers import BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    model = AutoModelForCausalLM.from_pretrained(
        fp32_dir, **dtype_kw(torch.float32), device_map="cpu", quantization_config=config
    ).eval()
    prompts = numbered(
        [
            item
            for task in ("RE", "EEA")
            for item in encode_prompts(tokenizer, read_converted(deepke_dir / task / "test.json"))
        ][:20]
    )
    eos = [2, frequent_stop(model, prompts)]
    generator = GreedyGenerator(model, tokenizer, MAX_NEW)
    generator.eos = eos
    assert dict(generator.run(prompts, 4)) == {item.index: alone(model, item.ids, eos) for item in prompts}
    assert generator.stats.prefix_tokens > 0


# -- what the decoder holds is what the plan charges -------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gqa_dir"])
def test_peak_cache_is_what_the_plan_charges(request: pytest.FixtureRequest, fixture: str) -> None:
    """Batch B of prompts of max_input_tokens L that share L - 1 tokens, one more waiting, every answer
    max_new_tokens N long: at the last step B rows are L + N - 1 positions wide, and the shared prefix lives in
    them (the waiting prompt takes it from a row). The plan charges B x (L + N) positions per layer: one position
    more per row, as documented, and nothing else is held."""
    from oneke_plan.api.planner import Planner
    from oneke_plan.plan.inventory import Inventory
    from oneke_plan.plan.memory import Workload
    from oneke_plan.plan.model_source import resolve_model
    from oneke_plan.plan.plans import PlanSettings

    directory = request.getfixturevalue(fixture)
    batch, length, new = 3, 40, 6
    model = AutoModelForCausalLM.from_pretrained(directory, **dtype_kw(torch.float32)).eval()
    shared = torch.randint(3, 500, (length - 1,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [Encoded(i, [1, *shared[1:], model.config.vocab_size - 1 - i]) for i in range(batch + 1)]
    generator = GreedyGenerator(model, AutoTokenizer.from_pretrained(directory), new)
    generator.eos = []  # every answer runs max_new_tokens
    answers = dict(generator.run(prompts, batch))
    assert all(len(answer) == new for answer in answers.values())

    planner = Planner(resolve_model(str(directory)))
    plan = planner.plan(
        Inventory((), 1 << 30), PlanSettings(Workload(length, new, batch), dtype="float32", cpu_reserve_bytes=0)
    )
    planned = sum(e.kv_cache_bytes for e in plan.placement.estimates.values())
    config = json.loads((directory / "config.json").read_text())  # by hand: K and V, float32, every layer
    per_position = 2 * config["num_key_value_heads"] * config["head_dim"] * 4 * config["num_hidden_layers"]
    assert generator.stats.peak_cache_bytes == batch * (length + new - 1) * per_position
    assert planned == generator.stats.peak_cache_bytes + batch * per_position
    assert generator.stats.prefixes_computed == 1 and generator.stats.prefixes_reused == 1  # from a finished row


# -- item 5: every EOS, every cache type -------------------------------------------------------------------------
def test_eos_declared_only_in_generation_config_ends_answers(
    fp32_dir: Path, tokenizer: Any, deepke_dir: Path, tmp_path: Path
) -> None:
    """Llama-3 Instruct declares its EOS list only in generation_config.json. oneke-run (which builds the model
    from config.json) must stop where transformers' from_pretrained + generate stops."""
    from oneke_plan.cli.plan import main as plan_main
    from oneke_plan.cli.run import main as run_main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for item in fp32_dir.iterdir():
        (model_dir / item.name).symlink_to(item)
    model = AutoModelForCausalLM.from_pretrained(fp32_dir, **dtype_kw(torch.float32)).eval()
    records = read_converted(deepke_dir / "RE" / "test.json")[:12]
    prompts = encode_prompts(tokenizer, records)
    stop = frequent_stop(model, prompts)
    (model_dir / "generation_config.json").unlink()
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop], "do_sample": False}))
    assert json.loads((model_dir / "config.json").read_text())["eos_token_id"] == 2  # only 2 in config.json

    reference_model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kw(torch.float32)).eval()
    assert reference_model.generation_config.eos_token_id == [2, stop]
    expected = []
    for item in prompts:
        ids = torch.tensor([item.ids])
        out = reference_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False
        )
        answer = out[0, len(item.ids) :].tolist()
        answer = answer[: next((k for k, token in enumerate(answer) if token in (2, stop)), len(answer))]
        expected.append(tokenizer.decode(answer, skip_special_tokens=True))

    inventory = tmp_path / "none.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    profile = tmp_path / "p.yaml"
    assert plan_main([str(model_dir), "--max-input-tokens", "600", "--max-new-tokens", str(MAX_NEW), "--batch-size",
                      "4", "--dtype", "float32", "--inventory", str(inventory), "-o", str(profile)]) == 0  # fmt: skip
    source = tmp_path / "re12.json"
    source.write_text("".join(line + "\n" for line in (deepke_dir / "RE" / "test.json").read_text().splitlines()[:12]))
    out = tmp_path / "out.jsonl"
    assert run_main(["--profile", str(profile), "--model", str(model_dir), "--input", str(source), "--output", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    got = [line["output"] for line in lines if not line.get("merged")]  # OUT keeps input order
    assert got == expected
    assert any(len(tokenizer.encode(text, add_special_tokens=False)) < MAX_NEW for text in got)  # the list stopped some


def _tiny_config(arch: str, vocab: int) -> Any:
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, max_position_embeddings=2048,
    )  # fmt: skip
    if arch == "mistral":  # sliding window shorter than every prompt
        return transformers.MistralConfig(num_hidden_layers=2, intermediate_size=128, sliding_window=24, **common)
    if arch == "gemma3":  # a sliding layer and a global one
        return transformers.Gemma3TextConfig(
            num_hidden_layers=2, intermediate_size=128, sliding_window=24, head_dim=16,
            layer_types=["sliding_attention", "full_attention"], **common,
        )  # fmt: skip
    if arch == "lfm2":  # short convolutions with a state per row, and attention
        return transformers.Lfm2Config(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], **common)
    if arch == "qwen3_next":  # gated delta-net linear attention (recurrent + conv state), attention, MoE
        return transformers.Qwen3NextConfig(
            num_hidden_layers=2, intermediate_size=128, layer_types=["linear_attention", "full_attention"],
            head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
            linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, **common,
        )  # fmt: skip
    raise ValueError(arch)


HYBRIDS = ["mistral", "gemma3", "lfm2", "qwen3_next"]


@pytest.fixture(scope="module")
def short_prompts(tokenizer: Any, deepke_dir: Path) -> list[Encoded]:
    """The NER and KG prompts (11): enough rows to finish at different steps, few enough for slow reference
    kernels."""
    records = [r for task in ("NER", "KG") for r in read_converted(deepke_dir / task / "test.json")]
    return numbered(encode_prompts(tokenizer, records))


@pytest.mark.parametrize("shrink", [True, False], ids=["rows-leave", "batch-kept-whole"])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_sliding_and_hybrid_models_equal_generate(
    arch: str, shrink: bool, tokenizer: Any, short_prompts: list[Encoded], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    import transformers

    name = {
        "mistral": "MistralConfig",
        "gemma3": "Gemma3TextConfig",
        "lfm2": "Lfm2Config",
        "qwen3_next": "Qwen3NextConfig",
    }
    if not hasattr(transformers, name[arch]) or not hasattr(transformers.DynamicCache(), "layers"):
        pytest.skip(f"transformers {transformers.__version__} has no {arch}, or no per-layer cache types")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer))).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, **dtype_kw(torch.float32)).eval()
    generator = GreedyGenerator(model, tokenizer, MAX_NEW)
    assert generator.mode() == "batches"  # no prefix reuse on these caches
    cache = kv_cache.new_cache(model)
    assert kv_cache.can_shrink(cache)
    if not shrink:  # a layer type not known to select all its state: the batch must stay whole
        monkeypatch.setattr(kv_cache, "SHRINKABLE_LAYERS", frozenset())
        assert not kv_cache.can_shrink(cache)
    eos = [2, frequent_stop(model, short_prompts)]
    generator.eos = eos
    answers = dict(generator.run(short_prompts, 4))
    expected = {item.index: alone(model, item.ids, eos) for item in short_prompts}
    assert answers == expected
    lengths = {len(answer) for answer in expected.values()}
    assert len(lengths) > 1 and min(lengths) < MAX_NEW  # rows finished at different steps


# -- out of memory with the real decoder -------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch_and_writes_every_prompt_once(
    fp32_model: Any, tokenizer: Any, deepke_dir: Path, tmp_path: Path
) -> None:
    """A CUDA out-of-memory cannot happen on this CPU, so a forward pre-hook raises torch's OutOfMemoryError for
    any forward over more than 2 rows, and for any forward over one poisoned prompt. The Runner must halve the
    batch (8 -> 4 -> 2 -> 1), start again the prompts that were in flight, report the poisoned prompt alone, and
    write every other prompt once, with the answer it has when decoded alone."""
    from oneke_plan.extract.answer_lines import OutputWriter
    from oneke_plan.extract.runner import Runner

    records = [r for task in ("NER", "EEA", "KG") for r in read_converted(deepke_dir / task / "test.json")]
    records = [replace(r, key=f"{i}") for i, r in enumerate(records)]
    prompts = encode_prompts(tokenizer, records)
    counts: dict[int, int] = {}
    for item in prompts:
        for token in set(item.ids):
            counts[token] = counts.get(token, 0) + 1
    eos = [2, frequent_stop(fp32_model, prompts)]
    expected = {item.index: alone(fp32_model, item.ids, eos) for item in prompts}
    generated = {t for answer in expected.values() for t in answer}
    poison = next(t for item in prompts for t in item.ids if counts[t] == 1 and t not in generated)
    poisoned = next(item.index for item in prompts if poison in item.ids)

    def out_of_memory(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"]
        if ids.shape[0] > 2 or bool((ids == poison).any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (test)")

    generator = GreedyGenerator(fp32_model, tokenizer, MAX_NEW)
    generator.eos = eos
    hook = fp32_model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    try:
        with OutputWriter(tmp_path / "out.jsonl") as writer:
            stats = Runner(generator, tokenizer, writer, 8, 4096, progress=False).run(records)
    finally:
        hook.remove()
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(int(line["key"]) for line in lines) == list(range(len(records)))  # each exactly once
    for line in lines:
        index = int(line["key"])
        if index == poisoned:
            assert line["output"] == "" and "out of memory even alone" in line["error"]
        else:
            assert line["output"] == tokenizer.decode(expected[index], skip_special_tokens=True)
    assert stats.oom_retries == 3 and stats.out_of_memory == 1 and stats.prompts == len(records) - 1
