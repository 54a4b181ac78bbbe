"""Qwen2-VL: config, vision tower, M-RoPE decoder, Hugging Face weight mapping."""
