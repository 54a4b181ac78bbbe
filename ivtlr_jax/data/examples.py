"""What every dataset turns a row into (docs/method.md section 14), and the rules both datasets share.

- `Example`: one row, tokenized: the prompt up to where latents / steps begin, the reasoning steps,
  the answer, the processed image and the metadata the evaluation needs.
- `SkipReport`: how many rows were dropped, and why.
- `split_rationale`: rationale -> steps (newlines to spaces, split on ". ", at most 3 chunks).
- `cap_steps`: the official length cap (drop trailing steps that do not fit).
- `make_encoder`: the model family's prompt encoder (chat format, image placeholder, image processing),
  which each family keeps in its own `models/<family>/processing.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..models import family_named
from ..models.common.images import (ImageResize, blend_rgba, decode_image, to_rgb,  # noqa: F401 (re-exported)
                                    tokenizer_of)

ANSWER_PREFIX = "Therefore, the answer is "


@dataclasses.dataclass
class Example:
    """One tokenized row. `question_ids` is the whole prompt up to where latents / steps begin (chat
    template included, image placeholder already expanded); each step is tokenized as step + "\\n";
    `answer_ids` is "Therefore, the answer is X" + EOS.

    `image`: Qwen2-VL {"pixel_values": [Np, 1176] float32, "image_grid_thw": [1, 3] int64};
    Chameleon {"pixel_values": [3, H, W] float32}. It is a plain dict, or a `LazyImage` (a read-only
    mapping with the same keys that re-processes the stored image bytes on access, so that a large
    split does not hold every pixel array in memory)."""

    id: str
    question_ids: list[int]
    step_ids: list[list[int]]
    answer_ids: list[int]
    image: Mapping[str, np.ndarray]
    meta: dict
    # tokens that follow the latents in an evaluation prompt (the official Chameleon evaluation format's
    # separator); empty in the training format
    prompt_suffix: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.question_ids) + sum(len(s) for s in self.step_ids) + len(self.answer_ids)


@dataclasses.dataclass
class SkipReport:
    """reason -> number of rows skipped ("no_image", "empty_choices", "bad_answer", "unreadable_image",
    "image_outside_dataset", "image_too_large", "too_many_pixels", "image_token_in_text",
    "too_long"), plus the number of rows read and examples kept."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # kept rows that lost trailing steps to the length cap

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        head = f"{self.rows} rows read, {self.kept} kept, {self.skipped} skipped"
        if self.truncated:
            head += f", {self.truncated} kept with trailing steps dropped to fit the length cap"
        if not self.counts:
            return head
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        reasons = ", ".join(f"{reason}: {n}" for reason, n in ranked)
        return f"{head} ({reasons})"


class SkipRow(Exception):
    """Raised by a dataset's row parser: the row is dropped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class RowText:
    """A row at the text level, before tokenization (what the dataset modules produce)."""

    id: str
    question: str  # raw question (stripped inside the prompt)
    choices: list[str]  # raw choices (each stripped inside the prompt)
    steps: list[str]
    answer: str  # the text after "Therefore, the answer is "
    image: Any  # the raw image cell
    meta: dict


# ---- rationale -> steps ---------------------------------------------------------------------------
def split_rationale(rationale: str) -> list[str]:
    """docs/method.md section 14: newlines to spaces, strip, split on ". ", drop a trailing empty piece; more than 3
    pieces are grouped into exactly 3 consecutive chunks (the first len % 3 chunks one piece longer),
    each re-joined with ". "."""
    steps = rationale.replace("\n", " ").strip().split(". ")
    if steps[-1] == "":
        steps.pop()
    if len(steps) > 3:
        size, extra = divmod(len(steps), 3)
        chunks, start = [], 0
        for i in range(3):
            end = start + size + (1 if i < extra else 0)
            chunks.append(". ".join(steps[start:end]))
            start = end
        steps = chunks
    return steps


def cap_steps(num_question: int, step_lens: list[int], num_answer: int, max_length: int) -> int | None:
    """How many leading steps fit in `max_length` together with the question and the answer (the
    official rule: keep steps in order while they fit, stop at the first that does not); None when
    the question and the answer alone exceed the cap (the row is skipped)."""
    budget = max_length - num_question - num_answer
    if budget < 0:
        return None
    used = 0
    for i, n in enumerate(step_lens):
        if used + n > budget:
            return i
        used += n
    return len(step_lens)


def fewest_image_tokens(examples: list[Example], image_token_id: int) -> tuple[int, str]:
    """(the fewest image tokens of a row's prompt, that row's id): each latent pass inserts K of them, so K above
    it is refused before any work."""
    return min((sum(1 for t in ex.question_ids if t == image_token_id), ex.id) for ex in examples)


def checked_choices(row: dict) -> list[str]:
    """The row's choices as strings; rows without an image or without choices are skipped."""
    if row.get("image") is None:
        raise SkipRow("no_image")
    choices = row.get("choices")
    if not choices:
        raise SkipRow("empty_choices")
    return [str(c) for c in choices]


