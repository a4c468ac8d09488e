"""Bounds on the data users hand the tools (JSON and YAML files, input lines, flags), in one place.

Each bound is far above what a real file needs and far below what could exhaust memory, time or Python's stack:
a file over a bound is refused in one line naming it (oneke_plan.io.jsonfile, oneke_plan.io.yamlfile), never read
until something breaks. A leaf module: standard library only.
"""

from __future__ import annotations

MAX_NESTING = 100
"""Deepest nesting of lists and mappings in any JSON or YAML value we read. The deepest real files have 5 or 6
levels (a multimodal config.json's text_config.rope_scaling; an input line's events with their arguments);
Python's parsers hit their recursion limit near 1000."""

MAX_YAML_BYTES = 1 * 2**20
"""Largest profile or inventory file, in bytes (1 MiB). A profile for a 200-layer model is about 20 KB; PyYAML
reads about 1 MB/s, so the bound keeps any read under a few seconds."""

MAX_JSON_BYTES = 256 * 2**20
"""Largest JSON file (config.json, tokenizer files, a schema or few-shot file) or input line, in bytes (256 MiB).
The largest real ones are tokenizer.json files of a few tens of MB."""

MAX_SENTENCEPIECE_BYTES = 64 * 2**20
"""Largest SentencePiece tokenizer.model, in bytes (64 MiB). Real ones are 0.5 MB (LLaMA's 32,000 pieces), 0.8 MB
(OneKE's 55,296) to about 5 MB (Gemma's 256,000): a bigger one is not a tokenizer, and is never read.
Checked with stat before the file is opened (oneke_plan.io.files.read_regular)."""

MAX_REF_BYTES = 256
"""Largest hub-cache ref file (refs/main), in bytes: huggingface_hub writes the commit's 40-digit hash there."""

MAX_INPUT_BYTES = 4 * 2**30
"""Largest input file oneke-run reads (4 GiB, read whole into memory). At the speed of a large GPU, 4 GiB of text
takes years to answer: split it into parts."""


def is_valid_unicode(text: str) -> bool:
    """Whether `text` can be written as UTF-8: False when it holds a lone surrogate (U+D800-U+DFFF), which JSON
    ('\\ud800') and YAML ("\\ud800") escapes can make, and which no file, terminal or tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
