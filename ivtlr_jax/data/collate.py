"""The official collator's batch layout (docs/method.md section 4), with bucketed static shapes.

Each row is left-padded so that its first `<|latent|>` sits at the common index p (rows without
latents get no left pad, as in the official Coconut-style collator), then right-padded to S:

    input_ids       pad .. pad | question  latent x m  steps  answer EOS | pad ..
    attention_mask   0  ..  0  |    1 ...                                 |  0 ..
    position_ids     0  ..  0  |    0, 1, 2, ...                          |  0 ..
    labels         -100 ...    | -100 (question, latents)  supervised     | -100 ..

S is the smallest length bucket >= the longest padded row, and prefix_len (the static bound on p
that the latent loop compiles for) the smallest prefix bucket >= p (at most S; S when no row has a
latent), so a whole training run compiles a bounded number of shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from .examples import materialize

IGNORE = -100
# the padded lengths a batch is cut to (one compilation each): the library's default (collate's), a training
# run's (the run config's data.length_buckets / data.prefix_buckets), an evaluation's (eval.length_buckets)
TRAIN_LENGTH_BUCKETS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096)
TRAIN_PREFIX_BUCKETS = (128, 256, 512, 768, 1024, 1536, 2048, 3072)
EVAL_LENGTH_BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DEFAULT_LENGTH_BUCKETS = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1152, 1280, 1408, 1536,
                          1792, 2048, 2304, 2560, 3072, 3584, 4096)
DEFAULT_PREFIX_BUCKETS = DEFAULT_LENGTH_BUCKETS


@dataclasses.dataclass(frozen=True)
class LatentShapes:
    """The static shapes a collated batch compiles for (hashable: one jit static argument of the train
    step, `ivtlr_loss` and generation; one compilation per distinct record).

    num_latents: n, the most `<|latent|>` tokens of a row (0: a plain forward).
    prefix_len: a bound >= p, the common index of the first latent (S when n = 0).
    shared_prefix: c < p, question slots that run once for the latent chain and the final pass
    (`shared_prefix_bound`; 0 when n = 0)."""

    num_latents: int
    prefix_len: int
    shared_prefix: int = 0

    def __post_init__(self):
        if self.num_latents < 0 or self.prefix_len < 1 or not 0 <= self.shared_prefix < self.prefix_len:
            raise ValueError(f"LatentShapes: need num_latents >= 0, prefix_len >= 1 and 0 <= shared_prefix < "
                             f"prefix_len; got {self}")


def smallest_bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds every bucket."""
    fitting = [b for b in buckets if b >= n]
    return min(fitting) if fitting else None


def shared_prefix_bound(prefix_len: int, prefix_buckets: Sequence[int]) -> int:
    """A static lower bound below p for a batch whose prefix bucket is `prefix_len`: the largest prefix
    bucket under it (0 if none). p lies above it, since prefix_len is the smallest bucket >= p (or S,
    below that bucket). The question slots before it run once for the latent chain and the final pass
    (`ivtlr_loss(shared_prefix=...)`), without adding a compiled shape."""
    below = [b for b in prefix_buckets if b < prefix_len]
    return max(below) if below else 0


def left_padded_positions(mask: np.ndarray) -> np.ndarray:
    """position_ids [B, S] int32 of left-padded rows (mask [B, S]): 0 on the pads, then 0, 1, 2, ..."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def stack_images(images: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One image per row -> the batch's image arrays. Qwen2-VL: pixel_values stacked per image [B, Np, 1176]
    when every image has one frame of the same size (rows split across hosts as whole images; the model
    attends per frame off that static shape only with attention_impl "fused": `Qwen2VL.image_features`),
    else concatenated along patches [sum Np, 1176]; image_grid_thw [B, 3]. Chameleon: pixel_values
    stacked [B, 3, H, W]."""
    arrays = [materialize(im) for im in images]
    if all("image_grid_thw" in a for a in arrays):
        pixels = [np.asarray(a["pixel_values"], np.float32) for a in arrays]
        grids = [np.asarray(a["image_grid_thw"], np.int64).reshape(-1, 3) for a in arrays]
        uniform = all(len(g) == 1 and g[0, 0] == 1 for g in grids) and len({p.shape for p in pixels}) == 1
        return {"pixel_values": np.stack(pixels) if uniform else np.concatenate(pixels, axis=0),
                "image_grid_thw": np.concatenate(grids, axis=0)}
    if any("image_grid_thw" in a for a in arrays):
        raise ValueError("collate: rows mix Qwen2-VL (image_grid_thw) and Chameleon images")
    return {"pixel_values": np.stack([np.asarray(a["pixel_values"], np.float32) for a in arrays], axis=0)}


