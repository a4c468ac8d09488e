"""What --split-long's overlap costs: windows, prompt tokens and time for one long document, by overlap.

The document is real Chinese text: the inputs of DeepKE's test files (examples/deepke/*/test.json, every task),
joined in file order and cut at a sentence end after --chars characters. The model is tools/real_checkpoint.py's
SmolLM2-135M-Instruct (float32, trained weights, its own ChatML template), planned for this CPU by api.plan with
--max-input-tokens as the window, loaded once by api.load, and run by api.extract as oneke-run runs (one NER prompt,
split into windows, batched with shared-prefix reuse, greedy, --max-new-tokens). Each overlap (--overlaps: 0, the
default one sentence, and token counts) runs --repeats times, interleaved, after one untimed warm-up; the ratios
are against no overlap, per repeat (median).

Run: python bench/split_long.py [--chars 6000] [--window 512] [--max-new-tokens 16] [--batch 4]
     [--overlaps 0,sentence,64] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine_line, quiet_libraries, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=6000)
    parser.add_argument("--window", type=int, default=512, help="the plan's max_input_tokens")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--overlaps", default="0,sentence,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet_libraries()

    import torch

    torch.set_num_threads(args.threads)
    import real_checkpoint
    from long_text import deepke_text

    from oneke_plan import api
    from oneke_plan.extract.inputs import read_raw

    directory = real_checkpoint.checkpoint_dir()
    text = deepke_text(args.chars, samples=False)
    with tempfile.TemporaryDirectory() as tmp:
        inventory = Path(tmp) / "inventory.yaml"
        inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")
        profile = api.plan(directory, inventory_file=inventory, dtype="float32", max_input_tokens=args.window,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch).profile  # fmt: skip
        source = Path(tmp) / "document.json"
        source.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
        records = read_raw(source, "NER", ["人物", "地理位置", "组织机构"], "zh")
    model, tokenizer = api.load(profile, directory)
    overlaps: list[int | None] = [None if o == "sentence" else int(o) for o in args.overlaps.split(",")]

    class Quiet(api.Report):
        def note(self, text: str) -> None:  # the windows' notes, once per run: the table says it
            pass

    def run(overlap: int | None) -> dict[str, Any]:
        extraction = api.extract(
            model, tokenizer, profile, records, split_long=True, window_overlap=overlap, report=Quiet()
        )
        start = time.perf_counter()
        lines = list(extraction)
        seconds = time.perf_counter() - start
        stats = extraction.stats
        return {"windows": len(lines), "prompt_tokens": stats.prompt_tokens, "seconds": seconds}

    for overlap in overlaps:
        run(overlap)  # warm-up, untimed
    results: dict[int | None, list[dict[str, Any]]] = {o: [] for o in overlaps}
    for repeat in range(args.repeats):
        order = overlaps[repeat % len(overlaps) :] + overlaps[: repeat % len(overlaps)]
        for overlap in order:
            results[overlap].append(run(overlap))
    base = results[overlaps[0]]
    rows = []
    for overlap in overlaps:
        got = results[overlap]
        seconds = statistics.median(r["seconds"] for r in got)
        time_ratio = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(got, base, strict=True))
        token_ratio = got[0]["prompt_tokens"] / base[0]["prompt_tokens"]
        name = "one sentence (default)" if overlap is None else f"{overlap} tokens"
        rows.append([name, got[0]["windows"], f"{got[0]['prompt_tokens']:,}", f"{token_ratio:.2f}x",
                     f"{seconds:.1f}", f"{time_ratio:.2f}x"])  # fmt: skip
    print(machine_line())
    print(f"SmolLM2-135M-Instruct float32, {args.threads} thread(s); one NER prompt of {len(text):,} characters "
          f"(DeepKE's test inputs), window {args.window} tokens, batch {args.batch}, {args.max_new_tokens} new tokens, "
          f"median of {args.repeats}")  # fmt: skip
    print(table(["overlap", "windows", "prompt tokens", "tokens vs 0", "seconds", "time vs 0"], rows,
                right=(1, 2, 3, 4, 5)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
