"""ivtlr_jax.data: rationale splitting, prompts of both datasets for both families, length caps, bad
rows, sources, the curriculum, the collator layout and the synthetic dataset.

Expected strings and layouts are written by hand from docs/method.md sections 4, 13 and 14 (and the
official scripts they describe), not copied from the code's output."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from ivtlr_jax.data import (
    LatentShapes,
    CurriculumConfig,
    Example,
    LazyImage,
    collate,
    epoch_order,
    load_examples,
    materialize,
    num_latents,
    split_rationale,
    stage_of_epoch,
    stage_tokens,
)
from ivtlr_jax.data.examples import cap_steps, to_rgb
from ivtlr_jax.data.synthetic import COLOURS, make_synthetic_m3cot, synthetic_corpus, synthetic_rows
from ivtlr_jax.data.tokenizer import (
    build_tiny_chameleon_processor,
    build_tiny_qwen2vl_processor,
    load_processor,
    special_tokens,
)

IGNORE = -100
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


# ---- fixtures ------------------------------------------------------------------------------------------
def png(colour=(200, 30, 30), size=(64, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()



def write_m3cot(path, rows: list[dict], drop: tuple[str, ...] = ()):
    """rows (partial dicts) -> a parquet file in M3CoT's schema (datasets features in the metadata)."""
    import datasets
    import pyarrow.parquet as pq

    defaults = dict(id=None, category="c", image_id="i", question="Q?", choices=["a", "b"], context="", answer="A",
                    rationale="R.", split="train", image=None, domain="science", topic="t")
    features = {
        "id": datasets.Value("string"), "category": datasets.Value("string"), "image_id": datasets.Value("string"),
        "question": datasets.Value("string"), "choices": datasets.List(datasets.Value("string")),
        "context": datasets.Value("string"), "answer": datasets.Value("string"),
        "rationale": datasets.Value("string"), "split": datasets.Value("string"), "image": datasets.Image(),
        "domain": datasets.Value("string"), "topic": datasets.Value("string"),
    }
    features = datasets.Features({k: v for k, v in features.items() if k not in drop})
    full = [{**defaults, **r} for r in rows]
    columns = {k: [r[k] for r in full] for k in features}
    pq.write_table(datasets.Dataset.from_dict(columns, features=features).data.table, str(path))
    return path


def write_scienceqa(path, rows: list[dict]):
    import datasets
    import pyarrow.parquet as pq

    defaults = dict(image=None, question="Q?", choices=["a", "b"], answer=0, hint="", task="closed choice",
                    grade="grade3", subject="natural science", topic="physics", category="c", skill="s",
                    lecture="", solution="")
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")), "answer": datasets.Value("int8"),
        "hint": datasets.Value("string"), "task": datasets.Value("string"), "grade": datasets.Value("string"),
        "subject": datasets.Value("string"), "topic": datasets.Value("string"), "category": datasets.Value("string"),
        "skill": datasets.Value("string"), "lecture": datasets.Value("string"), "solution": datasets.Value("string"),
    })
    full = [{**defaults, **r} for r in rows]
    columns = {k: [r[k] for r in full] for k in features}
    pq.write_table(datasets.Dataset.from_dict(columns, features=features).data.table, str(path))
    return path


def img(data: bytes):
    return {"bytes": data, "path": None}


@pytest.fixture(scope="module")
def corpus():
    texts = synthetic_corpus(synthetic_rows(40, 123, "train"))
    return texts + ["Which animal is it? cat dog bird", "The lecture says so. The solution is clear.",
                    "Therefore, the answer is 0 1"]


@pytest.fixture(scope="module")
def qwen_proc(tmp_path_factory, corpus):
    return build_tiny_qwen2vl_processor(tmp_path_factory.mktemp("tiny_qwen_proc"), corpus)


@pytest.fixture(scope="module")
def cham_proc(tmp_path_factory, corpus):
    return build_tiny_chameleon_processor(tmp_path_factory.mktemp("tiny_cham_proc"), corpus)


def enc(proc, text):
    return list(proc.tokenizer.encode(text, add_special_tokens=False))


# ---- rationale -> steps (docs/method.md section 14) --------------------------------------------------------
@pytest.mark.parametrize("rationale, steps", [
    ("", []),
    ("   ", []),
    ("Only one sentence.", ["Only one sentence."]),
    ("One. Two. Three.", ["One", "Two", "Three."]),
    # newlines become spaces before splitting; outer whitespace stripped
    ("  First line.\nSecond line. Third  \n", ["First line", "Second line", "Third"]),
    # a dot without a following space does not split
    ("a.b. c", ["a.b", "c"]),
    # 4 pieces -> 3 chunks of 2, 1, 1 (the first 4 % 3 = 1 chunk gets the extra piece)
    ("A. B. C. D.", ["A. B", "C", "D."]),
    # 5 pieces -> 2, 2, 1
    ("a. b. c. d. e", ["a. b", "c. d", "e"]),
    # 6 pieces -> 2, 2, 2
    ("p1. p2. p3. p4. p5. p6.", ["p1. p2", "p3. p4", "p5. p6."]),
    # 7 pieces -> 3, 2, 2
    ("s1. s2. s3. s4. s5. s6. s7", ["s1. s2. s3", "s4. s5", "s6. s7"]),
    # empty pieces in the middle are kept (only a trailing empty piece is dropped)
    ("A. . B", ["A", "", "B"]),
    ("A. B. .", ["A", "B", "."]),
])
def test_split_rationale(rationale, steps):
    assert split_rationale(rationale) == steps


