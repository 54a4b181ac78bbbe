"""Ask a model folder about your own image: one question (with or without choices) or many, batched.

    from ivtlr_jax.predict import Predictor, Question

    predictor = Predictor.from_folder("outputs/tiny/runs/tiny/stage_3")
    [answer] = predictor.predict([Question("photo.png", "What colour is the square?", ["red", "blue"])])
    answer.answer, answer.text, answer.selected_patches  # "B", the generated text, patches per latent step

A folder is asked the way its model was trained or imported: the prompt of its dataset (M3CoT's or
ScienceQA's text, in the training or the official evaluation format, the family's chat template and image
processing: the code that builds `infer.py`'s prompts), its number of latents, K, patch order, RoPE, dtype
and image sizing (`config.InferenceSettings`), read from the folder's `ivtlr_settings.json` (stage exports
and official imports hold one), else from the training run a stage export sits in, else the defaults; any
of them overridable. So a dataset row asked here gets exactly the tokens `infer.py` generates for it.

Prompts decode by continuous batching (`continuous.generate_continuous`, as evaluation does; `from_folder(devices=N)`
splits the slots over N local devices). The
server (`serve/`) builds on the same pieces: `encode` a question, start and decode it in its own slots, and
`answer_of` its tokens.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from .config import InferenceSettings, load_config
from .continuous import generate_continuous
from .data import DATASETS, load_processor, make_encoder, special_tokens, tokenizer_of
from .data.collate import EVAL_LENGTH_BUCKETS, stack_images
from .data.examples import MAX_IMAGE_PIXELS, SkipRow, image_bytes, open_image
from .decoding import SamplingConfig
from .eval.run import image_patches, left_pad
from .eval.scoring import m3cot_strict_prediction, scienceqa_prediction
from .io import from_pretrained, resolve_folder
from .io.settings_file import read_settings
from .latent import LatentConfig
from .models import ShardingRules, family_named, read_config
from .models.common.sharding import local_data_mesh
from .run_folder import RunFolder

DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS  # images over this many pixels are refused, as datasets' rows are skipped
MAX_CHOICES = 26  # letters A-Z
FREE_ANSWER = re.compile(r"the\s+answer\s+is\s*:?\s*(.+?)\s*(?:\.\s|\.$|\n|$)", re.IGNORECASE)


class RequestError(ValueError):
    """A question the model cannot be asked (not an image, an empty question, a prompt over the cap, ...);
    the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Question:
    image: str | os.PathLike | bytes | object  # a path, encoded bytes or a PIL image
    question: str
    choices: Sequence[str] | None = None


@dataclasses.dataclass
class Answer:
    text: str  # the generated text (special tokens removed)
    answer: str | None  # with choices: the letter chosen (None if none is named); without: the text after
    # "the answer is", if the model wrote it
    selected_patches: list[list[int]]  # per latent step, the patches inserted (indices into the image's
    # patch grid, row-major), in insertion order
    patch_grid: tuple[int, int]  # (rows, columns) of the image's patches
    prompt_tokens: int
    generated_tokens: int  # before EOS
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    tokens: list[int]  # the generated ids, EOS included when there is one


@dataclasses.dataclass
class Encoded:
    """A question as the model reads it: a left-padded batch of one (as `infer.py` pads it)."""
    prompt: dict  # input_ids, attention_mask, position_ids [1, T] and the image arrays
    question_ids: list[int]  # the prompt up to the latents (chat template, image tokens)
    pad: int  # left pads in `prompt`
    image: dict  # the processed image arrays
    data: bytes  # the encoded image
    question: Question

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt["attention_mask"].sum())


