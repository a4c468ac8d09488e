"""Extraction: inputs to prompts, decoding (hf or vLLM), batches and retries, journaled outputs, scores."""
