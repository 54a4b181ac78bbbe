"""Scoring rules of REFERENCE.md section 4, on hand-written generations."""

from ivtlr_jax.eval.scoring import (m3cot_official_correct, m3cot_official_letters, m3cot_strict_prediction,
                                    scienceqa_prediction)


def test_m3cot_official_scoring_counts_the_first_generated_letter():
    prompt = "[Question]:{Which?}\n[Options]:\n(A).{x}\n(B).{y}\nAnswer:\n\nassistant\n"
    generation = "Therefore, the answer is B"
    # "Answer:" then (after removing "assistant") the first generated letter T, then the answer B
    assert m3cot_official_letters(prompt + generation) == ["T", "B"]
    assert m3cot_official_correct(prompt + generation, "B")
    assert m3cot_official_correct(prompt + "A cat sits. Therefore, the answer is B", "A")  # the quirk
    assert not m3cot_official_correct(prompt + "Therefore, the answer is B", "C")


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
