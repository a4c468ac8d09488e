"""Extraction speed, whole processes: oneke-run (batched) vs the authors' one-at-a-time loop vs plain batched generate.

Same random checkpoint (bench/common.py CHECKPOINTS["0.12B-wide"]: LLaMA, 117M parameters, 4 layers of hidden 1024,
32,000-token vocabulary), the same 72 DeepKE RE prompts (examples/deepke/RE/test.json, OneKE's llama2_zh chat
template), greedy decoding, the same max_new_tokens, the same dtype, each run a fresh process:
  ours   oneke-plan DIR --cpu-memory 16GiB --dtype D ... -o P.yaml, then
         oneke-run --profile P.yaml --model DIR --input RE/test.json --batch-size B
  (a)    the authors' loop (OneKE README / DeepKE inference script): for each record, tokenizer(prompt) ->
         model.generate(max_new_tokens, greedy) -> decode the new tokens; one record at a time
  (b)    plain transformers: prompts sorted by token length, left-padded batches of B, model.generate, decode
Every answer is compared with (a)'s (the reference: each prompt decoded alone); a mismatch fails the run (exit 1).
tokens/s = generated tokens / generation seconds (each process reports its own; load and imports excluded);
"process s" is the wall time of the whole process, load included.

Run: python bench/extraction_speed.py [--max-new-tokens N] [--batches 1,4,8,16] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, bench_checkpoint, machine_line, parameter_count, table

INPUT = ROOT / "examples" / "deepke" / "RE" / "test.json"

# (a): written the way the authors' example does it; only the chat template comes from oneke_plan so that every
# variant reads byte-identical prompts.
AUTHORS = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from oneke_plan.oneke import chat_prompt
model_dir, input_path, max_new, dtype, out_path = sys.argv[1:6]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map="cpu")
model.eval()
records = [json.loads(line) for line in open(input_path, encoding="utf-8") if line.strip()]
eos = model.generation_config.eos_token_id
eos = eos if isinstance(eos, list) else [eos]
answers, new_tokens = [], 0
start = time.perf_counter()
for record in records:
    prompt = chat_prompt(record["instruction"])
    input_ids = tokenizer.encode(prompt, return_tensors="pt")
    input_length = input_ids.size(1)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=GenerationConfig(max_new_tokens=int(max_new), do_sample=False,
                                                                   num_beams=1, return_dict_in_generate=True,
                                                                   eos_token_id=eos),
                                pad_token_id=tokenizer.eos_token_id)
    generated = output.sequences[0][input_length:].tolist()
    cut = next((k for k, token in enumerate(generated) if token in eos), len(generated))
    new_tokens += cut
    answers.append(tokenizer.decode(generated[:cut], skip_special_tokens=True))
seconds = time.perf_counter() - start
json.dump({"answers": answers, "new_tokens": new_tokens, "seconds": seconds}, open(out_path, "w"))
"""

