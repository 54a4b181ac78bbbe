"""Qwen2-VL architecture settings, read from a Hugging Face `config.json` (hub layout of
Qwen2-VL-*-Instruct with flat text fields, or transformers 5's nested `text_config`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..common.decoder import DecoderConfig


# the hub config.json of the official model (architecture fields only): the planner's input without a download
HUB_CONFIGS = {
    "Qwen/Qwen2-VL-7B-Instruct": {
        "model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "vocab_size": 152064,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "eos_token_id": 151645,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionGeometry:
    """The fields the Qwen vision configs (Qwen2-VL's, Qwen2.5-VL's) share, and what they derive from them."""

    depth: int
    embed_dim: int  # transformers' vision `embed_dim` (Qwen2-VL) or `hidden_size` (Qwen2.5-VL)
    num_heads: int
    out_hidden_size: int  # the LM's hidden size, output of the patch merger
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def hf_geometry(self) -> dict:
        """The patch geometry as a `vision_config` writes it (`geometry_fields` reads it back)."""
        return {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "spatial_merge_size": self.spatial_merge_size, "in_channels": self.in_channels,
                "in_chans": self.in_channels}

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def geometry_fields(v: dict) -> dict:
    """The shared patch geometry and RoPE base of a `vision_config` (either family's names)."""
    return dict(patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
                temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2),
                in_channels=v.get("in_channels", v.get("in_chans", 3)),
                rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(VisionGeometry):
    mlp_ratio: float
    hidden_act: str = "quick_gelu"

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SizedMLPVision(VisionGeometry):
    """A tower whose blocks' MLP width is set explicitly (Qwen2.5-VL's, Qwen3-VL's), not as a ratio."""
    intermediate_size: int

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    def sized_mlp_hf(self) -> dict:
        """The sizes as such a `vision_config` writes them (`hidden_size`: the tower's width)."""
        return {"depth": self.depth, "hidden_size": self.embed_dim, "num_heads": self.num_heads,
                "intermediate_size": self.intermediate_size, "out_hidden_size": self.out_hidden_size,
                "hidden_act": self.hidden_act}


def text_and_rope(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `config.json` dict's text fields (flat, or transformers 5's nested `text_config` over them) and
    their RoPE parameters (`rope_parameters`, or the older `rope_scaling`; {} when neither)."""
    text = {**d, **(d.get("text_config") or {})}
    return text, text.get("rope_parameters") or text.get("rope_scaling") or {}


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Qwen2-VL's settings: the decoder's (`text`), the vision tower's, the M-RoPE and the special tokens.
    `from_hf` reads a `config.json` (the tower through `vision_from_hf`, which the later Qwen families
    replace) and `to_hf` writes one (`text_hf` and `vision_hf`)."""
    text: DecoderConfig
    vision: VisionConfig
    vocab_size: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None  # written to config.json (transformers' default 151643: outside a tiny vocabulary)

    model_type = "qwen2_vl"
    architecture = "Qwen2VLForConditionalGeneration"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Qwen2VLConfig":
        """The config of a `config.json` dict: the text side read here, the tower by `vision_from_hf`."""
        text, rope = text_and_rope(d)
        theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
        heads = text["num_attention_heads"]
        hidden = text["hidden_size"]
        head_dim = text.get("head_dim") or hidden // heads
        mrope = tuple(rope.get("mrope_section") or (16, 24, 24))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default/mrope)")
        if text.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        dec = DecoderConfig(
            hidden_size=hidden,
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            hidden_act=text.get("hidden_act", "silu"),
            qkv_bias=True,
        )
        vision = cls.vision_from_hf(d["vision_config"], hidden)
        eos = text.get("eos_token_id")
        return cls(
            text=dec,
            vision=vision,
            vocab_size=text["vocab_size"],
            rope_theta=float(theta),
            mrope_section=mrope,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            bos_token_id=text.get("bos_token_id"),
        )

    @classmethod
    def vision_from_hf(cls, v: dict[str, Any], lm_hidden: int) -> VisionConfig:
        """The tower's config of a `vision_config` dict; `lm_hidden`: the language model's width."""
        return VisionConfig(depth=v["depth"], embed_dim=v["embed_dim"], num_heads=v["num_heads"],
                            mlp_ratio=v.get("mlp_ratio", 4), out_hidden_size=v.get("hidden_size", lm_hidden),
                            hidden_act=v.get("hidden_act", "quick_gelu"), **geometry_fields(v))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict in the hub layout of Qwen2-VL-*-Instruct (flat text fields), which both
        transformers 4.x and 5.x read."""
        return {"architectures": [self.architecture], "model_type": self.model_type, **self.text_hf(),
                "vision_config": self.vision_hf()}

    def text_hf(self) -> dict[str, Any]:
        """The text side's fields of a flat `config.json` (Qwen2-VL's hub layout)."""
        return {
            **self.text.hf_fields(),
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": 32768,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "eos_token_id": self.eos_token_id,
            # an id outside the vocabulary (a tiny model built with transformers' default) is written as null
            "bos_token_id": self.bos_token_id if self.bos_token_id is not None and
            0 <= self.bos_token_id < self.vocab_size else None,
        }

    def vision_hf(self) -> dict[str, Any]:
        """The `vision_config` dict of `to_hf`."""
        v = self.vision
        return {"depth": v.depth, "embed_dim": v.embed_dim, "num_heads": v.num_heads, "mlp_ratio": v.mlp_ratio,
                "hidden_size": v.out_hidden_size, "hidden_act": v.hidden_act, **v.hf_geometry()}
