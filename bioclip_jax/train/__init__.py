"""Training: loss, optimizer, sharding, checkpoints, metrics and the trainer loop."""
