"""ScienceQA rows (`derek-thomas/ScienceQA`: image, question, choices, answer (int), hint, task, grade,
subject, topic, category, skill, lecture, solution; no id column) -> text pieces
(docs/method.md section 14). A row's id is its content's (`examples.content_id`: question, choices and
image bytes), given by `load_examples` once the image is read.

Prompt (official Chameleon training format; braces literal, no "Answer:" line, no hint):
    [Question]:{<image> x N<question>}\\n[Options]:\\n(A).{<choice>}\\n(B).{<choice>}...
For Qwen2-VL (not in the official code) the same text without the `<image>` run goes in the chat
template's user turn after the image. Rationale: lecture + " " + solution (whichever exist, each
stripped; else the answer), then split as for M3CoT. Answer: the integer index as text.
"""

from __future__ import annotations

from .examples import RowText, SkipRow, checked_choices, option_lines, split_rationale

NAME = "scienceqa"
REQUIRED_COLUMNS = ("question", "choices", "answer", "image")
META_COLUMNS = ("hint", "task", "grade", "subject", "topic", "category", "skill")


def prompt_text(question: str, choices: list[str], image_placeholder: str = "") -> str:
    """The training prompt; a question without choices (asked by a user, never a dataset row) has no
    [Options] block."""
    body = f"{{{(image_placeholder + question).strip()}}}"
    return f"[Question]:{body}" + (f"\n[Options]:\n{option_lines(choices)}" if choices else "")


def official_eval_text(question: str, choices: list[str]) -> str:
    """The official evaluation prompt (docs/method.md section 21): the training options plus a `\nAnswer:` line; the
    image stays outside the text (Chameleon puts it before `[Question]:`)."""
    options = f"[Options]:\n{option_lines(choices)}\n" if choices else ""
    return f"[Question]:{{{question.strip()}}}\n{options}Answer:"


def rationale_of(row: dict, answer: str) -> str:
    """Official: lecture and solution stripped and joined by one space; one of them alone; else the
    answer (official truthiness: a whitespace-only field counts as present)."""
    lecture = row.get("lecture") or ""
    solution = row.get("solution") or ""
    if lecture and solution:
        return (lecture.strip() + " " + solution.strip()).strip()
    if lecture:
        return lecture.strip()
    if solution:
        return solution.strip()
    return answer


def parse_row(row: dict, index: int, split: str) -> RowText:
    choices = checked_choices(row)
    answer = row.get("answer")
    try:
        answer_index = int(answer)
    except (TypeError, ValueError):
        raise SkipRow("bad_answer", f"answer {answer!r}") from None
    if not 0 <= answer_index < len(choices):
        raise SkipRow("bad_answer", f"answer {answer_index} with {len(choices)} choices")
    answer_text = str(answer_index)
    rid = ""  # no id column: load_examples derives it from the content
    meta = {k: row.get(k) for k in META_COLUMNS if k in row}
    meta.update(dataset=NAME, index=index, id=rid, split=split, question=row["question"], choices=choices,
                answer=answer_index, answer_text=answer_text, domain=row.get("subject"))
    return RowText(id=rid, question=row["question"] or "", choices=choices,
                   steps=split_rationale(rationale_of(row, answer_text)), answer=answer_text, image=row["image"],
                   meta=meta)
