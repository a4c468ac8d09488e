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
"""Largest JSON file (config.json, tokenizer files, a schema or few-shot file), in bytes (256 MiB). The largest
real ones are tokenizer.json files of a few tens of MB."""

MAX_INPUT_LINE_BYTES = 2 * 2**20
"""Longest input line oneke-run reads as a prompt, in bytes (2 MiB); a longer line is that line's `error` (its
answer line says so, the other lines run), read without ever being held whole (oneke_plan.io.lines). 2 MiB is
more than any context window holds: a 128k-token prompt is about 0.5 MB of text, 1.3 MB with every Chinese
character written as a \\uXXXX escape inside the instruction string, and OneKE's 4,096 tokens are about 12 KB. The
bound is what keeps a bad line cheap: the tokenizer holds some 100 bytes per byte of text it encodes (a 10 MB line
took 1.1 GB and 20 s with the tiny test tokenizer; 100 MB aborted the process), so a line at the bound costs at
most a few hundred MB before it is found too long for the plan."""

MAX_ANSWER_LINE_BYTES = 16 * 2**20
"""Longest line of an answer file oneke-score or `--resume` reads (16 MiB): an input line at MAX_INPUT_LINE_BYTES
with its answer written three times (output, raw_output, parsed) fits with room to spare."""

MAX_SENTENCEPIECE_BYTES = 64 * 2**20
"""Largest SentencePiece tokenizer.model, in bytes (64 MiB). Real ones are 0.5 MB (LLaMA's 32,000 pieces), 0.8 MB
(OneKE's 55,296) to about 5 MB (Gemma's 256,000): a bigger one is not a tokenizer, and is never read.
Checked with stat before the file is opened (oneke_plan.io.files.read_regular)."""

MAX_REF_BYTES = 256
"""Largest hub-cache ref file (refs/main), in bytes: huggingface_hub writes the commit's 40-digit hash there."""

MAX_INPUT_BYTES = 4 * 2**30
"""Largest input file oneke-run reads (4 GiB), line by line: a regular file's size is checked before it is read, a
pipe or device is counted as it is read. At the speed of a large GPU, 4 GiB of text takes years to answer: split
it into parts."""


def is_valid_unicode(text: str) -> bool:
    """Whether `text` can be written as UTF-8: False when it holds a lone surrogate (U+D800-U+DFFF), which JSON
    ('\\ud800') and YAML ("\\ud800") escapes can make, and which no file, terminal or tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
