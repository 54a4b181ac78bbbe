"""Chameleon architecture settings from a Hugging Face `config.json` (facebook/chameleon-7b layout)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..common.decoder import DecoderConfig


# the hub config.json of the official model (architecture fields only): the planner's input without a download
HUB_CONFIGS = {
    "facebook/chameleon-7b": {
        "model_type": "chameleon", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": 65536,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "swin_norm": False,
        "vq_config": {"embed_dim": 256, "num_embeddings": 8192, "latent_channels": 256, "resolution": 512,
                      "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
                      "num_res_blocks": 2, "attn_resolutions": [], "double_latent": False},
        # image codes 0..8191 are BPE ids 4..8195 in the real vocabulary_map; <image> is 8711
        "vocabulary_map": {"<image>": 8711, **{"IMGIMG" + "".join(chr(65 + int(d)) for d in str(i)) + "Z": 4 + i
                                               for i in range(8192)}},
    },
}


@dataclasses.dataclass(frozen=True)
class VQConfig:
    embed_dim: int = 256  # codebook vector width
    num_embeddings: int = 8192  # codebook size
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    attn_type: str = "vanilla"


@dataclasses.dataclass(frozen=True)
class ChameleonConfig:
    text: DecoderConfig
    vq: VQConfig
    vocab_size: int
    rope_theta: float
    tie_word_embeddings: bool
    image_token_id: int  # the `<image>` placeholder
    code_to_token: tuple[int, ...]  # VQ code -> BPE token id (from the checkpoint's vocabulary_map)
    image_vocab_ids: tuple[int, ...]  # the BPE ids of image codes, whose logits transformers suppresses
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    model_type = "chameleon"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ChameleonConfig":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default)")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"config.json: {key}=true is not supported")
        heads = d["num_attention_heads"]
        text = DecoderConfig(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            hidden_act=d.get("hidden_act", "silu"),
            qk_layernorm=True,
            swin_norm=bool(d.get("swin_norm", False)),
        )
        vq_fields = {f.name for f in dataclasses.fields(VQConfig)}
        v = {k: val for k, val in (d.get("vq_config") or {}).items() if k in vq_fields}
        for key in ("channel_multiplier", "attn_resolutions"):
            if key in v:
                v[key] = tuple(v[key] or ())
        vq = VQConfig(**v)
        vocab_map = d.get("vocabulary_map")
        if not vocab_map or "<image>" not in vocab_map:
            raise ValueError("config.json: vocabulary_map with an '<image>' entry is required for Chameleon")
        return cls(
            text=text,
            vq=vq,
            vocab_size=d["vocab_size"],
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            image_token_id=vocab_map["<image>"],
            code_to_token=code_to_token_table(vocab_map),
            image_vocab_ids=tuple(sorted(v for k, v in vocab_map.items() if k.startswith("IMGIMG"))),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict in the layout of facebook/chameleon-7b (the vocabulary map holds the
        `<image>` placeholder and the image-code tokens, which is all the model uses of it)."""
        t, vq = self.text, self.vq
        vocab_map = {"<image>": self.image_token_id}
        vocab_map.update({_code_name(code): token for code, token in enumerate(self.code_to_token)
                          if token in set(self.image_vocab_ids)})
        return {
            "architectures": ["ChameleonForConditionalGeneration"],
            "model_type": self.model_type,
            **t.hf_fields(),
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "swin_norm": t.swin_norm,
            "attention_bias": False,
            "mlp_bias": False,
            "max_position_embeddings": 4096,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vq_config": {**dataclasses.asdict(vq), "channel_multiplier": list(vq.channel_multiplier),
                          "attn_resolutions": list(vq.attn_resolutions)},
            "vocabulary_map": vocab_map,
        }


def _code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_to_token_table(vocab_map: dict[str, int]) -> tuple[int, ...]:
    """As transformers' `ChameleonImageVocabularyMapping.img2bpe`: image tokens are named
    `IMGIMG<code in letters A-J for digits 0-9>Z`; unnamed codes map to 0."""
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    img2bpe = {}
    for name, token in vocab_map.items():
        if name.startswith("IMGIMG"):
            img2bpe[int("".join(digits.get(c, c) for c in name[len("IMGIMG") : -1]))] = token
    table = [0] * (max(img2bpe) + 1)
    for code, token in img2bpe.items():
        table[code] = token
    return tuple(table)