class Predictor:
    """A model folder ready to answer questions about images (`from_folder`)."""

    def __init__(self, model, processor, family: str, settings: InferenceSettings, folder: Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS, rules: ShardingRules | None = None):
        self.model, self.processor, self.family, self.settings, self.folder = model, processor, family, settings, folder
        self.rules = rules  # the mesh the parameters are replicated on; decoding slots split over it (None: one device)
        self.max_pixels = max_pixels
        self.tokenizer = tokenizer_of(processor)
        self.special = special_tokens(processor)
        if self.special.latent_id is None:
            raise RequestError(f"{folder}: its tokenizer has no <|latent|> token; give an IVT-LR model folder (a "
                               "stage export, ivtlr-convert-official's output)")
        self.encoder = make_encoder(family, processor, image_resize=settings.image_resize)
        self.latent = LatentConfig(self.special.latent_id, settings.num_selected_patches, settings.patch_order,
                                   rope=settings.rope, patch_deepstack=settings.patch_deepstack)
        self.max_length = family_named(family).max_length

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, devices: int = 1,
                    **overrides) -> "Predictor":
        """Load a model folder (a stage export, a converted or Hugging Face folder with the latent tokens, the
        official import's output; or a hub id) with its settings, `overrides` replacing any of them
        (`InferenceSettings` fields: num_latents=2, dtype="float32", ...). devices > 1: the parameters are
        replicated on this process's first `devices` devices and the decoding slots split over them."""
        rules = ShardingRules(local_data_mesh(devices)) if devices > 1 else None  # (refused before loading)
        folder = resolve_folder(path)
        family = read_config(folder)[0].name
        settings = dataclasses.replace(folder_settings(folder, family), **overrides)
        dtype = jnp.dtype(settings.dtype)
        model = from_pretrained(folder, dtype=dtype, param_dtype=dtype, rules=rules)
        return cls(model, load_processor(folder), family, settings, folder, max_pixels, rules)

    def sampling(self, max_new_tokens: int | None = None, temperature: float = 0.0) -> SamplingConfig:
        eos = self.special.eos_token_id
        return SamplingConfig(max_new_tokens or self.settings.max_new_tokens, temperature, eos_token_id=eos,
                              pad_token_id=eos)

    def predict(self, questions: Question | Sequence[Question], *, max_new_tokens: int | None = None,
                batch_size: int = 8) -> Answer | list[Answer]:
        """Answer one question (-> an Answer) or many (-> a list, in order), `batch_size` decoding together."""
        single = isinstance(questions, Question)
        encoded = [self.encode(q) for q in ([questions] if single else questions)]  # every one checked first
        answers: list[Answer | None] = [None] * len(encoded)
        sampling = self.sampling(max_new_tokens)
        for index, row in generate_continuous(self.model, (e.prompt for e in encoded), self.latent, sampling,
                                              slots=batch_size, rules=self.rules):
            answers[index] = self.answer_of(encoded[index], row.tokens, row.length, row.selected, sampling)
        return answers[0] if single else answers

    def encode(self, q: Question) -> Encoded:
        """The question's prompt, as evaluation builds a dataset row's; RequestError for what cannot be asked."""
        question = q.question.strip() if isinstance(q.question, str) else ""
        if not question:
            raise RequestError("the question is empty")
        choices = check_choices(q.choices)
        data, picture = checked_image(q.image, self.max_pixels)
        text_of = DATASETS[self.settings.dataset]
        if self.settings.prompt_format == "official":
            question_ids, image, suffix = self.encoder.official_prompt(text_of.official_eval_text(question, choices),
                                                                       picture)
        else:
            text = text_of.prompt_text(question, choices, self.encoder.image_placeholder)
            (question_ids, image), suffix = self.encoder.prompt(text, picture), []
        image_tokens = sum(1 for t in question_ids if t == self.model.config.image_token_id)
        if self.settings.num_latents and image_tokens < self.latent.num_selected_patches:
            raise RequestError(f"the image gives {image_tokens} image tokens, fewer than the "
                               f"{self.latent.num_selected_patches} patches each latent step inserts (K); ask with a "
                               f"smaller num_selected_patches or a larger image")
        prompt = question_ids + [self.latent.latent_token_id] * self.settings.num_latents + suffix
        if len(prompt) > self.max_length:
            raise RequestError(f"the prompt is {len(prompt)} tokens (image, question, choices and latents); this "
                               f"model's cap is {self.max_length}")
        input_ids, mask, positions = left_pad([prompt], self.special.eos_token_id, EVAL_LENGTH_BUCKETS)
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **stack_images([image])}
        return Encoded(batch, question_ids, input_ids.shape[1] - len(prompt), image, data, q)

    def answer_of(self, enc: Encoded, tokens: np.ndarray, length: int, selected: np.ndarray,
                  sampling: SamplingConfig) -> Answer:
        """The Answer of a question's generated tokens [max_new_tokens] (`length` before EOS) and selected
        positions [c, K] of its padded prompt."""
        tokens = [int(t) for t in np.asarray(tokens)[:min(length + 1, sampling.max_new_tokens)]]
        text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
        steps, grid = self.patches(enc, selected)
        return Answer(text, parse_answer(text, enc.question.choices, self.settings.dataset), steps, grid,
                      enc.prompt_tokens, int(length), "stop" if length < sampling.max_new_tokens else "length", tokens)

    def patches(self, enc: Encoded, selected: np.ndarray) -> tuple[list[list[int]], tuple[int, int]]:
        """Selected positions [c, K] of a question's padded prompt -> (per latent step the image patches
        inserted, the image's patch grid (rows, columns))."""
        steps = image_patches(enc.question_ids, self.model.config.image_token_id, np.asarray(selected) - enc.pad)
        grid, _ = family_named(self.family).picture_geometry(enc.image)
        return steps, tuple(grid)

    def picture(self, enc: Encoded, answer: Answer, path: str | os.PathLike) -> Path:
        """Draw the patches chosen at each latent step on the image as the model saw it (a PNG at `path`)."""
        from .eval.viz import draw_selection, picture_as_seen

        grid, size = family_named(self.family).picture_geometry(enc.image)
        picture = picture_as_seen(enc.data, size)
        q = enc.question
        draw_selection(picture, grid, answer.selected_patches, question=q.question,
                       choices=list(q.choices) if q.choices else None, prediction=answer.answer,
                       generated=answer.text, ranked=self.settings.patch_order == "score").save(path)
        return Path(path)


