"""GSM8K answer parsing and accuracy exactly as HF PEFT's MetaMathQA method comparison scores
them (`method_comparison/MetaMathQA/utils.py`: parse_answer, convert_to_decimal, get_accuracy),
so an accuracy here sits beside PEFT's results; plus an opt-in `lenient` mode that reads
"1,600" as 1600 (PEFT compares such answers as strings, so a reference "#### 1,600" only matches
a prediction that writes the comma too; 14 of the 1,319 test references have one) and takes a
reference's answer from its GSM8K "#### " line (PEFT's first delimiter is "The answer is", which
two train references also contain: train rows 1297 and 5415, neither in the validation rows).

The answer is the text after the last occurrence of the first of `DELIMITERS` found in the
whole text (prompt included), up to the end of its line, stripped of " .!?$%"."""

from __future__ import annotations

import re
from decimal import Decimal, DivisionByZero, InvalidOperation
from typing import Optional, Sequence

DELIMITERS = ("The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ", "#### ")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def parse_answer(text: str) -> Optional[str]:
    """The final-answer string of a generation or a GSM8K/MetaMathQA reference; None without a delimiter."""
    text = text.strip().rstrip(".!?")
    delimiter = next((d for d in DELIMITERS if d in text), None)
    if delimiter is None:
        return None
    answer = text.rpartition(delimiter)[2].strip()
    return answer.split("\n", 1)[0].strip(" .!?$%")


def answer_value(answer: Optional[str], thousands: bool = False) -> Optional[Decimal]:
    """The number an answer string states ("13", "65.33", a fraction "20/14"); None if it is not one.
    thousands=True first drops commas between digit groups ("1,600" -> 1600)."""
    if answer is None:
        return None
    s = _THOUSANDS.sub("", answer.strip()) if thousands else answer.strip()
    try:
        if "/" not in s:
            return Decimal(s)
        parts = s.split("/")
        if len(parts) != 2:
            return None
        denominator = Decimal(parts[1].strip())
        return None if denominator == 0 else Decimal(parts[0].strip()) / denominator
    except (DivisionByZero, InvalidOperation, ValueError):
        return None


def reference_answer(reference: str, lenient: bool = False) -> Optional[str]:
    """A reference's answer string: `parse_answer` (PEFT), or with `lenient` the text after its
    last "#### " when it has one."""
    if lenient and "#### " in reference:
        return parse_answer("#### " + reference.rpartition("#### ")[2])
    return parse_answer(reference)


def is_correct(prediction: str, reference: str, lenient: bool = False) -> bool:
    """Whether `prediction` states the reference's answer: both numbers (compared as floats) or,
    when either is not a number, the same answer strings. A reference without an answer raises."""
    pred_text, ref_text = parse_answer(prediction), reference_answer(reference, lenient)
    if ref_text is None:
        raise ValueError(f"reference has no final answer (none of {DELIMITERS}): {reference!r}")
    pred_num, ref_num = answer_value(pred_text, lenient), answer_value(ref_text, lenient)
    pred = float(pred_num) if pred_num is not None else pred_text
    true = float(ref_num) if ref_num is not None else (ref_text if pred_text is not None else None)
    return pred is not None and true is not None and pred == true


def accuracy(predictions: Sequence[str], references: Sequence[str], lenient: bool = False) -> float:
    """Fraction of predictions that are `is_correct`."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions: {len(predictions)}, but {len(references)} references")
    if not references:
        raise ValueError("accuracy of no predictions")
    return sum(is_correct(p, r, lenient) for p, r in zip(predictions, references)) / len(references)
