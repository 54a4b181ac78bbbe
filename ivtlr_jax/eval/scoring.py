"""Answer extraction and scoring for M3CoT and ScienceQA, exactly as REFERENCE.md section 4."""

from __future__ import annotations

import re

M3COT_PATTERN = re.compile(r"(?:the\s+answer\s+is|Answer:)\s*[\n\s]*([A-Z])", re.IGNORECASE)
STRICT_PATTERN = re.compile(r"the\s+answer\s+is\s*[\n\s]*\(?([A-Z])\b", re.IGNORECASE)
SCIENCEQA_PATTERNS = [
    re.compile(r"Therefore,?\s*the\s+answer\s+is\s+(\d)"),
    re.compile(r"the\s+answer\s+is\s+(\d)"),
    re.compile(r"answer\s+is:?\s*(\d)"),
    re.compile(r"Therefore,?\s*the\s+answer\s+is\s+([A-Z])"),
    re.compile(r"the\s+answer\s+is\s+([A-Z])"),
    re.compile(r"answer\s+is:?\s*([A-Z])"),
]


def m3cot_official_letters(prompt_and_generation: str) -> list[str]:
    """Letters the official M3CoT scoring considers: every capture of the pattern in the decoded prompt
    plus generation, after removing the word "assistant" that follows "Answer:" (the chat template)."""
    text = re.sub(r"(Answer:\s*)assistant", r"\1", prompt_and_generation)
    return [m.upper() for m in M3COT_PATTERN.findall(text)]


def m3cot_official_correct(prompt_and_generation: str, gold: str) -> bool:
    """**quirk** kept for comparison with the paper: the first letter of the generated text is always a
    candidate, since the prompt ends in "Answer:"."""
    return gold.strip().upper() in m3cot_official_letters(prompt_and_generation)


def m3cot_strict_prediction(generation: str) -> str | None:
    """The letter of the last "the answer is X" in the generated text only."""
    found = STRICT_PATTERN.findall(generation)
    return found[-1].upper() if found else None


def scienceqa_prediction(generation: str) -> int:
    """Answer index from the first pattern that matches (digits, then letters A=0, B=1, ...); -1 if none."""
    for pattern in SCIENCEQA_PATTERNS:
        m = pattern.search(generation)
        if m:
            value = m.group(1)
            return int(value) if value.isdigit() else ord(value) - ord("A")
    return -1