# (b): plain transformers generate over the same prompts, sorted by length, in left-padded batches.
PLAIN = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from oneke_plan.oneke import chat_prompt
model_dir, input_path, max_new, dtype, out_path, batch = sys.argv[1:7]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
tokenizer.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map="cpu")
model.eval()
records = [json.loads(line) for line in open(input_path, encoding="utf-8") if line.strip()]
prompts = [chat_prompt(r["instruction"]) for r in records]
lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
answers, new_tokens = [None] * len(prompts), 0
eos = model.generation_config.eos_token_id
eos = eos if isinstance(eos, list) else [eos]
start = time.perf_counter()
for i in range(0, len(order), int(batch)):
    idx = order[i:i + int(batch)]
    enc = tokenizer([prompts[j] for j in idx], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=int(max_new), do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    for row, j in zip(out[:, enc["input_ids"].shape[1]:].tolist(), idx):
        cut = next((k for k, token in enumerate(row) if token in eos), len(row))
        new_tokens += cut
        answers[j] = tokenizer.decode(row[:cut], skip_special_tokens=True)
seconds = time.perf_counter() - start
json.dump({"answers": answers, "new_tokens": new_tokens, "seconds": seconds}, open(out_path, "w"))
"""


def run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ...: exit {result.returncode}\n{result.stderr[-3000:]}")
    return wall, result


def ours(bin_dir: Path, profile: Path, model: Path, batch: int, max_new: int, out: Path) -> dict:
    wall, result = run([str(bin_dir / "oneke-run"), "--profile", str(profile), "--model", str(model), "--input",
                        str(INPUT), "--output", str(out), "--batch-size", str(batch), "--max-new-tokens", str(max_new),
                        "--no-progress", "--overwrite"])
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_key = {line["key"]: line["output"] for line in lines}
    answers = [by_key[str(n)] for n in sorted(int(k) for k in by_key)]
    summary = next(line for line in result.stderr.splitlines() if "prompts answered" in line)
    new_tokens = int(summary.split(" tokens in ")[0].rsplit(" ", 1)[1])
    seconds = float(summary.split(" tokens in ")[1].split(" s ")[0])
    return {"answers": answers, "new_tokens": new_tokens, "seconds": seconds, "wall": wall}


def script(code: str, args: list[str], out: Path) -> dict:
    wall, _ = run([sys.executable, "-c", code, *args])
    data = json.loads(out.read_text(encoding="utf-8"))
    data["wall"] = wall
    return data


def with_frequent_stop(model: Path, max_new: int) -> tuple[Path, int]:
    """A view of `model` whose generation config also stops at a token that some greedy answers produce part-way:
    a random model almost never emits EOS, so without this every answer runs to max_new_tokens and a batch never
    has finished sequences, unlike OneKE's answers (an empty NER result is a few tokens, a full one hundreds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from oneke_plan.extract import read_converted
    from oneke_plan.runner import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    prompts = [e.ids for e in encode_prompts(tokenizer, read_converted(INPUT)[::6])]
    counts: dict[int, int] = {}
    with torch.inference_mode():
        for ids in prompts:
            row = torch.tensor([ids])
            answer = net.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=max_new, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
            for token in set(answer[1:]):
                counts[token] = counts.get(token, 0) + 1
    stop = max(counts, key=lambda t: (counts[t] < len(prompts), counts[t]))
    view = Path(tempfile.mkdtemp(prefix="stops-"))
    for item in model.iterdir():
        if item.name not in ("config.json", "generation_config.json"):
            (view / item.name).symlink_to(item.resolve())
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model / name).read_text(encoding="utf-8"))
        config["eos_token_id"] = [tokenizer.eos_token_id, stop]
        (view / name).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return view, stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--checkpoint", default="0.12B-wide")
    parser.add_argument("--varied-lengths", action="store_true",
                        help="also stop at a token some answers produce part-way, so answers end at different steps")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {machine_line()}\n")
    model = bench_checkpoint(args.checkpoint)
    if args.varied_lengths:
        model, stop = with_frequent_stop(model, args.max_new_tokens)
        print(f"varied lengths: token {stop} ends an answer too (see with_frequent_stop)")
    bin_dir = Path(sys.executable).parent
    records = sum(1 for line in INPUT.read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"checkpoint {args.checkpoint}: {parameter_count(model) / 1e6:.0f}M parameters; {records} prompts from "
          f"{INPUT.relative_to(ROOT)}; max_new_tokens {args.max_new_tokens}; dtype {args.dtype}\n")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        profile = tmp / "cpu.yaml"
        run([str(bin_dir / "oneke-plan"), str(model), "--cpu-memory", "16GiB", "--dtype", args.dtype,
             "--max-input-tokens", "512", "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
             str(max(batches)), "-o", str(profile)])
        common_args = [str(model), str(INPUT), str(args.max_new_tokens), args.dtype]
        out = tmp / "a.json"
        results["(a) authors' loop, one at a time"] = script(AUTHORS, [*common_args, str(out)], out)
        print(f"  (a) done: {results[next(iter(results))]['wall']:.0f} s", file=sys.stderr)
        for batch in batches:
            results[f"ours, batch {batch}"] = ours(bin_dir, profile, model, batch, args.max_new_tokens,
                                                   tmp / f"ours{batch}.jsonl")
            out = tmp / f"b{batch}.json"
            results[f"(b) plain generate, batch {batch}"] = script(PLAIN, [*common_args, str(out), str(batch)], out)
            print(f"  batch {batch} done", file=sys.stderr)

    reference = results["(a) authors' loop, one at a time"]
    rows = []
    mismatches = {}
    for name, r in results.items():
        bad = sum(1 for x, y in zip(r["answers"], reference["answers"], strict=True) if x != y)
        mismatches[name] = bad
        rows.append([name, r["new_tokens"], f"{r['seconds']:.1f}", f"{r['new_tokens'] / r['seconds']:.1f}",
                     f"{r['wall']:.1f}", f"{bad}/{len(r['answers'])}"])
    print(table(["run", "new tokens", "generate s", "tokens/s", "process s", "answers != (a)"], rows))
    print()
    a_rate = reference["new_tokens"] / reference["seconds"]
    for batch in batches:
        o = results[f"ours, batch {batch}"]
        b = results[f"(b) plain generate, batch {batch}"]
        o_rate = o["new_tokens"] / o["seconds"]
        b_rate = b["new_tokens"] / b["seconds"]
        print(f"ratio: batch {batch}: ours/(b) {o_rate / b_rate:.2f}x tokens/s ({o['wall'] / b['wall']:.2f}x process "
              f"time); ours/(a) {o_rate / a_rate:.2f}x tokens/s ({reference['wall'] / o['wall']:.2f}x faster process)")
    if any(mismatches.values()):
        print("FAIL: answers differ from one-at-a-time decoding: "
              + ", ".join(f"{k}: {v}" for k, v in mismatches.items() if v))
        return 1
    print("all answers identical to one-at-a-time decoding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
