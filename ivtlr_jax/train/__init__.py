"""Training: LoRA, vocabulary extension, optimizer, the jitted sharded step, checkpoints, the loop."""
