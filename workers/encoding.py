"""Finding the constraint: first in the question's characters, then in the tokenizer's offsets.

The authors join decoded tokens without spaces and search that string, which matches across words, inside
the template, or not at all when a byte token decodes to U+FFFD. We search characters in the question and map
the character span to tokens through the tokenizer's own offset mapping, so the span is exact for any
tokenizer that reports offsets.

The authors' constraints were written by an LLM and are not always verbatim ("this phone" for "What brand of
phone is this?", "bike on the ground" for "... bike is on the ground?"), so `match_constraint` goes on, when
the characters are not there, to the constraint's content words: in order, close together, up to case,
plurals, punctuation and a one-letter typo. The span it returns is always the question's own characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("exact", "case", "words")  # strongest first
CASE_CONFIDENCE = 0.95
WORDS_CONFIDENCE = 0.9  # the ceiling of a word-level match: words were dropped or normalised
TYPO_FACTOR = 0.8  # confidence kept per content word matched only up to a one-letter typo
TYPO_MIN_LETTERS = 5  # shorter words have too many one-letter neighbours ("man" ~ "main", "car" ~ "cat")
WINDOW_SLACK = 4  # a word-level span may hold this many more question words than the constraint has words

# Words that locate or introduce the constraint rather than name it; a question often drops or moves them.
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "these", "that", "those", "it", "its",
    "is", "are", "was", "were", "be", "been", "being", "am",
    "of", "in", "on", "at", "to", "for", "with", "by", "from", "into", "onto", "and", "or",
})
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse",
                     "teeth": "tooth", "feet": "foot", "geese": "goose", "oxen": "ox", "sheep": "sheep"}
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters and digits; an inner apostrophe stays in its word


class ConstraintNotFound(ValueError):
    """The constraint is not a substring of its question (a row-level error, never a crash)."""


@dataclass(frozen=True)
class ConstraintMatch:
    """Where a constraint lies in its question: characters [start, end), how it was found, and how surely.

    `confidence` is 1.0 for an exact match, `CASE_CONFIDENCE` up to case, and for a word-level match
    `WORDS_CONFIDENCE * min(1, constraint words / span words) * TYPO_FACTOR ** typos`: a span no wider than
    the constraint keeps the ceiling, each extra question word inside it and each typo lowers it.
    """

    start: int
    end: int
    method: str
    confidence: float

    def text(self, question: str) -> str:
        return question[self.start:self.end]


@dataclass(frozen=True)
class _Word:
    """One word of a text: its characters [start, end) and its key (case-folded, apostrophes out, singular)."""

    start: int
    end: int
    key: str


def split_constraints(cell: str) -> tuple[str, ...]:
    """The constraints one CSV cell names: lines and ';'-separated parts, stripped of spaces and trailing
    commas, empty ones dropped (a cell ending in blank lines names one constraint, not several)."""
    parts = (part.strip().rstrip(",").strip() for part in re.split(r"[\n;]", cell))
    return tuple(part for part in parts if part)


def find_constraint(question: str, constraint: str) -> tuple[int, int]:
    """Character span [start, end) of `constraint` in `question`: exact first, then ignoring case.

    For callers holding a constraint already in the question's spelling (the datasets rewrite it so), where a
    word-level guess would hide a mistake; see `match_constraint` for a CSV's own constraint.
    """
    match = match_constraint(question, constraint, words=False)
    return match.start, match.end


def match_constraint(question: str, constraint: str, words: bool = True) -> ConstraintMatch:
    """Where `constraint` lies in `question`: exact, else ignoring case, else (with `words`) word by word.

    Whitespace at the ends of the constraint (and a trailing comma, as in some OK-VQA rows) is ignored; a
    constraint holding a newline names several constraints (split them with `split_constraints`) and is
    rejected, since one match is one span.
    """
    want = _cleaned(constraint)
    start = question.find(want)
    if start >= 0:
        return ConstraintMatch(start, start + len(want), "exact", 1.0)
    span = _find_ignoring_case(question, want)
    if span is not None:
        return ConstraintMatch(span[0], span[1], "case", CASE_CONFIDENCE)
    if words:
        return match_words(question, want)
    raise ConstraintNotFound(f"the constraint {want!r} does not occur in the question {question!r}")


def _cleaned(constraint: str) -> str:
    want = constraint.strip().rstrip(",").strip()
    if not want:
        raise ConstraintNotFound("the constraint is empty")
    if "\n" in want:
        raise ConstraintNotFound(f"the constraint {constraint!r} holds a newline (several constraints in one row)")
    return want


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


# ------------------------------------------------------------------------------------------- word level


def match_words(question: str, constraint: str) -> ConstraintMatch:
    """The tightest run of question words holding the constraint's content words in order.

    Content words are the constraint's words less `FUNCTION_WORDS`; words compare by `word_key` (case,
    apostrophes and plurals ignored, so hyphens and punctuation only separate words), or up to one letter
    (`is_typo`) at `TYPO_FACTOR` per such word. The run may span at most the constraint's word count plus
    `WINDOW_SLACK` question words; among runs, fewer typos win, then the narrower, then the earlier.
    """
    said = _words(constraint)
    content = [w.key for w in said if w.key not in FUNCTION_WORDS]
    if not content:
        raise ConstraintNotFound(f"the constraint {constraint!r} has no content words (only "
                                 f"{' '.join(w.key for w in said) or 'punctuation'}), nothing to locate")
    asked = _words(question)
    limit = len(said) + WINDOW_SLACK
    found = [run for i in range(len(asked)) if (run := _run_from(content, asked, i))]
    runs = [(first, last, typos) for first, last, typos in found if last - first < limit]
    if not runs:
        raise ConstraintNotFound(_why_not(question, constraint, content, asked, found, limit))
    typos, width, first = min((typos, last - first, first) for first, last, typos in runs)
    confidence = WORDS_CONFIDENCE * min(1.0, len(said) / (width + 1)) * TYPO_FACTOR ** typos
    return ConstraintMatch(asked[first].start, asked[first + width].end, "words", confidence)


def _run_from(content: list[str], asked: list[_Word], first: int) -> tuple[int, int, int] | None:
    """(first, last, typos) of the earliest in-order match of `content` whose first word is question word
    `first` (the earliest is also the narrowest from there), or None."""
    if not _same(content[0], asked[first].key):
        return None
    at, typos = first, int(content[0] != asked[first].key)
    for key in content[1:]:
        at = next((j for j in range(at + 1, len(asked)) if _same(key, asked[j].key)), -1)
        if at < 0:
            return None
        typos += key != asked[at].key
    return first, at, typos


def _why_not(question: str, constraint: str, content: list[str], asked: list[_Word],
             found: list[tuple[int, int, int]], limit: int) -> str:
    """The failure's message: the words not found anywhere, else whether order or distance fails."""
    head = f"the constraint {constraint!r} does not occur in the question {question!r}"
    missing = [key for key in content if not any(_same(key, w.key) for w in asked)]
    if missing:
        words = f"do its words {', '.join(map(repr, missing))}" if len(missing) > 1 else f"does its word {missing[0]!r}"
        return f"{head}, nor {words} (up to case, plurals and one-letter typos)"
    words = ", ".join(map(repr, content))
    if found:
        wide = min(last - first + 1 for first, last, _ in found)
        return f"{head}; its words {words} do, in order, but across {wide} question words (at most {limit})"
    return f"{head}; its words {words} do, but not in this order"