def test_cap_steps():
    # question 10 + answer 3 = 13; cap 20 leaves 7: the first step (5) fits, the second does not
    assert cap_steps(10, [5, 5, 5], 3, 20) == 1
    assert cap_steps(10, [5, 5, 5], 3, 28) == 3
    assert cap_steps(10, [5, 5, 5], 3, 27) == 2
    assert cap_steps(10, [5, 5, 5], 3, 13) == 0  # exactly question + answer
    assert cap_steps(10, [5, 5, 5], 3, 12) is None  # over the cap without any step: skipped
    # stop at the first step that does not fit, even when a later one would
    assert cap_steps(10, [5, 10, 1], 3, 19) == 1


# ---- prompts for both datasets and both families -----------------------------------------------------------
def test_m3cot_qwen2vl_prompt(tmp_path, qwen_proc):
    rows = [dict(id="m-1", question="  What colour is the cat? ", choices=[" red ", "blue", "green  "], answer="B",
                 rationale="The cat is in the middle.\nIt is blue. So the answer is blue.", image=img(png()))]
    src = write_m3cot(tmp_path / "train.parquet", rows)
    (ex,), report = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", lazy_images=False)
    assert report.rows == 1 and report.kept == 1 and report.counts == {}
    expected = (SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 100 + "<|vision_end|>"
                "[Question]:{What colour is the cat?}\n[Options]:\n(A).{red}\n(B).{blue}\n(C).{green}\nAnswer:\n"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert ex.question_ids == enc(qwen_proc, expected)
    assert ex.step_ids == [enc(qwen_proc, "The cat is in the middle\n"), enc(qwen_proc, "It is blue\n"),
                           enc(qwen_proc, "So the answer is blue.\n")]
    assert ex.answer_ids == enc(qwen_proc, "Therefore, the answer is B") + [qwen_proc.tokenizer.eos_token_id]
    assert qwen_proc.tokenizer.eos_token == "<|im_end|>"
    assert ex.id == "m-1"
    assert ex.meta["answer"] == "B" and ex.meta["choices"] == [" red ", "blue", "green  "]
    assert ex.meta["domain"] == "science" and ex.meta["topic"] == "t"
    # image: resized to 280x280 -> 20x20 patches of 14 (x temporal 2 x 3 channels = 1176 features)
    assert ex.image["image_grid_thw"].tolist() == [[1, 20, 20]]
    assert ex.image["pixel_values"].shape == (400, 1176) and ex.image["pixel_values"].dtype == np.float32


def test_scienceqa_chameleon_prompt(tmp_path, cham_proc):
    rows = [dict(question=" Which animal is it?", choices=["cat ", " dog"], answer=1,
                 lecture="The lecture says so. ", solution=" The solution is clear.", image=img(png()))]
    src = write_scienceqa(tmp_path / "test.parquet", rows)
    (ex,), report = load_examples("scienceqa", str(src), "test", cham_proc, "chameleon", lazy_images=False)
    assert report.kept == 1
    # <image> x N inside the braces before the question; leading space of the question kept (the strip
    # applies to image run + question); no "Answer:" line, no BOS
    expected = "[Question]:{" + "<image>" * 64 + " Which animal is it?}\n[Options]:\n(A).{cat}\n(B).{dog}"
    assert ex.question_ids == enc(cham_proc, expected)
    image_id = cham_proc.tokenizer.convert_tokens_to_ids("<image>")
    assert sum(t == image_id for t in ex.question_ids) == 64
    # rationale = lecture + " " + solution -> "The lecture says so. The solution is clear."
    assert ex.step_ids == [enc(cham_proc, "The lecture says so\n"), enc(cham_proc, "The solution is clear.\n")]
    assert ex.answer_ids == enc(cham_proc, "Therefore, the answer is 1") + [cham_proc.tokenizer.eos_token_id]
    assert re.fullmatch("scienceqa-[0-9a-f]{16}", ex.id) and ex.meta["id"] == ex.id  # from the content
    assert ex.meta["answer"] == 1 and ex.meta["subject"] == "natural science"
    assert ex.image["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= ex.image["pixel_values"].min() and ex.image["pixel_values"].max() <= 1.0


def test_cross_pairs(tmp_path, qwen_proc, cham_proc):
    """Qwen2-VL on ScienceQA and Chameleon on M3CoT: the dataset's text, the family's image and format."""
    sqa = write_scienceqa(tmp_path / "sqa.parquet", [dict(question="Q1?", choices=["x", "y"], answer=0,
                                                          solution="Because.", image=img(png()))])
    (ex,), _ = load_examples("scienceqa", str(sqa), "train", qwen_proc, "qwen2vl")
    expected = (SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 100 + "<|vision_end|>"
                "[Question]:{Q1?}\n[Options]:\n(A).{x}\n(B).{y}<|im_end|>\n<|im_start|>assistant\n")
    assert ex.question_ids == enc(qwen_proc, expected)
    assert ex.step_ids == [enc(qwen_proc, "Because.\n")]
    assert ex.answer_ids[-1] == qwen_proc.tokenizer.eos_token_id

    m3 = write_m3cot(tmp_path / "m3.parquet", [dict(question="Q2?", choices=["x", "y"], answer="A",
                                                    rationale="Look. See.", image=img(png()))])
    (ex,), _ = load_examples("m3cot", str(m3), "train", cham_proc, "chameleon")
    expected = "[Question]:{" + "<image>" * 64 + "Q2?}\n[Options]:\n(A).{x}\n(B).{y}\nAnswer:\n"
    assert ex.question_ids == enc(cham_proc, expected)
    assert ex.step_ids == [enc(cham_proc, "Look\n"), enc(cham_proc, "See.\n")]


def test_official_evaluation_prompts(tmp_path, qwen_proc, cham_proc):
    """--prompt-format official (docs/method.md section 21): M3CoT `A.{...}` options and no newline after `Answer:`
    (Qwen2-VL chat framing); ScienceQA on Chameleon: BOS, <racm3:break>, <image> x N, <eoss> before
    `[Question]:`, a `\nAnswer:` line, and the separator <reserved08706> after the latents."""
    m3 = write_m3cot(tmp_path / "m3.parquet", [dict(question=" Q2? ", choices=[" x", "y "], answer="A",
                                                    rationale="Look. See.", image=img(png()))])
    (ex,), _ = load_examples("m3cot", str(m3), "test", qwen_proc, "qwen2vl", prompt_format="official")
    expected = (SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 100 + "<|vision_end|>"
                "[Question]:{Q2?}\n[Options]:\nA.{x}\nB.{y}\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert ex.question_ids == enc(qwen_proc, expected)
    assert ex.prompt_suffix == []
    (train_ex,), _ = load_examples("m3cot", str(m3), "test", qwen_proc, "qwen2vl")
    assert train_ex.question_ids != ex.question_ids and train_ex.step_ids == ex.step_ids

    sqa = write_scienceqa(tmp_path / "sqa.parquet", [dict(question=" Which animal is it?", choices=["cat ", " dog"],
                                                          answer=1, image=img(png()))])
    (ex,), _ = load_examples("scienceqa", str(sqa), "test", cham_proc, "chameleon", prompt_format="official")
    tok = cham_proc.tokenizer
    ids = lambda *tokens: [tok.convert_tokens_to_ids(t) for t in tokens]
    text = "[Question]:{Which animal is it?}\n[Options]:\n(A).{cat}\n(B).{dog}\nAnswer:"
    assert ex.question_ids[:2] == ids("<s>", "<racm3:break>")
    assert ex.question_ids[2:66] == ids("<image>") * 64 and ex.question_ids[66] == ids("<eoss>")[0]
    assert ex.question_ids[67:] == enc(cham_proc, text)
    assert ex.prompt_suffix == ids("<reserved08706>")
    assert np.array_equal(ex.image["pixel_values"], load_examples("scienceqa", str(sqa), "test", cham_proc,
                                                                  "chameleon")[0][0].image["pixel_values"])
    with pytest.raises(ValueError, match="prompt_format"):
        load_examples("scienceqa", str(sqa), "test", cham_proc, "chameleon", prompt_format="eval")


def test_scienceqa_rationale_fallbacks(tmp_path, cham_proc):
    rows = [dict(solution="Only the solution. Twice.", image=img(png())),
            dict(lecture="Only the lecture.", image=img(png())),
            dict(answer=1, image=img(png())),  # neither: the rationale is the answer
            dict(lecture="  ", solution="", image=img(png()))]  # whitespace lecture counts as present: no step
    src = write_scienceqa(tmp_path / "r.parquet", rows)
    exs, _ = load_examples("scienceqa", str(src), "train", cham_proc, "chameleon")
    assert [len(e.step_ids) for e in exs] == [2, 1, 1, 0]
    assert exs[0].step_ids == [enc(cham_proc, "Only the solution\n"), enc(cham_proc, "Twice.\n")]
    assert exs[1].step_ids == [enc(cham_proc, "Only the lecture.\n")]
    assert exs[2].step_ids == [enc(cham_proc, "1\n")]


def test_lazy_images_match_eager_and_rgba(tmp_path, qwen_proc):
    rgba = png((10, 200, 30, 0), (300, 200), mode="RGBA")  # fully transparent: white after to_rgb
    src = write_m3cot(tmp_path / "i.parquet", [dict(image=img(png((5, 6, 7)))), dict(image=img(rgba))])
    eager, _ = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", lazy_images=False)
    lazy, _ = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl")
    for e, lz in zip(eager, lazy):
        assert isinstance(e.image, dict) and isinstance(lz.image, LazyImage)
        assert sorted(lz.image) == ["image_grid_thw", "pixel_values"]
        for k in e.image:
            np.testing.assert_array_equal(e.image[k], lz.image[k])
        assert lz.question_ids == e.question_ids
    # the transparent image is white: its pixels equal those of a plain white image through the processor
    white = Image.new("RGB", (280, 280), (255, 255, 255))
    ref = qwen_proc.image_processor(images=[white], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(materialize(lazy[1].image)["pixel_values"], ref, atol=1e-6)
    assert to_rgb(Image.open(io.BytesIO(rgba))).getpixel((0, 0)) == (255, 255, 255)


def test_each_image_is_decoded_once_per_use(tmp_path, qwen_proc, cham_proc, image_decodes):
    """Loading decodes each row's image once (its check, its prompt and its processing share the decode),
    and each later use of a lazy image (a batch, an evaluation prompt) decodes it once more."""
    rows = [dict(image=img(png((40 * i, 20, 90), (50 + i, 40)))) for i in range(3)]
    src = write_m3cot(tmp_path / "i.parquet", rows)
    for family, proc in (("qwen2vl", qwen_proc), ("chameleon", cham_proc)):
        image_decodes.clear()
        examples, report = load_examples("m3cot", str(src), "train", proc, family)
        assert report.kept == 3 and len(image_decodes) == 3, (family, image_decodes)
        image_decodes.clear()
        arrays = [materialize(ex.image) for ex in examples[:2]]
        assert len(image_decodes) == 2 and all(a["pixel_values"].size for a in arrays)


def test_official_image_sizes(tmp_path, qwen_proc, corpus):
    """With the real processors' defaults: Qwen2-VL's stock PIL image processor (min 56*56, max
    28*28*1280 pixels) keeps the 280x280 resize -> 100 tokens; Chameleon's stock one gives 512x512
    and the prompt carries 1024 `<image>`."""
    from transformers import ChameleonProcessor, Qwen2VLProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ivtlr_jax.data.tokenizer import build_processor

    stock_qwen = build_processor(Qwen2VLProcessor, image_processor=Qwen2VLImageProcessorPil(),
                                 tokenizer=qwen_proc.tokenizer, video_processor=None,
                                 chat_template=qwen_proc.chat_template)
    big = png((1, 2, 3), (1000, 700))
    src = write_m3cot(tmp_path / "big.parquet", [dict(image=img(big))])
    (ex,), _ = load_examples("m3cot", str(src), "train", stock_qwen, "qwen2vl")
    assert ex.image["image_grid_thw"].tolist() == [[1, 20, 20]]
    image_id = special_tokens(qwen_proc).image_token_id
    assert sum(t == image_id for t in ex.question_ids) == 100

    cham_tok = build_tiny_chameleon_processor(tmp_path / "c", corpus).tokenizer
    stock_cham = ChameleonProcessor(image_processor=ChameleonImageProcessorPil(), tokenizer=cham_tok)
    src = write_scienceqa(tmp_path / "big_sqa.parquet", [dict(image=img(big))])
    (ex,), _ = load_examples("scienceqa", str(src), "train", stock_cham, "chameleon")
    assert ex.image["pixel_values"].shape == (3, 512, 512)
    assert sum(t == cham_tok.convert_tokens_to_ids("<image>") for t in ex.question_ids) == 1024


def test_qwen_num_image_tokens(tmp_path, qwen_proc):
    src = write_m3cot(tmp_path / "n.parquet", [dict(image=img(png()))])
    (ex,), _ = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", num_image_tokens=16)
    image_id = special_tokens(qwen_proc).image_token_id
    assert sum(t == image_id for t in ex.question_ids) == 16
    assert ex.image["image_grid_thw"].tolist() == [[1, 8, 8]]
    with pytest.raises(ValueError, match="perfect square"):
        load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", num_image_tokens=10)


# ---- bad rows, caps, sources ----------------------------------------------------------------------------------
def test_bad_rows_are_counted(tmp_path, qwen_proc):
    long_question = " ".join(["word"] * 400)
    rows = [
        dict(id="ok", image=img(png())),
        dict(id="noimg", image=None),
        dict(id="nochoices", choices=[], image=img(png())),
        dict(id="garbage", image=img(b"this is not an image")),
        dict(id="truncated-png", image=img(png()[:40])),
        dict(id="badanswer", answer="E", choices=["a", "b"], image=img(png())),
        dict(id="toolong", question=long_question, image=img(png())),
        dict(id="ok2", rationale="S1. S2. S3.", image=img(png())),
    ]
    src = write_m3cot(tmp_path / "bad.parquet", rows)
    exs, report = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", max_length=300)
    assert [e.id for e in exs] == ["ok", "ok2"]
    assert report.counts == {"no_image": 1, "empty_choices": 1, "unreadable_image": 2, "bad_answer": 1, "too_long": 1}
    assert report.rows == 8 and report.kept == 2 and report.skipped == 6
    text = str(report)
    assert "8 rows read, 2 kept, 6 skipped" in text and "unreadable_image: 2" in text


def test_image_paths_stay_in_the_dataset_folder_and_name_regular_files(tmp_path, qwen_proc, monkeypatch):
    """Path cells are taken from the dataset's folder, not the working directory; a path outside it, a FIFO
    (which would block the load forever) and an image over the pixel cap are skipped with their reason."""
    import os

    from ivtlr_jax.data import examples as data_examples

    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    os.mkfifo(folder / "images" / "pipe.png")
    (folder / "images" / "huge.png").write_bytes(png(size=(400, 300)))
    monkeypatch.setattr(data_examples, "MAX_IMAGE_PIXELS", 100_000)  # 400 x 300 = 120,000 pixels
    rows = [dict(id="relative", image={"bytes": None, "path": "images/a.png"}),
            dict(id="absolute-inside", image={"bytes": None, "path": str(folder / "images" / "a.png")}),
            dict(id="outside", image={"bytes": None, "path": "../secret.png"}),
            dict(id="outside-absolute", image=str(tmp_path / "secret.png")),
            dict(id="fifo", image={"bytes": None, "path": "images/pipe.png"}),
            dict(id="huge", image={"bytes": None, "path": "images/huge.png"})]
    src = write_m3cot(folder / "train.parquet", rows)
    monkeypatch.chdir(tmp_path / "images" if (tmp_path / "images").exists() else tmp_path)  # not the data folder
    exs, report = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl")
    assert [e.id for e in exs] == ["relative", "absolute-inside"]
    assert report.counts == {"image_outside_dataset": 2, "unreadable_image": 1, "too_many_pixels": 1}


def test_length_cap_drops_trailing_steps(tmp_path, qwen_proc):
    src = write_m3cot(tmp_path / "cap.parquet", [dict(rationale="Alpha beta gamma. Delta epsilon. Zeta.",
                                                      image=img(png()))])
    (full,), _ = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl")
    assert len(full.step_ids) == 3
    q, a, s = len(full.question_ids), len(full.answer_ids), [len(x) for x in full.step_ids]
    # room for the first step and part of the second: only the first is kept
    (ex,), report = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", max_length=q + a + s[0] + s[1] - 1)
    assert ex.step_ids == full.step_ids[:1] and report.truncated == 1 and report.counts == {}
    assert ex.num_tokens <= q + a + s[0] + s[1] - 1
    # exactly question + answer: no step, still kept
    (ex,), _ = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", max_length=q + a)
    assert ex.step_ids == []
    _, report = load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl", max_length=q + a - 1)
    assert report.counts == {"too_long": 1}


def test_missing_column_raises_naming_it(tmp_path, qwen_proc):
    src = write_m3cot(tmp_path / "nocol.parquet", [dict(image=img(png()))], drop=("rationale",))
    with pytest.raises(ValueError, match=r"'rationale'.*") as err:
        load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl")
    assert str(src) in str(err.value)
    src = write_scienceqa(tmp_path / "sqa.parquet", [dict(image=img(png()))])
    with pytest.raises(ValueError, match="rationale"):  # ScienceQA has no rationale column
        load_examples("m3cot", str(src), "train", qwen_proc, "qwen2vl")


def test_sources_and_limit(tmp_path, qwen_proc):
    import datasets

    rows = [dict(id=f"r{i}", image=img(png((i * 20, 0, 0)))) for i in range(5)]
    write_m3cot(tmp_path / "one.parquet", rows)
    # hub-like folder layout: data/<split>-00000-of-00001.parquet
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_m3cot(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", rows[:3])
    write_m3cot(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", rows)
    # save_to_disk folder
    ds = datasets.Dataset.from_parquet(str(tmp_path / "one.parquet"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "saved"))

    ids = lambda exs: [e.id for e in exs]  # noqa: E731
    assert ids(load_examples("m3cot", str(tmp_path / "one.parquet"), "train", qwen_proc, "qwen2vl")[0]) == \
        ["r0", "r1", "r2", "r3", "r4"]
    assert ids(load_examples("m3cot", str(tmp_path / "hub"), "test", qwen_proc, "qwen2vl")[0]) == ["r0", "r1", "r2"]
    assert ids(load_examples("m3cot", str(tmp_path / "saved"), "validation", qwen_proc, "qwen2vl")[0]) == \
        ["r0", "r1", "r2", "r3", "r4"]
    exs, report = load_examples("m3cot", str(tmp_path / "hub"), "train", qwen_proc, "qwen2vl", limit=2)
    assert ids(exs) == ["r0", "r1"] and report.rows == 2
    with pytest.raises(ValueError, match="no parquet/arrow files for split 'validation'"):
        load_examples("m3cot", str(tmp_path / "hub"), "validation", qwen_proc, "qwen2vl")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_examples("m3cot", str(tmp_path / "saved"), "train", qwen_proc, "qwen2vl")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_examples("gqa", str(tmp_path / "one.parquet"), "train", qwen_proc, "qwen2vl")
    with pytest.raises(ValueError, match="unknown model family"):
        load_examples("m3cot", str(tmp_path / "one.parquet"), "train", qwen_proc, "llava")


def test_processor_round_trip(tmp_path, qwen_proc, cham_proc):
    from transformers import Qwen2VLProcessor

    reloaded = load_processor(qwen_proc.tokenizer.name_or_path)
    assert isinstance(reloaded, Qwen2VLProcessor)
    assert reloaded.chat_template == qwen_proc.chat_template
    assert "You are a helpful assistant." in reloaded.chat_template
    text = "[Question]:{What colour is the large circle?}<|image_pad|><|latent|>"
    assert enc(reloaded, text) == enc(qwen_proc, text)
    special = special_tokens(qwen_proc)
    # Qwen2-VL's special tokens in Qwen's order after the learnt vocab, then the latent tokens
    assert [special.pad_token_id + i for i in (0, 2, 3, 4, 5, 6)] == [
        special.pad_token_id, special.eos_token_id, special.vision_start_token_id, special.vision_end_token_id,
        special.image_token_id, special.video_token_id]
    assert (special.start_latent_id, special.end_latent_id, special.latent_id) == tuple(
        special.vocab_size - 3 + i for i in range(3))
    assert 300 <= special.vocab_size <= 1000
    # 280x280 -> 100 image tokens
    out = qwen_proc.image_processor(images=[Image.new("RGB", (280, 280))], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 20, 20]]
    cham = special_tokens(cham_proc)
    assert cham_proc.image_seq_length == 64 and cham.image_token_id is not None and cham.latent_id is not None


# ---- curriculum (docs/method.md section 13) -------------------------------------------------------------------
Q, S1, S2, S3, A = [1, 2, 3, 4], [10, 11], [12], [13, 14, 15], [20, 21, 99]
L, START, END = 50, 51, 52


def toy_example(steps=(S1, S2, S3)):
    return Example(id="toy", question_ids=list(Q), step_ids=[list(s) for s in steps], answer_ids=list(A),
                   image={}, meta={})


def test_stage_of_epoch():
    cfg = CurriculumConfig()
    assert [stage_of_epoch(e, cfg) for e in range(16)] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert stage_of_epoch(5, CurriculumConfig(epochs_per_stage=2)) == 2


def test_stage_tokens_and_labels():
    ex, cfg = toy_example(), CurriculumConfig()
    ids, labels = stage_tokens(ex, 0, cfg, L)
    assert ids == Q + S1 + S2 + S3 + A
    assert labels == [IGNORE] * 4 + S1 + S2 + S3 + A
    assert num_latents(ex, 0, cfg) == 0

    ids, labels = stage_tokens(ex, 1, cfg, L)
    assert ids == Q + [L] + S2 + S3 + A
    assert labels == [IGNORE] * 5 + S2 + S3 + A

    ids, labels = stage_tokens(ex, 3, cfg, L)
    assert ids == Q + [L] * 3 + A and labels == [IGNORE] * 7 + A

    # s > #steps (but <= max_latent_stage): s latents even with fewer steps
    ids, labels = stage_tokens(ex, 5, cfg, L)
    assert ids == Q + [L] * 5 + A and labels == [IGNORE] * 9 + A
    assert num_latents(ex, 5, cfg) == 5

    # stage > max_latent_stage: all steps dropped, max_latent_stage latents (padded) ...
    ids, _ = stage_tokens(ex, 6, cfg, L)
    assert ids == Q + [L] * 5 + A and num_latents(ex, 6, cfg) == 5
    # ... or min(#steps, max_latent_stage) without pad_latent_to_max
    nopad = CurriculumConfig(pad_latent_to_max=False)
    ids, labels = stage_tokens(ex, 6, nopad, L)
    assert ids == Q + [L] * 3 + A and labels == [IGNORE] * 7 + A and num_latents(ex, 6, nopad) == 3
    small = CurriculumConfig(max_latent_stage=2, pad_latent_to_max=False)
    assert stage_tokens(ex, 3, small, L)[0] == Q + [L] * 2 + A
    assert stage_tokens(ex, 2, small, L)[0] == Q + [L] * 2 + S3 + A  # s <= max: only s steps dropped
    # pad_latent_to_max only matters above max_latent_stage
    assert stage_tokens(ex, 2, nopad, L) == stage_tokens(ex, 2, cfg, L)


def test_stage_tokens_with_markers():
    ex, cfg = toy_example(), CurriculumConfig(use_latent_markers=True)
    ids, labels = stage_tokens(ex, 1, cfg, L, START, END)
    assert ids == Q + [START, L, END] + S2 + S3 + A
    assert labels == [IGNORE] * 7 + S2 + S3 + A
    ids, labels = stage_tokens(ex, 0, cfg, L, START, END)
    assert ids == Q + [START, END] + S1 + S2 + S3 + A and labels == [IGNORE] * 6 + S1 + S2 + S3 + A
    with pytest.raises(ValueError, match="start_id and end_id"):
        stage_tokens(ex, 1, cfg, L)


def test_epoch_order():
    a = epoch_order(50, seed=0, epoch=3)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, seed=0, epoch=3))
    assert not np.array_equal(a, epoch_order(50, seed=0, epoch=4))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=3))
    orders = {tuple(epoch_order(20, 7, e)) for e in range(16)}
    assert len(orders) == 16
    assert epoch_order(0, 0, 0).tolist() == []


# ---- collator (docs/method.md section 4) -------------------------------------------------------------------------
PAD = 0


def test_collate_alignment():
    # row 0: question of 5, 2 latents, 3 answer tokens; row 1: question of 8, 1 latent, 2 answer tokens;
    # row 2: no latent, 6 tokens (no left pad, as the official collator)
    r0 = ([5, 6, 7, 8, 9, L, L, 30, 31, 32], [IGNORE] * 7 + [30, 31, 32])
    r1 = ([5, 6, 7, 8, 9, 10, 11, 12, L, 33, 34], [IGNORE] * 9 + [33, 34])
    r2 = ([5, 6, 7, 40, 41, 42], [IGNORE] * 3 + [40, 41, 42])
    batch, shapes = collate([r0 + (None,), r1 + (None,), r2 + (None,)], latent_id=L, pad_id=PAD,
                            length_buckets=(8, 16, 32), prefix_buckets=(4, 12, 20))
    # p = 8 (row 1's first latent); row 0 gets 3 left pads; longest padded row = 13 -> bucket 16
    assert shapes == LatentShapes(2, 12, 4)
    P = PAD
    assert batch["input_ids"].tolist() == [
        [P, P, P, 5, 6, 7, 8, 9, L, L, 30, 31, 32, P, P, P],
        [5, 6, 7, 8, 9, 10, 11, 12, L, 33, 34, P, P, P, P, P],
        [5, 6, 7, 40, 41, 42, P, P, P, P, P, P, P, P, P, P],
    ]
    assert batch["attention_mask"].tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1] * 11 + [0] * 5,
        [1] * 6 + [0] * 10,
    ]
    assert batch["position_ids"].tolist() == [
        [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0],
        list(range(11)) + [0] * 5,
        list(range(6)) + [0] * 10,
    ]
    I = IGNORE  # noqa: E741
    assert batch["labels"].tolist() == [
        [I] * 10 + [30, 31, 32] + [I] * 3,
        [I] * 9 + [33, 34] + [I] * 5,
        [I] * 3 + [40, 41, 42] + [I] * 10,
    ]
    assert all(v.dtype == np.int32 for v in batch.values())
    # the layout the latent loop checks
    from ivtlr_jax.latent import latent_layout

    assert latent_layout(batch["input_ids"], L) == (2, 8)


