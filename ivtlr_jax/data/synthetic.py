"""A small generated dataset in M3CoT's schema (the embedded demo dataset; nothing downloaded).

Each image shows one large shape (square, circle or triangle) and one small shape of another colour
on a plain background; the question asks for the large shape's colour, with 4 colour choices (the
small shape's colour is usually among the distractors). The rationale describes the image step by
step in 3-5 sentences, so it splits into 3-5 pieces and groups into at most 3 steps like M3CoT's.
The answer is readable from the image alone (the mean colour of the large shape's patches), so a
tiny model learns it in minutes.

Columns and types are those of `LightChen2333/M3CoT`: id, category, image_id, question, choices
(list of str), context, answer (letter), rationale, split, image (datasets Image: PNG bytes), domain,
topic. One parquet file per split: `<folder>/train.parquet`, `<folder>/test.parquet`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}


def _draw(draw, shape: str, box: tuple[int, int, int, int], colour):
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _example(rng: np.random.Generator, index: int, split: str, size: int, fixed_choices: bool = False) -> dict:
    from PIL import Image, ImageDraw

    names = list(COLOURS)[:4] if fixed_choices else list(COLOURS)
    colour, small_colour = rng.choice(names, 2, replace=False).tolist()
    shape, small_shape = rng.choice(SHAPES).item(), rng.choice(SHAPES).item()
    background = tuple(int(v) for v in rng.integers(225, 250, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # the large shape inside one quadrant, the small one inside the opposite quadrant (no overlap)
    half = size // 2
    row, col = int(rng.integers(0, 2)), int(rng.integers(0, 2))

    def place(r: int, c: int, side: int) -> tuple[int, int, int, int]:
        x0 = c * half + 2 + int(rng.integers(0, max(half - side - 4, 0) + 1))
        y0 = r * half + 2 + int(rng.integers(0, max(half - side - 4, 0) + 1))
        return x0, y0, x0 + side, y0 + side

    _draw(draw, shape, place(row, col, int(size * rng.uniform(0.36, 0.46))), COLOURS[colour])
    _draw(draw, small_shape, place(1 - row, 1 - col, int(size * rng.uniform(0.12, 0.18))), COLOURS[small_colour])
    buf = io.BytesIO()
    image.save(buf, format="PNG")

    if fixed_choices:
        choices = names
    else:
        others = [c for c in names if c not in (colour, small_colour)]
        if rng.random() < 0.8:  # the small shape's colour is a distractor
            distractors = [small_colour] + rng.choice(others, 2, replace=False).tolist()
        else:
            distractors = rng.choice(others, 3, replace=False).tolist()
        choices = [colour] + distractors
        order = rng.permutation(4)
        choices = [choices[i] for i in order]
    letter = chr(65 + choices.index(colour))
    position = POSITIONS[(row, col)]

    sentences = [f"The image shows a large {shape} and a small {small_shape}.",
                 f"The large {shape} is in the {position} part of the image."]
    if rng.random() < 0.5:
        sentences.append(f"The small {small_shape} is {small_colour}, so it is not the shape in the question.")
    sentences.append(f"The large {shape} is filled with the colour {colour}.")
    if rng.random() < 0.5:
        sentences.append(f"The option that says {colour} is ({letter}).")
    rid = f"synthetic-{split}-{index:05d}"
    return {
        "id": rid,
        "category": "colour",
        "image_id": rid,
        "question": f"What colour is the large {shape}?",
        "choices": choices,
        "context": "",
        "answer": letter,
        "rationale": " ".join(sentences),
        "split": split,
        "image": {"bytes": buf.getvalue(), "path": None},
        "domain": "synthetic",
        "topic": f"colour-of-{shape}",
    }


def synthetic_rows(num: int, seed: int, split: str, image_size: int = 280, fixed_choices: bool = False) -> list[dict]:
    """fixed_choices: every question offers red, green, blue, yellow in that order (the answer letter is
    then a direct function of the image: the easiest variant, for the 2-core demo)."""
    ss = np.random.SeedSequence([int(seed), {"train": 0, "validation": 1, "test": 2}.get(split, 3)])
    rng = np.random.default_rng(ss)
    return [_example(rng, i, split, image_size, fixed_choices) for i in range(num)]


def synthetic_corpus(rows: list[dict]) -> list[str]:
    """Texts to train a tiny tokenizer on: questions, options, rationales, answers."""
    texts = []
    for r in rows:
        texts.append(r["question"])
        texts.extend(r["choices"])
        texts.append(r["rationale"])
        texts.append(f"Therefore, the answer is {r['answer']}")
    texts.append("[Question]:{}\n[Options]:\n(A).{}\n(B).{}\n(C).{}\n(D).{}\nAnswer:\n")
    texts.append("You are a helpful assistant.\nsystem\nuser\nassistant\n")
    return texts


def make_synthetic_m3cot(folder, num_train: int, num_test: int, seed: int, *, image_size: int = 280,
                         fixed_choices: bool = False) -> Path:
    """Write `<folder>/train.parquet` and `<folder>/test.parquet` in M3CoT's schema; return `folder`."""
    import datasets
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "id": datasets.Value("string"),
        "category": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "context": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "rationale": datasets.Value("string"),
        "split": datasets.Value("string"),
        "image": datasets.Image(),
        "domain": datasets.Value("string"),
        "topic": datasets.Value("string"),
    })
    for split, num in (("train", num_train), ("test", num_test)):
        rows = synthetic_rows(num, seed, split, image_size, fixed_choices)
        columns = {name: [r[name] for r in rows] for name in features}
        table = datasets.Dataset.from_dict(columns, features=features).data.table  # schema carries the features
        pq.write_table(table, folder / f"{split}.parquet")
    return folder