def _words(text: str) -> list[_Word]:
    return [_Word(m.start(), m.end(), word_key(m.group())) for m in _WORD.finditer(text)]


def word_key(word: str) -> str:
    """A word as matching sees it: case-folded, apostrophes removed ("dog's" ~ "dogs"), singular."""
    return lemma(word.casefold().replace("'", "").replace("’", ""))


def lemma(word: str) -> str:
    """The singular of a plural noun by a few suffix rules (elephants, boxes, puppies, glasses); both sides
    of a comparison pass through it, so a rule that mangles a word ("houses" -> "hous") still matches it."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def _same(want: str, seen: str) -> bool:
    """Whether a constraint's content word matches a question's word; a function word of the question is
    never a typo of a content word ("there" is not "these")."""
    if want == seen:
        return True
    return len(want) >= TYPO_MIN_LETTERS and seen not in FUNCTION_WORDS and is_typo(want, seen)


def is_typo(a: str, b: str) -> bool:
    """Whether `a` and `b` differ by exactly one letter added, dropped, changed, or two neighbours swapped
    ("eleiphant" ~ "elephant", "vechicle" ~ "vehicle", "backhround" ~ "background")."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if len(a) != len(b):
        return a[i + (len(a) > len(b)):] == b[i + (len(b) > len(a)):]
    return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])


def token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Half-open token span covering characters [char_start, char_end) given per-token (start, end) offsets.

    A token belongs to the span when its characters overlap the span's; zero-width tokens (BOS, special
    tokens) never do. Raises ConstraintNotFound when no token overlaps (the sample's fault, not the model's).
    """
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end and e > char_start]
    if not hits:
        raise ConstraintNotFound(f"no token covers characters {char_start}..{char_end} of the prompt")
    return hits[0], hits[-1] + 1