def folder_settings(folder: Path, family: str) -> InferenceSettings:
    """A model folder's settings: its settings file; for a stage export without one, its training run's
    config; else the defaults (K as the official setup of the family)."""
    settings = read_settings(folder)
    if settings is not None:
        return settings
    of_run = RunFolder.of_stage_export(folder.resolve())
    if of_run is not None:
        return InferenceSettings.from_run(load_config(of_run[0].config_file, training=False))
    return InferenceSettings(num_selected_patches=family_named(family).official_shapes["patches"])


def check_choices(choices) -> list[str]:
    if choices is None:
        return []
    if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
        raise RequestError("choices must be a list of strings")
    choices = list(choices)
    if len(choices) > MAX_CHOICES:
        raise RequestError(f"{len(choices)} choices; at most {MAX_CHOICES} (A-Z)")
    empty = [i for i, c in enumerate(choices) if not c.strip()]
    if empty:
        raise RequestError(f"choice {chr(65 + empty[0])} is empty")
    return choices


def checked_image(image, max_pixels: int):
    """An image (path, bytes or PIL image) -> (its encoded bytes, the decoded PIL image), decoded once and
    refused (RequestError) when it cannot be read: no such file, not an image, truncated, over
    `max_pixels` pixels (`data.examples.open_image`)."""
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str) and not Path(image).is_file():
        raise RequestError(f"{image}: no such image file")
    try:
        data = image_bytes(image)
    except TypeError as err:
        raise RequestError(str(err)) from None
    if not data:
        raise RequestError("the image is empty")
    try:
        return data, open_image(data, max_pixels)
    except SkipRow as problem:
        raise RequestError(problem.detail) from None


def parse_answer(text: str, choices: Sequence[str] | None, dataset: str) -> str | None:
    """With choices: the letter the text names, as the dataset's scoring reads it (M3CoT: the last "the answer
    is X"; ScienceQA: its patterns, an index or a letter), None when none or one out of range. Without: what
    follows the last "the answer is", to the end of its sentence or line."""
    if choices:
        if dataset == "scienceqa":
            index = scienceqa_prediction(text)
            return chr(65 + index) if 0 <= index < len(choices) else None
        letter = m3cot_strict_prediction(text)
        return letter if letter is not None and ord(letter) - 65 < len(choices) else None
    found = FREE_ANSWER.findall(text)
    return found[-1] if found else None
