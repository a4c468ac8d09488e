"""Measuring, with the model's own code on the meta device: its blocks, its forward's tensors, checkpoints, adapters."""