def test_shared_prefix_bound_is_below_every_batch_p():
    """The trainer's static shared-prefix bound (from the prefix bucket alone) must stay below the
    batch's first-latent index p, whatever p, S and the buckets (also when prefix_len is capped at S)."""
    from ivtlr_jax.data import shared_prefix_bound
    from ivtlr_jax.latent import latent_layout

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        buckets = tuple(sorted(set(rng.integers(2, 40, rng.integers(1, 5)).tolist())))
        question = int(rng.integers(1, 30))
        answer = int(rng.integers(1, 9))
        row = ([5] * question + [L] + [30] * answer, [IGNORE] * (question + 1) + [30] * answer)
        batch, shapes = collate([row + (None,)], latent_id=L, pad_id=PAD, length_buckets=(64,),
                                prefix_buckets=buckets)
        _, p = latent_layout(batch["input_ids"], L)
        bound = shared_prefix_bound(shapes.prefix_len, buckets)
        assert shapes.shared_prefix == bound  # the collator's record carries the bound
        prefix_len = shapes.prefix_len
        assert 0 <= bound < p, (buckets, p, prefix_len, bound)
        seen.add(bound > 0)
    assert seen == {True, False}


def test_collate_matches_oracle_layout():
    """Masks, positions and labels agree with the test oracle's independent collator (tests/oracle_ivtlr.py)."""
    from tests.oracle_ivtlr import latent_batch

    rng = np.random.default_rng(0)
    questions = [list(rng.integers(3, 90, 7)), list(rng.integers(3, 90, 4)), list(rng.integers(3, 90, 9))]
    latents, answers = [2, 3, 0], [4, 1, 3]
    latent = 95  # outside the random ids [3, 90)
    ref = latent_batch(np.random.default_rng(1), questions, latents, answers, latent, 99, 90)
    feats = []
    for row in range(3):
        m = ref["attention_mask"][row].astype(bool)
        feats.append((ref["input_ids"][row][m].tolist(), ref["labels"][row][m].tolist(), None))
    s = ref["input_ids"].shape[1]
    batch, shapes = collate(feats, latent_id=latent, pad_id=0, length_buckets=(s,), prefix_buckets=(9,))
    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        np.testing.assert_array_equal(batch[key], ref[key], err_msg=key)
    assert (shapes.num_latents, shapes.prefix_len) == (3, 9)


