"""The curriculum (docs/method.md section 13): stage s replaces the first s reasoning steps by s latents.

- stage = epoch // epochs_per_stage;
- s <= max_latent_stage: drop the first s steps, put s `<|latent|>` after the question (s latents even
  when the example has fewer steps);
- s > max_latent_stage: drop all steps; max_latent_stage latents (min(#steps, max_latent_stage)
  without pad_latent_to_max);
- labels: -100 on the question and the latents (and the optional markers); the remaining steps, the
  answer and EOS are supervised;
- one seeded permutation of the examples per (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from .examples import Example

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    epochs_per_stage: int = 4
    max_latent_stage: int = 5
    pad_latent_to_max: bool = True
    use_latent_markers: bool = False  # Coconut's <|start-latent|> / <|end-latent|>; off officially

    def __post_init__(self):
        if self.epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage: {self.epochs_per_stage!r} must be >= 1")
        if self.max_latent_stage < 0:
            raise ValueError(f"max_latent_stage: {self.max_latent_stage!r} must be >= 0")


def stage_of_epoch(epoch: int, cfg: CurriculumConfig) -> int:
    return epoch // cfg.epochs_per_stage


def _skip_and_latents(num_steps: int, stage: int, cfg: CurriculumConfig) -> tuple[int, int]:
    if stage < 0:
        raise ValueError(f"curriculum: stage must be >= 0, got {stage}")
    if stage > cfg.max_latent_stage:
        latents = cfg.max_latent_stage if cfg.pad_latent_to_max else min(num_steps, cfg.max_latent_stage)
        return num_steps, latents
    return stage, stage


def num_latents(example: Example, stage: int, cfg: CurriculumConfig) -> int:
    return _skip_and_latents(len(example.step_ids), stage, cfg)[1]


def stage_tokens(example: Example, stage: int, cfg: CurriculumConfig, latent_id: int, start_id: int | None = None,
                 end_id: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of `example` at `stage`:
    question [+ start] + latent x n [+ end] + steps[skip:] + answer (answer ends with EOS)."""
    skip, n = _skip_and_latents(len(example.step_ids), stage, cfg)
    if cfg.use_latent_markers:
        if start_id is None or end_id is None:
            raise ValueError("curriculum: use_latent_markers needs start_id and end_id")
        latent_part = [start_id] + [latent_id] * n + [end_id]
    else:
        latent_part = [latent_id] * n
    prefix = list(example.question_ids) + latent_part
    rest = list(itertools.chain.from_iterable(example.step_ids[skip:])) + list(example.answer_ids)
    return prefix + rest, [IGNORE] * len(prefix) + rest


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in `epoch`: a permutation that depends only on (seed, epoch)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"epoch_order: seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return rng.permutation(num_examples)
