"""Datasets -> tokenized examples -> curriculum stages -> batches in the official layout.

    examples, report = load_examples("m3cot", "LightChen2333/M3CoT", "train", processor, "qwen2vl")
    ids, labels = stage_tokens(examples[i], stage, CurriculumConfig(), latent_id)
    batch, shapes = collate([(ids, labels, examples[i].image), ...], latent_id=..., pad_id=eos)

`source` is a hub id (datasets.load_dataset), a folder written by `save_to_disk`, a folder of
parquet / arrow files (one split per file name or sub-folder, e.g. `data/train-00000-of-00001.parquet`,
`train.parquet`, `train/0000.parquet`), or a single parquet / arrow file (then `split` is only a
label). Every (dataset, family) pair works: the dataset decides the prompt text, rationale and
answer; the family decides the image placeholder, chat format and image processing.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
from collections.abc import Iterator
from pathlib import Path

from ..models import family_named
from ..models.common.choices import names
from . import m3cot, scienceqa
from .collate import DEFAULT_LENGTH_BUCKETS, DEFAULT_PREFIX_BUCKETS, LatentShapes, collate, shared_prefix_bound
from .curriculum import CurriculumConfig, epoch_order, num_latents, stage_of_epoch, stage_tokens
from .examples import (
    Example,
    ImageResize,
    open_image,
    LazyImage,
    SkipReport,
    SkipRow,
    cap_steps,
    decode_image,
    encode_text_parts,
    image_bytes,
    content_id,
    make_encoder,
    materialize,
    refuse_image_token,
    split_rationale,
    tokenizer_of,
    unique_ids,
)
from .synthetic import make_synthetic_m3cot, synthetic_corpus, synthetic_rows
from .tokenizer import (SpecialTokens, build_tiny_chameleon_processor, build_tiny_qwen2vl_processor, load_processor,
                        special_tokens)



class Dataset(enum.StrEnum):
    """The datasets whose rows and prompts this package knows (DATASETS: each one's module)."""
    M3COT = "m3cot"
    SCIENCEQA = "scienceqa"


class PromptFormat(enum.StrEnum):
    """The prompts' text (`load_examples`)."""
    TRAIN = "train"  # docs/method.md section 14
    OFFICIAL = "official"  # the official evaluation scripts' prompts (section 21), for evaluation only


DATASETS = {Dataset.M3COT: m3cot, Dataset.SCIENCEQA: scienceqa}
_BATCH = 64

__all__ = [
    "DATASETS", "Dataset", "DataSourceError", "PromptFormat", "DEFAULT_LENGTH_BUCKETS", "DEFAULT_PREFIX_BUCKETS",
    "Example", "SkipReport", "LazyImage", "CurriculumConfig",
    "load_examples", "read_rows", "split_rationale", "materialize", "decode_image", "open_image",
    "stage_of_epoch", "num_latents", "stage_tokens", "epoch_order", "collate", "LatentShapes", "shared_prefix_bound",
    "make_synthetic_m3cot", "synthetic_corpus", "synthetic_rows",
    "build_tiny_qwen2vl_processor", "build_tiny_chameleon_processor", "load_processor", "special_tokens",
    "SpecialTokens",
]


# ---- reading a source -------------------------------------------------------------------------------
class DataSourceError(ValueError):
    """A data source that holds no usable split: a file of another kind, no files or no such split, a
    required column missing (a source that does not exist is a FileNotFoundError)."""


def _split_files(folder: Path, split: str) -> list[str]:
    for ext in ("parquet", "arrow"):
        for pattern in (f"{split}.{ext}", f"{split}-*.{ext}", f"data/{split}.{ext}", f"data/{split}-*.{ext}",
                        f"{split}/*.{ext}", f"*/{split}/*.{ext}", f"*/{split}-*.{ext}"):
            files = sorted(glob.glob(str(folder / pattern)))
            if files:
                return files
    return []


def _open_arrow(path: str):
    import pyarrow as pa

    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all()  # datasets' cache / save_to_disk files
    except pa.ArrowInvalid:
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).read_all()


def _open_files(files: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) if f.endswith(".parquet") else _open_arrow(f) for f in files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _open_source(source: str, split: str):
    """-> a pyarrow Table or a datasets.Dataset holding the split."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".parquet", ".arrow"):
            raise DataSourceError(f"{source}: a single-file source must be .parquet or .arrow")
        return _open_files([str(path)])
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataSourceError(f"{source}: no split {split!r} (splits: {sorted(ds)})")
                ds = ds[split]
            return ds
        files = _split_files(path, split)
        if not files:
            found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
            raise DataSourceError(f"{source}: no parquet/arrow files for split {split!r} "
                             f"(looked for {split}.parquet, {split}-*.parquet, data/{split}-*.parquet, "
                             f"{split}/*.parquet and .arrow; found {found[:10]})")
        return _open_files(files)
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub id owner/name)")
    import datasets

    return datasets.load_dataset(source, split=split)


def _columns(table) -> list[str]:
    return list(table.column_names)


def read_rows(source: str, split: str, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Rows of a split as plain dicts; image cells stay encoded ({"bytes", "path"}). Raises
    DataSourceError naming the first missing required column and the source."""
    table = _open_source(source, split)
    columns = _columns(table)
    for col in required:
        if col not in columns:
            raise DataSourceError(f"{source} (split {split!r}): required column {col!r} is missing "
                             f"(columns: {columns})")
    try:
        import datasets

        is_dataset = isinstance(table, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_dataset = False
    if is_dataset:
        if "image" in columns and isinstance(table.features.get("image"), datasets.Image):
            table = table.cast_column("image", datasets.Image(decode=False))
        for batch in table.iter(batch_size=_BATCH):
            yield from _batch_rows(batch)
    else:
        for record_batch in table.to_batches(max_chunksize=_BATCH):
            yield from _batch_rows(record_batch.to_pydict())


def _batch_rows(batch: dict) -> Iterator[dict]:
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys)):
        yield dict(zip(keys, values))


