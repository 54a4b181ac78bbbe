"""Scoring rules of docs/method.md section 18: hand-written generations, and parity with the official
functions (transcribed below from the official scripts) on thousands of generated mixed-case strings."""

import random
import re
from types import SimpleNamespace

from ivtlr_jax.eval.scoring import (m3cot_official_correct, m3cot_official_letters, m3cot_strict_prediction,
                                    scienceqa_prediction)


# ---- OFFICIAL REFERENCE: transcribed as written from FYYDCC/IVT-LR (commit a47db8c); not our code -----------
def official_m3cot_candidates(output_text):
    """qwen_vl/infer.py, evaluate_and_save: the letters of the decoded prompt + generation."""
    cleaned_text = re.sub(
        r'(?<=answer:)\s*(\n+\s*)?assistant\b',
        '',
        output_text,
        flags=re.IGNORECASE
    )
    matches = re.finditer(
        r'(?:the\s+answer\s+is|Answer:)\s*[\n\s]*([A-Z])',
        cleaned_text,
        flags=re.IGNORECASE | re.DOTALL
    )
    candidates = {match.group(1).upper() for match in matches}
    return candidates


def official_m3cot_correct(output_text, gt_answer):
    """qwen_vl/infer.py: `if gt_answer in candidates: correct += 1`."""
    return gt_answer.strip().upper() in official_m3cot_candidates(output_text)


def official_extract_answer(text):
    """chameleon/infer_chameleon_scienceqa.py, extract_answer (logging calls left out)."""
    digit_patterns = [
        r'Therefore,?\s*the\s+answer\s+is\s+(\d)',
        r'the\s+answer\s+is\s+(\d)',
        r'answer\s+is:?\s*(\d)',
    ]

    for pattern in digit_patterns:
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            answer_idx = int(match.group(1))
            return answer_idx

    letter_patterns = [
        r'Therefore,?\s*the\s+answer\s+is\s+([A-Z])',
        r'the\s+answer\s+is\s+([A-Z])',
        r'answer\s+is:?\s*([A-Z])',
    ]

    for pattern in letter_patterns:
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            letter = match.group(1).upper()
            answer_idx = ord(letter) - ord('A')
            return answer_idx

    return -1
# ---- end of the official reference ---------------------------------------------------------------------------


PHRASES = ["Therefore, the answer is", "Therefore the answer is", "the answer is", "The  answer\nis", "answer is:",
           "answer is", "Answer:", "answer:", "assistant", "ASSISTANT", "Assistant", "assistantship",
           "Answer:\nassistant\n", "Answer: assistantship", "[Question]:{Which?}", "[Options]:\n(A).{x}\n(B).{y}",
           "(b)", "Wait,", "so", "because", "."]
FILLERS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdexyz0123456789.,:;()[]{}!?-'\" ") + \
    [" ", " ", "  ", "\n", "\n\n", "\t", "ſ", "ı", "\u212a", "\u0663", "é"]  # long s, dotless i, Kelvin, Arabic 3


def mixed_case(text: str, rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return text
    if kind == 1:
        return text.lower()
    if kind == 2:
        return text.upper()
    return "".join(c.swapcase() if rng.random() < 0.3 else c for c in text)


def random_text(rng: random.Random) -> str:
    """A random composition of answer phrases, "assistant" variants, letters, digits, punctuation and
    whitespace, each piece in random case."""
    pieces = []
    for _ in range(rng.randint(1, 12)):
        piece = rng.choice(PHRASES) if rng.random() < 0.45 else rng.choice(FILLERS)
        pieces.append(mixed_case(piece, rng))
        pieces.append(rng.choice(["", " ", " ", "\n", "  ", ": ", "\n\n "]))
    return "".join(pieces)


def test_parity_with_the_official_functions():
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(5000)]
    lower_capture = assistant_removed = found = 0
    for text in texts:
        official = official_m3cot_candidates(text)
        assert set(m3cot_official_letters(text)) == official, repr(text)
        for gold in ("A", "b", " T ", "S"):
            assert m3cot_official_correct(text, gold) == official_m3cot_correct(text, gold), (repr(text), gold)
        assert scienceqa_prediction(text) == official_extract_answer(text), repr(text)
        # coverage of what the comparison is about
        found += official_extract_answer(text) >= 0
        lower_capture += any(m.group(1).islower() for m in re.finditer(r"answer\s+is:?\s*([A-Z])", text, re.I))
        assistant_removed += re.sub(r"(?<=answer:)\s*(\n+\s*)?assistant\b", "", text, flags=re.I) != text
    assert found > 1000 and lower_capture > 400 and assistant_removed > 300, (found, lower_capture, assistant_removed)


