"""What bf16, 8-bit and 4-bit change in a real model's answers: SmolLM2-135M-Instruct, against float32.

The real weights of tools/real_checkpoint.py (the package index's GGUF, converted to float32 safetensors), planned by
oneke-plan for this machine in float32, bf16, bitsandbytes 8-bit and 4-bit (nf4, double quant; compute in float32),
each run by oneke-run (greedy, the hf engine) over the same prompts: the English examples (examples/english, raw
text with a schema) and the first prompts of each DeepKE test file. For each mode: how many answers equal
float32's (the same text); on the English sets, how many equal transformers' own `generate` of each prompt alone
in the same mode (bitsandbytes' 8-bit keeps activation outlier columns per matmul, so which prompts share a batch
and a prefix changes its numbers); and oneke-score's F1 against the labels.
Random weights cannot show this: what rounding does to a trained model's near-ties.

Run: python bench/real_model_quality.py [--per-task 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine_line, quiet_libraries

sys.path.insert(0, str(ROOT / "tools"))
import real_checkpoint  # noqa: E402

MODES: dict[str, list[str]] = {
    "float32": ["--dtype", "float32"],
    "bfloat16": ["--dtype", "bfloat16"],
    "8bit": ["--dtype", "float32", "--quantize", "8bit"],
    "4bit": ["--dtype", "float32", "--quantize", "4bit"],
}
ENGLISH = {
    "NER": ("NER.json", ["person", "organization", "location"]),
    "RE": ("RE.json", ["place of birth", "founder", "capital"]),
}
DEEPKE_TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")


def command(module: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", f"oneke_plan.cli.{module}", *argv]


def run(cmd: list[str], stdout_only: bool = False) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def inputs(folder: Path, per_task: int) -> list[tuple[str, Path, list[str]]]:
    """(name, file, extra oneke-run arguments) for each input set."""
    sets = []
    for task, (name, schema) in ENGLISH.items():
        extra = ["--task", task, "--schema", json.dumps(schema), "--lang", "en"]
        sets.append((f"en-{task}", ROOT / "examples" / "english" / name, extra))
    lines = []
    for task in DEEPKE_TASKS:
        lines += (ROOT / "examples" / "deepke" / task / "test.json").read_text(encoding="utf-8").splitlines()[:per_task]
    deepke = folder / "deepke.json"
    deepke.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sets.append(("deepke-zh", deepke, []))
    return sets


def answers(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        data = json.loads(line)
        if "raw_output" in data:  # a prompt's line (merged lines of records of several prompts carry no raw_output)
            out[f"{data['id']}:{data.get('key', '')}"] = data
    return out


def f1(path: Path) -> str:
    """oneke-score's F1 of each task part, e.g. "NER entity 0.12"."""
    scores = json.loads(run(command("score", str(path), "--format", "json"), stdout_only=True))
    cells = [
        f"{task} {part} {values['f1']:.2f}"
        for task, data in scores["tasks"].items()
        for part, values in data["parts"].items()
        if values.get("f1") is not None
    ]
    return "; ".join(cells) or "-"


def alone_equal(model: Path, mode: str, lines: dict[str, dict[str, Any]], max_new: int) -> int:
    """How many of oneke-run's answers equal transformers' own greedy generate of the same chat prompt alone, on a
    model transformers loads itself in `mode` (bitsandbytes' config where quantized): what the mode does to
    batched and prefix-shared decoding, apart from what it does to the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from oneke_plan.measure.compat import dtype_kw

    quant: dict[str, Any] = {}
    if mode == "8bit":
        quant["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif mode == "4bit":
        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    loaded = AutoModelForCausalLM.from_pretrained(str(model), **dtype_kw(dtype), device_map={"": "cpu"}, **quant)
    eos = loaded.generation_config.eos_token_id
    equal = 0
    for line in lines.values():
        messages = [{"role": "user", "content": line["instruction"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        row = torch.tensor([ids])
        with torch.inference_mode():
            out = loaded.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()  # fmt: skip
        out = out[: out.index(eos)] if eos in out else out
        equal += tokenizer.decode(out, skip_special_tokens=True) == line["raw_output"]
    return equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=8, help="DeepKE prompts per task (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    quiet_libraries()
    model = real_checkpoint.checkpoint_dir()
    folder = Path(tempfile.mkdtemp(prefix="real-quality-"))
    inventory = folder / "machine.yaml"
    inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
    print(f"machine: {machine_line()}")
    print(f"model: SmolLM2-135M-Instruct ({model}); greedy, max_new_tokens {args.max_new_tokens}, batch 8\n")
    sets = inputs(folder, args.per_task)
    results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    seconds: dict[str, float] = {}
    for mode, flags in MODES.items():
        profile = folder / f"{mode}.yaml"
        workload = ["--max-input-tokens", "1024", "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "8"]
        run(command("plan", str(model), "--inventory", str(inventory), *workload, *flags, "-o", str(profile)))
        results[mode] = {}
        start = time.perf_counter()
        for name, path, extra in sets:
            out = folder / f"{mode}-{name}.jsonl"
            run(command("run", "--profile", str(profile), "--input", str(path), "--output", str(out),
                        "--no-progress", *extra))  # fmt: skip
            results[mode][name] = answers(out)
        seconds[mode] = time.perf_counter() - start
    header = f"{'mode':<9} {'set':<10} {'prompts':>7} {'equal to float32':>16} {'equal to alone':>14}  F1 (oneke-score)"
    print(header)
    print("-" * len(header))
    for mode in MODES:
        for name, _, _ in sets:
            mine, base = results[mode][name], results["float32"][name]
            equal = sum(mine[k]["raw_output"] == base[k]["raw_output"] for k in base)
            same = "-"
            if name.startswith("en-"):  # generate alone is slow in 8-bit on a CPU: the English sets only
                same = f"{alone_equal(model, mode, mine, args.max_new_tokens)}/{len(mine)}"
            score = f1(folder / f"{mode}-{name}.jsonl")
            print(f"{mode:<9} {name:<10} {len(base):>7} {f'{equal}/{len(base)}':>16} {same:>14}  {score}")
    print("\nseconds per mode (all three sets, this machine; not a speed comparison: the 8/4-bit CPU kernels differ):")
    print("  " + ", ".join(f"{mode} {s:.0f} s" for mode, s in seconds.items()))
    print(f"\noutputs: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
