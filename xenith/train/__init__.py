"""Training: the loop (`loop.train_and_evaluate`), its jitted steps, the train state, the
optimizer, metrics and checkpoints."""
