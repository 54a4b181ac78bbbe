"""M3CoT rows (`LightChen2333/M3CoT`: id, category, image_id, question, choices, context, answer,
rationale, split, image, domain, topic) -> text pieces (docs/method.md section 14).

Prompt (official training format; the braces are literal):
    [Question]:{<question>}\\n[Options]:\\n(A).{<choice>}\\n(B).{<choice>}...\\nAnswer:\\n
Qwen2-VL puts it in the chat template's user turn after the image; Chameleon (not in the official
code) puts `<image>` x N inside the question's braces, as the official ScienceQA prompt does.
Rationale: newlines to spaces, split on ". ", grouped into at most 3 steps. Answer: the letter.
"""

from __future__ import annotations

from .examples import RowText, checked_choices, choice_letter, option_lines, split_rationale

NAME = "m3cot"
REQUIRED_COLUMNS = ("question", "choices", "answer", "rationale", "image")
META_COLUMNS = ("id", "category", "image_id", "domain", "topic", "context", "split")


def prompt_text(question: str, choices: list[str], image_placeholder: str = "") -> str:
    """The training prompt; a question without choices (asked by a user, never a dataset row) has no
    [Options] block."""
    body = f"{{{(image_placeholder + question).strip()}}}"
    options = f"[Options]:\n{option_lines(choices)}\n" if choices else ""
    return f"[Question]:{body}\n{options}Answer:\n"


def official_eval_text(question: str, choices: list[str]) -> str:
    """The official evaluation prompt (docs/method.md section 21): `A.{choice}` options and no newline after
    `Answer:`; the image stays outside the text."""
    options = "".join(f"{chr(65 + i)}.{{{c.strip()}}}\n" for i, c in enumerate(choices))
    return f"[Question]:{{{question.strip()}}}\n" + (f"[Options]:\n{options}" if choices else "") + "Answer:"


def parse_row(row: dict, index: int, split: str) -> RowText:
    choices = checked_choices(row)
    letter = choice_letter(row.get("answer"), len(choices))
    rid = row.get("id")
    rid = str(rid) if rid not in (None, "") else ""  # none: load_examples derives it from the content
    meta = {k: row.get(k) for k in META_COLUMNS if k in row}
    meta.setdefault("split", split)
    meta.update(dataset=NAME, index=index, id=rid, question=row["question"], choices=choices, answer=letter,
                answer_text=letter, domain=row.get("domain"), topic=row.get("topic"))
    return RowText(id=rid, question=row["question"] or "", choices=choices,
                   steps=split_rationale(row.get("rationale") or ""), answer=letter, image=row["image"], meta=meta)
