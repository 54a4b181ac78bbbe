"""What every dataset turns a row into (docs/method.md section 14), and the rules both datasets share.

- `Example`: one row, tokenized: the prompt up to where latents / steps begin, the reasoning steps,
  the answer, the processed image and the metadata the evaluation needs.
- `SkipReport`: how many rows were dropped, and why.
- `split_rationale`: rationale -> steps (newlines to spaces, split on ". ", at most 3 chunks).
- `cap_steps`: the official length cap (drop trailing steps that do not fit).
- the two model families' prompt encoders: Qwen2-VL (chat template, image first, 280x280, the
  processor expands `<|image_pad|>`) and Chameleon (no chat format, `<image>` x N inside the
  question's braces, 512x512 through its image processor).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

FAMILIES = ("qwen2vl", "chameleon")
ANSWER_PREFIX = "Therefore, the answer is "
# docs/method.md section 14: total length caps of the official training scripts (one per model family)
DEFAULT_MAX_LENGTH = {"qwen2vl": 3400, "chameleon": 1400}
# docs/method.md section 2: Qwen2-VL images are resized to 280x280 = 20x20 patches of 14 = 100 merged image tokens
QWEN_IMAGE_TOKENS = 100


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
        self.reason = reason


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


# ---- images ----------------------------------------------------------------------------------------
def image_bytes(cell: Any) -> bytes | None:
    """Encoded bytes of an image cell: the datasets Image struct {"bytes", "path"}, raw bytes, a file
    path, or a PIL image (re-encoded losslessly as PNG). None when the row has no image."""
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path"):
            with open(cell["path"], "rb") as f:
                return f.read()
        return None
    if isinstance(cell, str):
        with open(cell, "rb") as f:
            return f.read()
    from PIL import Image

    if isinstance(cell, Image.Image):
        buf = io.BytesIO()
        cell.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported image cell of type {type(cell).__name__}")


def decode_image(data: bytes):
    """bytes -> PIL image, exactly as `datasets.Image` decodes (load, EXIF orientation applied)."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def to_rgb(image):
    """qwen_vl_utils' conversion: RGBA is composited onto white, everything else converted to RGB."""
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def blend_rgba(image):
    """Chameleon's conversion to RGB: transformers 4.51.3's `ChameleonImageProcessor.blend_rgba`, which the
    official code ran (docs/method.md section 14). Any mode but RGB goes through RGBA; when some alpha is below 255 it
    is blended onto white in float64, (1 - a) * 255 + a * rgb with a = alpha / 255, truncated to uint8
    (this covers RGBA, LA and palette images with transparency alike). The result is a plain RGB image
    without a "transparency" entry, so no processor applies its own alpha handling afterwards."""
    from PIL import Image

    if image.mode == "RGB":
        rgb = np.asarray(image)  # [H, W, 3]; a tRNS colour key is ignored, as 4.51.3 does
    else:
        rgba = np.array(image.convert("RGBA"))  # [H, W, 4] uint8
        if not (rgba[:, :, 3] < 255).any():
            rgb = np.asarray(image.convert("RGB"))
        else:
            alpha = rgba[:, :, 3:] / 255.0  # [H, W, 1] float64
            rgb = ((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb))


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


# ---- the two families' prompt encoders --------------------------------------------------------------
def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


class QwenEncoder:
    """Qwen2-VL: the prompt text is the user turn of the chat template (after its default system
    turn), image first; the image is converted to RGB and resized to side x side (280 = 100 tokens)
    as qwen_vl_utils does, then the processor patchifies it and expands `<|image_pad|>`."""

    family = "qwen2vl"
    image_keys = ("pixel_values", "image_grid_thw")
    image_placeholder = ""  # the image is its own content item, before the text

    def __init__(self, processor, num_image_tokens: int | None = None):
        self.processor = processor
        ip = processor.image_processor
        self.factor = int(ip.patch_size) * int(ip.merge_size)
        n = QWEN_IMAGE_TOKENS if num_image_tokens is None else int(num_image_tokens)
        m = math.isqrt(max(n, 0))
        if n < 1 or m * m != n:
            raise ValueError(f"qwen2vl: num_image_tokens={n} must be a perfect square (a square image of "
                             f"sqrt(n) x sqrt(n) merged patches)")
        self.num_image_tokens = n
        self.side = m * self.factor  # 10 * 28 = 280
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def _resized(self, data: bytes):
        from PIL import Image

        return to_rgb(decode_image(data)).resize((self.side, self.side), Image.Resampling.BICUBIC)

    def process_image(self, data: bytes) -> dict[str, np.ndarray]:
        out = self.processor.image_processor(images=[self._resized(data)], return_tensors="np")
        return {"pixel_values": np.asarray(out["pixel_values"], np.float32),
                "image_grid_thw": np.asarray(out["image_grid_thw"], np.int64)}

    def prompt(self, text: str, data: bytes) -> tuple[list[int], dict[str, np.ndarray]]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = self.processor(text=[chat], images=[self._resized(data)], return_tensors="np")
        ids = [int(t) for t in np.asarray(out["input_ids"])[0]]
        image = {"pixel_values": np.asarray(out["pixel_values"], np.float32),
                 "image_grid_thw": np.asarray(out["image_grid_thw"], np.int64)}
        count = sum(t == self.image_token_id for t in ids)
        if count != self.num_image_tokens:
            raise ValueError(f"qwen2vl: the prompt has {count} image tokens, expected {self.num_image_tokens} "
                             f"(image processor: min/max pixels or patch size do not give a {self.side}x{self.side} "
                             "image its full resolution)")
        return ids, image

    def official_prompt(self, text: str, data: bytes) -> tuple[list[int], dict[str, np.ndarray], list[int]]:
        """The official evaluation prompt has the training format's framing (chat template, image first)."""
        return *self.prompt(text, data), []


