"""Qwen2.5-VL in Flax NNX: Qwen2-VL (same decoder, M-RoPE, rope index, prompt/step positions, images only:
video inputs refused) with the Qwen2.5-VL vision tower (window attention, RMSNorm, gated MLP)."""

from __future__ import annotations

from ..qwen2vl.modeling import Qwen2VL
from .vision import VisionTower


class Qwen25VL(Qwen2VL):
    """Everything Qwen2-VL's (`image_features` too: which frames attend per frame and which through
    `frame_attention`), calling this family's tower."""
    tower_cls = VisionTower