def option_lines(choices: list[str]) -> str:
    """`(A).{choice}\\n(B).{choice}...`: literal braces, each choice stripped (official training format)."""
    return "\n".join(f"({chr(65 + i)}).{{{c.strip()}}}" for i, c in enumerate(choices))


def choice_letter(answer: Any, num_choices: int) -> str:
    """The answer letter of a row, validated against the number of choices (SkipRow("bad_answer"))."""
    letter = str(answer).strip() if answer is not None else ""
    if len(letter) != 1 or not ("A" <= letter <= "Z") or ord(letter) - 65 >= num_choices:
        raise SkipRow("bad_answer", f"answer {answer!r} with {num_choices} choices")
    return letter


def refuse_image_token(text: RowText, image_token: str) -> None:
    """SkipRow("image_token_in_text") for a row whose question, choices or steps contain the family's image
    token literally (a ScienceQA question with `<image>`): the tokenizer would read it as one more image
    token, which no image fills. Skipped rather than escaped: the tokenizer splits the token off wherever
    it stands, and the official code fails on such a row."""
    for piece in (text.question, *text.choices, *text.steps):
        if image_token in piece:
            raise SkipRow("image_token_in_text", f"{text.id}: the text contains {image_token!r}")


# ---- ids ------------------------------------------------------------------------------------------------
ID_HEX = 16  # hex digits of a content id (64 bits: no collision expected below ~10^9 rows)


def content_id(dataset: str, question: str, choices: list[str], image: bytes) -> str:
    """`<dataset>-<16 hex digits>`: the stable id of a row whose dataset has no id column (ScienceQA), a
    hash of its question, choices and image bytes, so that a reordered or re-split source keeps every
    evaluation record under its own question."""
    key = json.dumps([question, choices, hashlib.sha256(image).hexdigest()], ensure_ascii=False).encode()
    return f"{dataset}-{hashlib.sha256(key).hexdigest()[:ID_HEX]}"


def unique_ids(examples: list[Example]) -> None:
    """Rows that share an id (the same question, choices and image twice) get `#2`, `#3`, ... after the
    first, in row order (a record belongs to one example)."""
    seen: dict[str, int] = {}
    for ex in examples:
        seen[ex.id] = seen.get(ex.id, 0) + 1
        if seen[ex.id] > 1:
            ex.id = f"{ex.id}#{seen[ex.id]}"
            ex.meta["id"] = ex.id


# ---- images ----------------------------------------------------------------------------------------
MAX_IMAGE_PIXELS = 50_000_000  # larger images are skipped ("too_many_pixels"); PIL itself refuses ~179M as a bomb
MAX_IMAGE_BYTES = 256 << 20  # larger files are skipped ("image_too_large") before they are read


def image_bytes(cell: Any, root: Path | None = None) -> bytes | None:
    """Encoded bytes of an image cell: the datasets Image struct {"bytes", "path"}, raw bytes, a file
    path, or a PIL image (re-encoded losslessly as PNG). None when the row has no image. A path is read
    only when it names a regular file, within `root` (the dataset's folder: relative paths are taken from
    it, not from the working directory) when there is one (`read_image_file`)."""
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path"):
            return read_image_file(cell["path"], root)
        return None
    if isinstance(cell, str):
        return read_image_file(cell, root)
    from PIL import Image

    if isinstance(cell, Image.Image):
        buf = io.BytesIO()
        cell.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported image cell of type {type(cell).__name__}")


