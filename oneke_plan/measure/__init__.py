"""What the model is, read from its own code and files: its blocks and its forward's tensors on the meta device,
its checkpoint and adapter headers, and the transformers versions' differences. The first layer that imports torch."""