class ChameleonEncoder:
    """Chameleon: no chat format; `<image>` x N (N = processor.image_seq_length, 1024 for 7B) sits at
    the start of the question inside its braces; the image goes through the processor's image
    processor (512x512 for 7B) after `blend_rgba` (transformers 4.51.3's alpha blend, whatever
    transformers is installed) and the prompt through the tokenizer without special tokens."""

    family = "chameleon"
    image_keys = ("pixel_values",)

    def __init__(self, processor, num_image_tokens: int | None = None):
        self.processor = processor
        n = getattr(processor, "image_seq_length", 1024) if num_image_tokens is None else int(num_image_tokens)
        self.num_image_tokens = int(n)
        token = getattr(processor, "image_token", "<image>")
        self.image_placeholder = token * self.num_image_tokens
        self.image_token_id = tokenizer_of(processor).convert_tokens_to_ids(token)

    def process_image(self, data: bytes) -> dict[str, np.ndarray]:
        out = self.processor.image_processor(images=[blend_rgba(decode_image(data))], return_tensors="np")
        return {"pixel_values": np.asarray(out["pixel_values"], np.float32)[0]}

    def prompt(self, text: str, data: bytes) -> tuple[list[int], dict[str, np.ndarray]]:
        image = self.process_image(data)
        ids = tokenizer_of(self.processor).encode(text, add_special_tokens=False)
        count = sum(t == self.image_token_id for t in ids)
        if count != self.num_image_tokens:
            raise ValueError(f"chameleon: the prompt has {count} image tokens, expected {self.num_image_tokens} "
                             "(is the image token a special token of the tokenizer?)")
        return list(ids), image

    def official_prompt(self, text: str, data: bytes) -> tuple[list[int], dict[str, np.ndarray], list[int]]:
        """The official evaluation framing (what `ChameleonProcessor` makes of `"<image>" + text + latents`):
        BOS, image start `<racm3:break>`, `<image>` x N, image end `<eoss>`, the text; the processor's
        separator (`<reserved08706>`) follows the latents. -> (ids before the latents, image, [separator])."""
        tok = tokenizer_of(self.processor)
        start = getattr(self.processor, "image_start_token", "<racm3:break>")
        end = getattr(self.processor, "image_end_token", "<eoss>")
        unknown = lambda t: t is None or tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)  # noqa: E731
        missing = [t for t in (start, end, tok.sep_token) if unknown(t)]
        if missing or tok.bos_token_id is None:
            raise ValueError(f"chameleon official prompt format: the tokenizer lacks {missing or ['a BOS token']} "
                             "(image start/end markers, separator)")
        ids = list(tok.encode(start + self.image_placeholder + end + text, add_special_tokens=False))
        ids = [tok.bos_token_id] + ids
        count = sum(t == self.image_token_id for t in ids)
        if count != self.num_image_tokens:
            raise ValueError(f"chameleon: the prompt has {count} image tokens, expected {self.num_image_tokens}")
        return ids, self.process_image(data), [tok.convert_tokens_to_ids(tok.sep_token)]


def make_encoder(family: str, processor, num_image_tokens=None):
    if family == "qwen2vl":
        return QwenEncoder(processor, num_image_tokens)
    if family == "chameleon":
        return ChameleonEncoder(processor, num_image_tokens)
    raise ValueError(f"unknown model family {family!r}; choose from {FAMILIES}")


def encode_text_parts(tokenizer, steps: list[str], answer: str) -> tuple[list[list[int]], list[int]]:
    """Steps tokenized as step + "\\n"; answer as "Therefore, the answer is X" + EOS (no special tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    step_ids = [list(tokenizer.encode(s + "\n", add_special_tokens=False)) for s in steps]
    answer_ids = list(tokenizer.encode(ANSWER_PREFIX + answer, add_special_tokens=False)) + [eos]
    return step_ids, answer_ids
