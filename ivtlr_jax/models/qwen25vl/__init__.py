"""Qwen2.5-VL: Qwen2-VL's decoder and M-RoPE with a window-attention vision tower (images only)."""