def test_m3cot_official_scoring_counts_the_first_generated_letter():
    prompt = "[Question]:{Which?}\n[Options]:\n(A).{x}\n(B).{y}\nAnswer:\n\nassistant\n"
    generation = "Therefore, the answer is B"
    # "Answer:" then (after removing "assistant") the first generated letter T, then the answer B
    assert m3cot_official_letters(prompt + generation) == ["T", "B"]
    assert m3cot_official_correct(prompt + generation, "B")
    assert m3cot_official_correct(prompt + "A cat sits. Therefore, the answer is B", "A")  # the quirk
    assert not m3cot_official_correct(prompt + "Therefore, the answer is B", "C")


def test_m3cot_official_clean_up_is_case_insensitive_with_a_word_boundary():
    assert m3cot_official_letters("ANSWER:\nASSISTANT\nb") == ["B"]
    assert m3cot_official_letters("answer: Assistant c") == ["C"]
    # "assistantship" is not the word "assistant": the letter after "Answer:" is its "a"
    assert m3cot_official_letters("Answer: assistantship B") == ["A"]
    assert m3cot_official_letters("the answer is d") == ["D"]


def test_m3cot_strict_takes_the_last_stated_answer():
    assert m3cot_strict_prediction("A cat. The answer is C. Wait, the answer is D") == "D"
    assert m3cot_strict_prediction("Therefore, the answer is (b)") == "B"
    assert m3cot_strict_prediction("no answer here") is None


def test_scienceqa_pattern_order():
    assert scienceqa_prediction("Therefore, the answer is 2") == 2
    assert scienceqa_prediction("so the answer is 1 because") == 1
    assert scienceqa_prediction("The answer is: 3") == 3
    assert scienceqa_prediction("Therefore the answer is B") == 1
    assert scienceqa_prediction("answer is: C") == 2
    assert scienceqa_prediction("the answer is 0, not the answer is B") == 0  # digits are tried first
    assert scienceqa_prediction("no idea") == -1


def test_scienceqa_is_case_insensitive():
    assert scienceqa_prediction("therefore, the answer is b") == 1
    assert scienceqa_prediction("Answer is C") == 2
    assert scienceqa_prediction("The Answer Is D") == 3
    assert scienceqa_prediction("THE ANSWER IS 1") == 1
    assert scienceqa_prediction("the answer is probably A") == 15  # "p", upper-cased
    assert scienceqa_prediction("the answer is a") == 0


def test_both_m3cot_scorings_are_reported():
    from ivtlr_jax.eval.run import score

    ex = SimpleNamespace(id="x", meta={"answer": "a", "choices": ["p", "q"], "domain": "d", "topic": "t"})
    prompt = "[Question]:{Q}\n[Options]:\n(A).{p}\n(B).{q}\nAnswer:\nassistant\n"
    record = score("m3cot", ex, prompt, "A step. the answer is b")
    # strict: the stated answer b is wrong; official: the first generated letter "A" counts
    assert (record["gold"], record["prediction"], record["correct"], record["correct_official"]) == \
        ("A", "B", False, True)
    ex = SimpleNamespace(id="y", meta={"answer": 3, "choices": list("pqrs"), "subject": "s", "topic": "t"})
    record = score("scienceqa", ex, "", "so THE ANSWER IS d")
    assert (record["prediction"], record["correct"], record["correct_official"]) == (3, True, True)