# ---- rows -> examples ---------------------------------------------------------------------------------
def load_examples(dataset: str, source: str, split: str, processor, family: str, *, max_length: int | None = None,
                  limit: int | None = None, num_image_tokens=None, lazy_images: bool = True,
                  prompt_format: str = "train", image_root: str | Path | None = None,
                  image_resize: ImageResize = ImageResize.SQUARE) -> tuple[list[Example], SkipReport]:
    """Load a split of M3CoT or ScienceQA as tokenized examples for a model family.

    processor: the model folder's processor (Qwen2VLProcessor / ChameleonProcessor; see
    `tokenizer.load_processor`). max_length: the total length cap (default: 3400 for qwen2vl, 1400 for
    chameleon, the official scripts' values); trailing steps that do not fit are dropped, rows whose
    question + answer alone exceed it are skipped ("too_long"). limit: stop after this many kept
    examples (rows in split order). num_image_tokens: qwen2vl, the number of merged image tokens
    of the square resize (default 100 = 280x280); chameleon, the `<image>` run length (default
    processor.image_seq_length). image_resize: "square" (the official fixed square, above) or "processor"
    (Qwen families: the processor's own rules size each image, so rows have their own image token
    counts; `ImageResize`). lazy_images: keep only the encoded image bytes and process them on
    access (a `LazyImage`); False keeps the processed arrays in memory (a dict). prompt_format: "train"
    (docs/method.md section 14, the default for training and evaluation) or "official" (the official evaluation
    scripts' prompts, docs/method.md section 21: M3CoT `A.{...}` options and `Answer:` without a newline; ScienceQA a
    `\nAnswer:` line; Chameleon BOS, image markers before `[Question]:` and the separator after the
    latents in `Example.prompt_suffix`), for evaluation only. image_root: where image path cells may point
    (relative ones are taken from it); default: the source's folder when it is local. Rows whose image is
    outside it, not a regular file, or over MAX_IMAGE_PIXELS are skipped with their reason.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {names(Dataset)}")
    if prompt_format not in set(PromptFormat):
        raise ValueError(f"unknown prompt_format {prompt_format!r}; choose from {names(PromptFormat)}")
    module = DATASETS[dataset]
    encoder = make_encoder(family, processor, num_image_tokens, image_resize)
    tokenizer = tokenizer_of(processor)
    cap = family_named(family).max_length if max_length is None else int(max_length)
    report = SkipReport()
    examples: list[Example] = []
    root = Path(image_root) if image_root is not None else source_folder(source)
    for index, row in enumerate(read_rows(source, split, module.REQUIRED_COLUMNS)):
        if limit is not None and len(examples) >= limit:
            break
        report.rows += 1
        try:
            example, truncated = _row_example(module, row, index, split, encoder, tokenizer, cap, lazy_images,
                                              prompt_format, root)
        except SkipRow as skip:
            report.add(skip.reason)
            continue
        report.truncated += truncated
        examples.append(example)
    report.kept = len(examples)
    unique_ids(examples)
    return examples, report


def source_folder(source: str) -> Path | None:
    """The folder of a local source (image paths are confined to it), None for a hub id."""
    path = Path(source).expanduser()
    return path if path.is_dir() else path.parent if path.is_file() else None


def _row_example(module, row, index, split, encoder, tokenizer, cap, lazy_images,
                 prompt_format: str = "train", root: Path | None = None) -> tuple[Example, bool]:
    text = module.parse_row(row, index, split)
    try:
        data = image_bytes(text.image, root)
        if data is None:
            raise SkipRow("no_image")
        picture = open_image(data)  # the load's one decode: fails early on bytes that are not an image
    except SkipRow:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure is a bad row
        raise SkipRow("unreadable_image", str(err)) from None
    if not text.id:  # no id column: the content's
        rid = content_id(module.NAME, text.question, text.choices, data)
        text = dataclasses.replace(text, id=rid, meta=dict(text.meta, id=rid))
    refuse_image_token(text, encoder.image_token)
    suffix: list[int] = []
    try:
        if prompt_format == "official":
            official_text = module.official_eval_text(text.question, text.choices)
            question_ids, image, suffix = encoder.official_prompt(official_text, picture)
        else:
            question_ids, image = encoder.prompt(module.prompt_text(text.question, text.choices,
                                                                    encoder.image_placeholder), picture)
    except (OSError, SyntaxError) as err:  # PIL's errors for truncated / malformed files
        raise SkipRow("unreadable_image", str(err)) from None
    step_ids, answer_ids = encode_text_parts(tokenizer, text.steps, text.answer)
    keep = cap_steps(len(question_ids), [len(s) for s in step_ids], len(answer_ids), cap)
    if keep is None:
        raise SkipRow("too_long", f"{len(question_ids) + len(answer_ids)} tokens without steps > {cap}")
    truncated = keep < len(step_ids)
    meta = dict(text.meta, num_steps=len(text.steps), steps_kept=keep)
    if lazy_images:
        image = LazyImage(data, encoder.process_image, encoder.image_keys)
    return Example(id=text.id, question_ids=question_ids, step_ids=step_ids[:keep], answer_ids=answer_ids,
                   image=image, meta=meta, prompt_suffix=suffix), truncated
