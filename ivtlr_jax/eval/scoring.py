"""Answer extraction and scoring for M3CoT and ScienceQA, exactly as docs/method.md section 18 and the
official evaluation scripts (`qwen_vl/infer.py` for M3CoT, `chameleon/infer_chameleon_scienceqa.py`'s
`extract_answer` for ScienceQA): the same patterns, flags (every one case-insensitive) and order."""

from __future__ import annotations

import re

# the chat template's "assistant" right after the prompt's final "Answer:" (official clean-up, removed with
# the whitespace before it; "assistantship" is left alone)
ASSISTANT_AFTER_ANSWER = re.compile(r"(?<=answer:)\s*(\n+\s*)?assistant\b", re.IGNORECASE)
M3COT_PATTERN = re.compile(r"(?:the\s+answer\s+is|Answer:)\s*[\n\s]*([A-Z])", re.IGNORECASE | re.DOTALL)
STRICT_PATTERN = re.compile(r"the\s+answer\s+is\s*[\n\s]*\(?([A-Z])\b", re.IGNORECASE)
# ScienceQA: tried in this order, the first that matches anywhere wins
SCIENCEQA_DIGIT_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"Therefore,?\s*the\s+answer\s+is\s+(\d)",
    r"the\s+answer\s+is\s+(\d)",
    r"answer\s+is:?\s*(\d)",
)]
SCIENCEQA_LETTER_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"Therefore,?\s*the\s+answer\s+is\s+([A-Z])",
    r"the\s+answer\s+is\s+([A-Z])",
    r"answer\s+is:?\s*([A-Z])",
)]


def m3cot_official_letters(prompt_and_generation: str) -> list[str]:
    """Letters (upper-cased, in order) the official M3CoT scoring considers: every capture of the
    pattern in the decoded prompt plus generation, after removing the word "assistant" that follows
    "Answer:" (the chat template)."""
    text = ASSISTANT_AFTER_ANSWER.sub("", prompt_and_generation)
    return [m.group(1).upper() for m in M3COT_PATTERN.finditer(text)]


def m3cot_official_correct(prompt_and_generation: str, gold: str) -> bool:
    """**quirk** kept for comparison with the paper: the first letter of the generated text is always a
    candidate, since the prompt ends in "Answer:"."""
    return gold.strip().upper() in m3cot_official_letters(prompt_and_generation)


def m3cot_strict_prediction(generation: str) -> str | None:
    """The letter of the last "the answer is X" in the generated text only."""
    found = STRICT_PATTERN.findall(generation)
    return found[-1].upper() if found else None


def scienceqa_prediction(generation: str) -> int:
    """Answer index from the first pattern that matches: the digit patterns, then the letter patterns
    (the letter upper-cased, A=0, B=1, ...); -1 if none."""
    for pattern in SCIENCEQA_DIGIT_PATTERNS:
        m = pattern.search(generation)
        if m:
            return int(m.group(1))
    for pattern in SCIENCEQA_LETTER_PATTERNS:
        m = pattern.search(generation)
        if m:
            return ord(m.group(1).upper()) - ord("A")
    return -1
