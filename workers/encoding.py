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
    if start >= 0:
        return start, start + len(want)
    span = _find_ignoring_case(question, want)
    if span is None:
        raise ConstraintNotFound(f"the constraint {want!r} does not occur in the question {question!r}")
    return span


def _find_ignoring_case(question: str, want: str) -> tuple[int, int] | None:
    """Character span in `question` of the first match of `want` up to case, or None.

    Case folding can change a string's length ("İ" folds to two characters), so the search runs on the
    folded question and maps the match back through the character each folded character came from; a match
    must start and end on whole characters of the question.
    """
    pieces = [ch.casefold() for ch in question]
    owner = [i for i, piece in enumerate(pieces) for _ in piece]
    folded, target = "".join(pieces), want.casefold()
    at = folded.find(target)
    while at >= 0:
        end = at + len(target)
        whole_start = at == 0 or owner[at - 1] != owner[at]
        whole_end = end == len(folded) or owner[end] != owner[end - 1]
        if whole_start and whole_end:
            return owner[at], owner[end - 1] + 1
        at = folded.find(target, at + 1)
    return None


def token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Half-open token span covering characters [char_start, char_end) given per-token (start, end) offsets.

    A token belongs to the span when its characters overlap the span's; zero-width tokens (BOS, special
    tokens) never do. Raises ConstraintNotFound when no token overlaps (the sample's fault, not the model's).
    """
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end and e > char_start]
    if not hits:
        raise ConstraintNotFound(f"no token covers characters {char_start}..{char_end} of the prompt")
    return hits[0], hits[-1] + 1
