"""Speed prediction against a measurement: oneke-plan's decode (and prefill) tokens/s vs oneke-run's decoder.

This machine has no GPU, so the prediction is calibrated where it can be measured: on this CPU. One process:
  1. this CPU's memory bandwidth, measured: a sum over a float32 tensor far larger than the caches (--buffer-mib),
     best of --repeats, in GB/s (10^9 bytes/s); and its float32 matmul throughput (square matmuls), for the prefill;
  2. a random float32 LLaMA (0.55B parameters, 2.2 GB: tools/tiny_checkpoint.py via bench/common.py), planned by
     oneke-plan for this CPU at batch 1 with the measured rates (api.plan(bandwidth="cpu=...", tflops="cpu=..."));
  3. loaded as oneke-run loads it (api.load) and decoded by oneke-run's decoder (GreedyGenerator) at batch 1,
     --rounds times; its own clock splits the prefill from the decoding steps.
Each round measures the rates just before and just after its run and plans with their mean, so that a shared
machine's load weighs on the prediction and the measurement alike. It prints, per round, the predicted and measured
decode and prefill tokens/s and their ratio, and the median ratio (goal for decode: within 25%).

Run: python bench/speed_prediction.py [--rounds 5] [--prompt-tokens 128] [--new-tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import CHECKPOINTS, checkpoint, machine_line, parameter_count, quiet_libraries, table

MODEL = "0.55B"


def read_bandwidth(buffer_bytes: int, repeats: int) -> float:
    """Bytes per second a sum over a float32 buffer reads (best of `repeats`): the streaming read decoding does
    when it multiplies by each weight matrix once."""
    import torch

    buffer = torch.ones(buffer_bytes // 4, dtype=torch.float32)
    buffer.sum()  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def matmul_throughput(size: int, repeats: int) -> float:
    """FLOP per second of a float32 size x size matmul (best of `repeats`): the rate prefill's matmuls run at."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def predicted(model_dir: Path, prompt_tokens: int, new_tokens: int, bandwidth: float, flops: float) -> Any:
    """oneke-plan's plan of the model for this CPU at batch 1, with the given rates: the PlanResult."""
    from oneke_plan import api

    return api.plan(
        model_dir,
        max_input_tokens=prompt_tokens,
        max_new_tokens=new_tokens,
        batch_size=1,
        dtype="float32",
        bandwidth=f"cpu={bandwidth / 1e9}",
        tflops=f"cpu={flops / 1e12}",
        report=Quiet(),
    )


class Quiet:
    """api.Report without the note that this machine has no GPU (known here: the plan is for the CPU on purpose)."""

    def note(self, text: str) -> None:
        pass


def measured(model: Any, tokenizer: Any, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """oneke-run's decoder on one prompt at batch 1: (prefill seconds, decode seconds, decode steps)."""
    from oneke_plan.extract.generation import GreedyGenerator

    generator = GreedyGenerator(model, tokenizer, new_tokens, prefix_reuse=False)
    generator.generate([prompt])
    stats = generator.stats
    return stats.prefill_seconds, stats.decode_seconds, stats.decode_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--buffer-mib", type=int, default=1024, help="size of the bandwidth probe (default 1 GiB)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine a multi-threaded matmul waits for its slowest thread, "
        "which a short probe does not see; 0 = torch's default)",
    )
    args = parser.parse_args()
    quiet_libraries()
    import torch

    from oneke_plan import api

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_line()}\n")
    probe = args.buffer_mib * 2**20
    path = checkpoint(f"speed-{MODEL}-fp32", **CHECKPOINTS[MODEL], dtype=torch.float32)
    print(f"model: {path} ({parameter_count(path) / 1e9:.2f}B parameters, float32)")
    first = predicted(path, args.prompt_tokens, args.new_tokens, read_bandwidth(probe, 3), matmul_throughput(1024, 3))
    model, tokenizer = api.load(first.profile, path)
    vocab = tokenizer.vocab_size
    prompt = [1] + [(7 * i) % (vocab - 3) + 3 for i in range(args.prompt_tokens - 1)]  # BOS, then ids >= 3: no EOS
    rounds = []
    with torch.inference_mode():
        measured(model, tokenizer, prompt[:16], 4)  # warm-up: every weight page mapped, first-call costs paid
        for _ in range(args.rounds):
            # the rates just before and just after the run, so that the machine's load weighs on both sides alike
            before = read_bandwidth(probe, 3), matmul_throughput(1024, 3)
            prefill_s, decode_s, steps = measured(model, tokenizer, prompt, args.new_tokens)
            after = read_bandwidth(probe, 3), matmul_throughput(1024, 3)
            bandwidth, flops = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            speed = predicted(path, args.prompt_tokens, args.new_tokens, bandwidth, flops).profile.speed
            rounds.append((bandwidth, flops, speed, steps / decode_s, args.prompt_tokens / prefill_s))
    cpu = rounds[0][2]["devices"]["cpu"]
    print(f"a decoding step reads {cpu['decode_read_bytes'] / 1e9:.3f} GB (the weights but the embedding table, and "
          f"the KV cache at {args.prompt_tokens + args.new_tokens} positions); the prefill computes "
          f"{cpu['prefill_flops'] / 1e9:.1f} GFLOP for {args.prompt_tokens} tokens; batch 1\n")  # fmt: skip
    rows = []
    decode_ratios, prefill_ratios = [], []
    for i, (bandwidth, flops, speed, decode, prefill) in enumerate(rounds):
        decode_ratios.append(decode / speed["decode_tokens_per_second"])
        prefill_ratios.append(prefill / speed["prefill_tokens_per_second"])
        rows.append([i + 1, f"{bandwidth / 1e9:.2f}", f"{speed['decode_tokens_per_second']:.2f}", f"{decode:.2f}",
                     f"{decode_ratios[-1]:.3f}", f"{flops / 1e9:.1f}", f"{speed['prefill_tokens_per_second']:.1f}",
                     f"{prefill:.1f}", f"{prefill_ratios[-1]:.3f}"])  # fmt: skip
    header = ["round", "GB/s", "decode predicted", "measured", "ratio", "GFLOP/s", "prefill predicted", "measured",
              "ratio"]  # fmt: skip
    print(table(header, rows))
    ratio = statistics.median(decode_ratios)
    verdict = "within" if abs(ratio - 1) <= 0.25 else "NOT within"
    print(f"\ndecode tokens/s, measured / predicted: median {ratio:.3f} ({verdict} 25%), "
          f"range {min(decode_ratios):.3f}-{max(decode_ratios):.3f}")  # fmt: skip
    print(
        f"prefill tokens/s, measured / predicted: median {statistics.median(prefill_ratios):.3f}, "
        f"range {min(prefill_ratios):.3f}-{max(prefill_ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
