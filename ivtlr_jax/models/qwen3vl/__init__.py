"""Qwen3-VL (dense): Qwen3's text decoder (q/k RMSNorm) with interleaved M-RoPE and DeepStack, and a ViT
with learned position embeddings interpolated to the image grid (images only)."""