def read_image_file(path: str, root: Path | None) -> bytes:
    """The bytes of an image file named by a dataset cell; SkipRow when it lies outside `root`, is not a
    regular file (a FIFO or a device would hang or never end), or is over MAX_IMAGE_BYTES."""
    file = Path(path).expanduser()
    if root is not None:
        root = Path(root).resolve()
        file = (file if file.is_absolute() else root / file).resolve()
        if file != root and root not in file.parents:
            raise SkipRow("image_outside_dataset", f"{path} is outside the dataset folder {root}")
    try:
        info = os.stat(file)
    except OSError as err:
        raise SkipRow("unreadable_image", f"{path}: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SkipRow("unreadable_image", f"{path}: not a regular file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise SkipRow("image_too_large", f"{path}: {info.st_size:,} bytes > {MAX_IMAGE_BYTES:,}")
    with open(file, "rb") as f:
        return f.read()


def open_image(data: bytes, max_pixels: int | None = None):
    """Encoded bytes -> the decoded PIL image (`decode_image`: loaded, EXIF orientation applied), decoded
    once, after the size in its header was checked against `max_pixels` (an oversized image is never
    decoded). SkipRow otherwise: "too_many_pixels", or "unreadable_image" (not an image, truncated, corrupt);
    its detail is a sentence a user can read. max_pixels: default MAX_IMAGE_PIXELS."""
    from PIL import Image

    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
        if width * height > max_pixels:
            raise SkipRow("too_many_pixels", f"the image is {width}x{height} = {width * height:,} pixels; "
                                             f"at most {max_pixels:,}")
        return decode_image(data)
    except Image.UnidentifiedImageError:
        raise SkipRow("unreadable_image", "not an image (no image format recognised)") from None
    except Image.DecompressionBombError as err:
        raise SkipRow("too_many_pixels", f"the image is too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated / malformed files
        raise SkipRow("unreadable_image", f"the image cannot be read ({' '.join(str(err).split())[:200]})") from None


class LazyImage(Mapping):
    """A read-only mapping of processed image arrays, computed from the encoded bytes on each access
    (`process(bytes) -> dict`). Holds only the bytes; `dict(lazy)` materialises it."""

    __slots__ = ("_data", "_process", "_keys")

    def __init__(self, data: bytes, process: Callable[[bytes], dict], keys: tuple[str, ...]):
        self._data, self._process, self._keys = data, process, keys

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._process(self._data)[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def materialize(self) -> dict[str, np.ndarray]:
        return self._process(self._data)

    def __repr__(self):
        return f"LazyImage({len(self._data)} bytes, keys={self._keys})"


def materialize(image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All arrays of an image mapping at once (one processing pass for a LazyImage)."""
    return image.materialize() if isinstance(image, LazyImage) else dict(image)


# ---- the families' prompt encoders --------------------------------------------------------------------
def make_encoder(family: str, processor, num_image_tokens=None, image_resize: ImageResize = ImageResize.SQUARE):
    """The prompt encoder of a model family, by its registry name ("qwen2vl", "qwen25vl", "chameleon");
    `image_resize`: the official fixed square or the processor's own rules (`ImageResize`)."""
    return family_named(family).encoder(processor, num_image_tokens, image_resize)


def encode_text_parts(tokenizer, steps: list[str], answer: str) -> tuple[list[list[int]], list[int]]:
    """Steps tokenized as step + "\\n"; answer as "Therefore, the answer is X" + EOS (no special tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    step_ids = [list(tokenizer.encode(s + "\n", add_special_tokens=False)) for s in steps]
    answer_ids = list(tokenizer.encode(ANSWER_PREFIX + answer, add_special_tokens=False)) + [eos]
    return step_ids, answer_ids