def test_collate_buckets_and_errors():
    row = lambda q, m, a: (list(range(1, q + 1)) + [L] * m + [7] * a, [IGNORE] * (q + m) + [7] * a, None)  # noqa: E731
    # no latents: no left pads, prefix_len = S
    batch, shapes = collate([row(5, 0, 3), row(2, 0, 1)], latent_id=L, pad_id=PAD, length_buckets=(4, 8, 12))
    assert batch["input_ids"].shape == (2, 8) and shapes == LatentShapes(0, 8, 0)
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]
    # p beyond every prefix bucket: prefix_len falls back to S; a prefix bucket above S is clamped to S
    _, shapes = collate([row(10, 1, 1)], latent_id=L, pad_id=PAD, length_buckets=(16,), prefix_buckets=(4,))
    assert (shapes.num_latents, shapes.prefix_len) == (1, 16)
    _, shapes = collate([row(10, 1, 1)], latent_id=L, pad_id=PAD, length_buckets=(16,), prefix_buckets=(32,))
    assert shapes.prefix_len == 16
    # exact bucket fit
    batch, _ = collate([row(6, 1, 1)], latent_id=L, pad_id=PAD, length_buckets=(8, 16))
    assert batch["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        collate([row(2, 0, 1), row(20, 1, 1)], latent_id=L, pad_id=PAD, length_buckets=(8, 16))
    # left padding counts toward the length: row 1's 3 left pads push it to 17 > 16
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        collate([row(5, 1, 1), row(2, 1, 13)], latent_id=L, pad_id=PAD, length_buckets=(16,))
    with pytest.raises(ValueError, match="empty batch"):
        collate([], latent_id=L, pad_id=PAD)


def test_collate_images():
    q1 = {"pixel_values": np.ones((400, 1176), np.float32), "image_grid_thw": np.array([[1, 20, 20]], np.int64)}
    q2 = {"pixel_values": np.zeros((16, 1176), np.float32), "image_grid_thw": np.array([[1, 4, 4]], np.int64)}
    feats = [([1, L, 2], [IGNORE, IGNORE, 2], q1), ([1, 2, L, 3], [IGNORE] * 3 + [3], q2)]
    batch, _ = collate(feats, latent_id=L, pad_id=PAD, length_buckets=(8,))
    assert batch["pixel_values"].shape == (416, 1176) and batch["image_grid_thw"].tolist() == [[1, 20, 20], [1, 4, 4]]
    np.testing.assert_array_equal(batch["pixel_values"][:400], 1.0)
    # images of one size: stacked per image [B, Np, 1176], the shape the model reads per-image attention from
    grid = q2["image_grid_thw"]
    same = [(f[0], f[1], {"pixel_values": np.full((16, 1176), float(i), np.float32), "image_grid_thw": grid})
            for i, f in enumerate(feats)]
    batch, _ = collate(same, latent_id=L, pad_id=PAD, length_buckets=(8,))
    assert batch["pixel_values"].shape == (2, 16, 1176) and batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert batch["pixel_values"][1].min() == 1.0
    c = [{"pixel_values": np.full((3, 8, 8), float(i), np.float32)} for i in range(2)]
    batch, _ = collate([(f[0], f[1], im) for f, im in zip(feats, c)], latent_id=L, pad_id=PAD, length_buckets=(8,))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"][1].max() == 1.0
    with pytest.raises(ValueError, match="rows \\[1\\] have no image"):
        collate([feats[0], (feats[1][0], feats[1][1], None)], latent_id=L, pad_id=PAD, length_buckets=(8,))


# ---- the synthetic dataset --------------------------------------------------------------------------------------
def test_synthetic_round_trip(tmp_path, qwen_proc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = make_synthetic_m3cot(tmp_path / "syn", num_train=12, num_test=4, seed=3)
    train = pq.read_table(folder / "train.parquet")
    assert train.column_names == ["id", "category", "image_id", "question", "choices", "context", "answer",
                                  "rationale", "split", "image", "domain", "topic"]
    choices_type = train.schema.field("choices").type
    assert pa.types.is_list(choices_type) and pa.types.is_string(choices_type.value_type)
    rows = train.to_pylist()
    exs, report = load_examples("m3cot", str(folder), "train", qwen_proc, "qwen2vl")
    assert report.kept == 12 and report.counts == {}
    test, _ = load_examples("m3cot", str(folder), "test", qwen_proc, "qwen2vl")
    assert len(test) == 4 and {e.id for e in test}.isdisjoint({e.id for e in exs})
    for ex, row in zip(exs, rows):
        assert ex.id == row["id"] and ex.meta["answer"] == row["answer"]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert 3 <= row["rationale"].count(". ") + 1 <= 5  # 3-5 sentences
        assert len(ex.step_ids) == 3  # grouped into 3 steps
        answer_colour = row["choices"][ord(row["answer"]) - 65]
        assert answer_colour in row["rationale"] and answer_colour in "".join(row["rationale"].split(". ")[-2:])
        # the answer is in the image: the most frequent non-background colour is the answer colour
        pixels = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).reshape(-1, 3)
        counts = {name: int((pixels == np.array(rgb)).all(axis=1).sum()) for name, rgb in COLOURS.items()}
        assert max(counts, key=counts.get) == answer_colour
    # deterministic in the seed
    again = make_synthetic_m3cot(tmp_path / "syn2", num_train=12, num_test=4, seed=3)
    assert pq.read_table(again / "train.parquet").equals(train)
    other = make_synthetic_m3cot(tmp_path / "syn3", num_train=12, num_test=4, seed=4)
    assert not pq.read_table(other / "train.parquet").equals(train)
    # answers are spread over the letters
    letters = [r["answer"] for r in synthetic_rows(200, 0, "train")]
    assert set(letters) == {"A", "B", "C", "D"}


def test_synthetic_end_to_end_batch(tmp_path, qwen_proc):
    """load -> stage tokens -> collate gives a batch in the layout the latent loop wants."""
    from ivtlr_jax.latent import LatentConfig, check_eligible_patches, latent_layout

    folder = make_synthetic_m3cot(tmp_path / "syn", num_train=4, num_test=1, seed=0)
    exs, _ = load_examples("m3cot", str(folder), "train", qwen_proc, "qwen2vl")
    special = special_tokens(qwen_proc)
    feats = [stage_tokens(e, s, CurriculumConfig(), special.latent_id) + (e.image,) for e, s in zip(exs, (0, 1, 2, 6))]
    batch, shapes = collate(feats, latent_id=special.latent_id, pad_id=special.eos_token_id)
    assert shapes.num_latents == 5 and shapes.prefix_len >= max(len(e.question_ids) for e in exs)
    assert latent_layout(batch["input_ids"], special.latent_id) == (5, max(len(e.question_ids) for e in exs[1:]))
    cfg = LatentConfig(latent_token_id=special.latent_id, num_selected_patches=32)
    check_eligible_patches(batch["input_ids"], latent_layout(batch["input_ids"], special.latent_id)[1],
                           special.image_token_id, cfg)
    assert batch["pixel_values"].shape == (4, 400, 1176) and batch["image_grid_thw"].tolist() == [[1, 20, 20]] * 4
    # supervised tokens: steps from the stage on + answer + EOS, per row
    for row, (e, s) in enumerate(zip(exs, (0, 1, 2, 6))):
        kept = sum(len(x) for x in e.step_ids[min(s, len(e.step_ids)):]) + len(e.answer_ids)
        assert int((batch["labels"][row] != IGNORE).sum()) == kept


def test_a_question_with_the_image_token_in_its_text_is_skipped(tmp_path, cham_proc, qwen_proc):
    """A ScienceQA question with a literal `<image>` made the whole load fail (one image token more than the
    run): the row is skipped with its reason, the others load. The same for Qwen's `<|image_pad|>`."""
    rows = [dict(question="What does <image> show?", image=img(png())), dict(question="Q?", image=img(png())),
            dict(question="Q?", choices=["<|image_pad|>", "b"], image=img(png()))]
    src = write_scienceqa(tmp_path / "sqa.parquet", rows)
    examples, report = load_examples("scienceqa", str(src), "test", cham_proc, "chameleon")
    assert [ex.meta["choices"] for ex in examples] == [["a", "b"], ["<|image_pad|>", "b"]]
    assert report.counts == {"image_token_in_text": 1}
    examples, report = load_examples("scienceqa", str(src), "test", qwen_proc, "qwen2vl")
    assert [ex.meta["question"] for ex in examples] == ["What does <image> show?", "Q?"]
    assert report.counts == {"image_token_in_text": 1}


def test_scienceqa_ids_and_the_data_fingerprint_follow_the_content(tmp_path, qwen_proc):
    """ScienceQA has no id column: a row's id comes from its question, choices and image, so it follows the
    row when the source is reordered (ids by position moved them); the same row twice gets `#2`. The
    data's fingerprint sees the order only when asked (training), not the source's name."""
    from ivtlr_jax.data.fingerprint import data_fingerprint

    rows = [dict(question="Q1?", image=img(png())), dict(question="Q2?", image=img(png())),
            dict(question="Q1?", image=img(png((0, 0, 255)))), dict(question="Q1?", image=img(png()))]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = write_scienceqa(tmp_path / "a" / "test.parquet", rows)
    rev = write_scienceqa(tmp_path / "b" / "test.parquet", rows[::-1])
    load = lambda path: load_examples("scienceqa", str(path), "test", qwen_proc, "qwen2vl")[0]
    forward, backward = load(src), load(rev)
    ids = [ex.id for ex in forward]
    assert len(set(ids)) == 4 and ids[3] == ids[0] + "#2" and re.fullmatch("scienceqa-[0-9a-f]{16}", ids[0])
    assert ids[2] != ids[0] and ids[1] != ids[0]  # another image, another question
    same = lambda exs: {ex.id.split("#")[0]: ex.question_ids for ex in exs}
    assert same(forward) == same(backward)
    fp = lambda path, ordered: data_fingerprint("scienceqa", str(path), "test", ordered=ordered)
    assert fp(src, False) == fp(rev, False) and fp(src, True) != fp(rev, True)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert fp(tmp_path / "moved" / "test.parquet", True) == fp(src, True)
