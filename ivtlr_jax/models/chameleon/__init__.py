"""Chameleon: config, VQ-VAE image tokenizer, Llama-style decoder with q/k LayerNorm, HF weight mapping."""
