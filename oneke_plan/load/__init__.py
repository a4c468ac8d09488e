"""Loading a model as a profile says, after checking the machine, and what its weights take once loaded."""