def collate(features: list[tuple[list[int], list[int], Mapping[str, np.ndarray] | None]], *, latent_id: int,
            pad_id: int, length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS,
            prefix_buckets: tuple[int, ...] = DEFAULT_PREFIX_BUCKETS, image_token_id: int | None = None,
            num_selected_patches: int = 0) -> tuple[dict[str, np.ndarray], LatentShapes]:
    """features: (input_ids, labels, image) per row -> (batch, shapes).

    With `image_token_id`, every row with latents must have at least `num_selected_patches` (K) image
    tokens before its first latent: the first latent pass picks K of them (checked here, on the host,
    because inside the jitted top-K a short row would silently pick text positions).

    batch: input_ids, attention_mask, labels, position_ids [B, S] int32, plus the stacked image arrays
    (omitted when no row has an image; every row needs one otherwise, see `stack_images`). shapes: n the
    largest number of latents in a row; prefix_len the prefix bucket of p, the common first-latent
    index (S when there are no latents); shared_prefix the largest prefix bucket below it."""
    if not features:
        raise ValueError("collate: empty batch")
    firsts = []
    for i, (ids, labels, _) in enumerate(features):
        if len(ids) != len(labels):
            raise ValueError(f"collate: row {i} has {len(ids)} input ids but {len(labels)} labels")
        firsts.append(ids.index(latent_id) if latent_id in ids else None)
        if image_token_id is not None and firsts[-1] is not None:
            images = sum(1 for t in ids[: firsts[-1]] if t == image_token_id)
            if images < num_selected_patches:
                raise ValueError(f"collate: row {i} has {images} image tokens before its first latent, fewer than "
                                 f"latent.num_selected_patches={num_selected_patches} (patches picked per latent step)")
    with_latents = [f for f in firsts if f is not None]
    p = max(with_latents) if with_latents else 0
    left = [p - f if f is not None else 0 for f in firsts]
    lengths = [pad + len(ids) for pad, (ids, _, _) in zip(left, features)]
    longest = max(lengths)
    s = smallest_bucket(longest, length_buckets)
    if s is None:
        too_long = {i: n for i, n in enumerate(lengths) if n > max(length_buckets)}
        raise ValueError(f"collate: row(s) {sorted(too_long)} are {list(too_long.values())} tokens long (left "
                         f"padding included), longer than the largest length bucket {max(length_buckets)}")
    if with_latents:
        prefix_len = min(smallest_bucket(p, prefix_buckets) or s, s)
    else:
        prefix_len = s
    num_latents = max(sum(1 for t in ids if t == latent_id) for ids, _, _ in features)

    b = len(features)
    input_ids = np.full((b, s), pad_id, np.int32)
    attention_mask = np.zeros((b, s), np.int32)
    labels = np.full((b, s), IGNORE, np.int32)
    position_ids = np.zeros((b, s), np.int32)
    for row, (pad, (ids, lab, _)) in enumerate(zip(left, features)):
        span = slice(pad, pad + len(ids))
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
        labels[row, span] = lab
        position_ids[row, span] = np.arange(len(ids))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "position_ids": position_ids}
    images = [im for _, _, im in features]
    if any(im is not None for im in images):
        missing = [i for i, im in enumerate(images) if im is None]
        if missing:
            raise ValueError(f"collate: rows {missing} have no image while others do")
        batch.update(stack_images(images))
    shared = shared_prefix_bound(prefix_len, prefix_buckets) if num_latents else 0
    return batch, LatentShapes(num_latents, prefix_len, shared)
