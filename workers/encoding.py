"""Finding the constraint: first in the question's characters, then in the tokenizer's offsets.

The authors join decoded tokens without spaces and search that string, which matches across words, inside
the template, or not at all when a byte token decodes to U+FFFD. We search characters in the question and map
the character span to tokens through the tokenizer's own offset mapping, so the span is exact for any
tokenizer that reports offsets.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConstraintNotFound(ValueError):
    """The constraint is not a substring of its question (a row-level error, never a crash)."""


def find_constraint(question: str, constraint: str) -> tuple[int, int]:
    """Character span [start, end) of `constraint` in `question`: exact first, then ignoring case.

    Whitespace at the ends of the constraint (and a trailing comma, as in some OK-VQA rows) is ignored; a
    constraint holding a newline names several constraints and is rejected, since one trace restores one span.
    """
    want = constraint.strip().rstrip(",").strip()
    if not want:
        raise ConstraintNotFound("the constraint is empty")
    if "\n" in want:
        raise ConstraintNotFound(f"the constraint {constraint!r} holds a newline (several constraints in one row)")
    start = question.find(want)
    if start < 0:
        start = question.lower().find(want.lower())
    if start < 0:
        raise ConstraintNotFound(f"the constraint {want!r} does not occur in the question {question!r}")
    return start, start + len(want)


def token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Half-open token span covering characters [char_start, char_end) given per-token (start, end) offsets.

    A token belongs to the span when its characters overlap the span's; zero-width tokens (BOS, special
    tokens) never do. Raises ValueError when no token overlaps.
    """
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end and e > char_start]
    if not hits:
        raise ValueError(f"no token covers characters {char_start}..{char_end}")
    return hits[0], hits[-1] + 1
