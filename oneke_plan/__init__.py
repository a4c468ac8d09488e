"""oneke-plan: fit OneKE (and any Hugging Face causal LM) onto mixed GPUs, then run extraction."""

__version__ = "0.1.0"
