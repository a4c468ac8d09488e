"""Helpers for the GGUF tests: whether this environment reads GGUF files at all, and tiny GGUF files written with the
gguf package's own writer (the library transformers reads them with)."""

from __future__ import annotations

from pathlib import Path


def gguf_unsupported(path: Path) -> str | None:
    """Why oneke-plan refuses every GGUF file here (gguf_unreadable, or a transformers before 4.47: no GGUF name
    map, and tied output layers loaded at random values), or None."""
    from oneke_plan.measure.compat import transformers_at_least

    if not transformers_at_least("4.47"):
        import transformers

        return (
            f"transformers {transformers.__version__} has no GGUF-to-model name map (get_gguf_hf_weights_map, 4.47) "
            "and loads SmolLM2's GGUF with an untied, randomly initialized lm_head"
        )
    return gguf_unreadable(path)


def gguf_unreadable(path: Path) -> str | None:
    """Why this environment's gguf package cannot read GGUF files (gguf 0.10, the oldest transformers allows, uses
    numpy's ndarray.newbyteorder, which numpy 2 removed), or None when it can."""
    import numpy
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except AttributeError as exc:
        from importlib.metadata import version

        return f"gguf {version('gguf')} cannot read GGUF files with numpy {numpy.__version__} ({exc})"
    return None


def write_gguf(path: Path, architecture: str, layers: int = 2, chat_template: str | None = None) -> Path:
    """A tiny GGUF: LLaMA-style hyperparameters under `architecture`, a 256-token vocabulary size and one tensor
    (the embeddings). Enough for transformers' config reader; not a loadable model."""
    import numpy as np
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(256)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
