"""VQA-Constraints (Basu et al. 2024): the authors' three CSVs turned into `Sample`s.

Every CSV row becomes exactly one Sample, in file order, with the CSV's own row id in its sample id
(`okvqa/14`), so ids stay stable when rows are filtered, limited or fixed upstream. A row that cannot be
traced (constraint not in the question, empty field, missing image, ...) is not dropped and never raises:
it carries `Sample.error`, a message naming the row, the reason and what to do, so a run records it and goes
on. Only file-level problems (a CSV missing, columns wrong) raise `DatasetError`, since then nothing can be
loaded at all.

Images are not shipped with the CSVs (COCO val2014 for OK-VQA, a Google Drive folder for Known and Movies),
so the caller names one folder per subset; without one, every image of that subset counts as missing.
"""

from __future__ import annotations

import _csv
import csv
import errno
import io
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mmtrace.workers.encoding import METHODS, ConstraintMatch, ConstraintNotFound, match_constraint, split_constraints
from mmtrace.workers.spec import BLANK_IMAGE, Sample

SUBSETS = ("okvqa", "multimodal_known", "multimodal_movies")

# Columns after the unnamed row-id column; the extra column goes into `meta` (no CSV has an answer).
COLUMNS = {
    "okvqa": ("question", "main_entity", "image_url"),
    "multimodal_known": ("question", "subject", "main_entity", "image_url"),
    "multimodal_movies": ("question", "director", "main_entity", "image_url"),
}
META_COLUMNS = {"okvqa": (), "multimodal_known": ("subject",), "multimodal_movies": ("director",)}

# Row counts of the authors' released files: okvqa.csv has ids 0..5045 with 3188 absent, 9,463 rows in all
# (the paper says 9.7K).
EXPECTED_ROWS = {"okvqa": 5045, "multimodal_known": 1204, "multimodal_movies": 3214}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MISSING_IMAGE_POLICIES = ("error", "blank")
SOURCE_URL = "https://github.com/microsoft/MLLMInterpret/tree/main/data_constraints"


class DatasetError(ValueError):
    """A dataset cannot be loaded at all (file missing, wrong columns, bad arguments): fix and rerun."""


def default_data_dir() -> Path:
    """Where `mmtrace data download` puts the CSVs: $MMTRACE_CACHE/vqa_constraints or ~/.cache/mmtrace/...."""
    cache = os.environ.get("MMTRACE_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "mmtrace"
    return base / "vqa_constraints"


def csv_path(root: str | Path, subset: str) -> Path:
    return Path(root).expanduser() / f"{subset}.csv"


# ---------------------------------------------------------------------------------------------- reading CSVs


@dataclass(frozen=True)
class Row:
    """One CSV record as read: `line` is the record's first physical line (fields may span lines)."""

    subset: str
    line: int
    fields: dict[str, str]

    @property
    def row_id(self) -> str:
        return self.fields.get("", "").strip()


def read_rows(root: str | Path, subset: str) -> list[Row]:
    """Parse one subset's CSV, raising DatasetError when the file is absent, not UTF-8 text, not parseable or
    without the authors' columns. A BOM and CRLF line ends are read as the authors' files have them."""
    path = csv_path(root, subset)
    if not path.is_file():
        raise DatasetError(
            f"{path}: not found. Run `mmtrace data download --out {Path(root).expanduser()}` or download "
            f"{subset}.csv by hand from {SOURCE_URL} into that folder."
        )
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader, [])
        _check_header(path, subset, header)
        return [Row(subset, line, _record_fields(header, record)) for line, record in _records(reader)]
    except csv.Error as exc:
        raise DatasetError(f"{path}: line {reader.line_num}: {exc}; fix that line of the file") from exc


def _read_text(path: Path) -> str:
    """The file's text, a UTF-8 BOM dropped; other encodings are refused with the line of the first bad byte,
    since guessing one would change questions silently."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}: line {line} is not UTF-8 text ({exc.reason}, byte {data[exc.start]:#04x}); "
                           f"save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from exc


def _records(reader: _csv.Reader) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, fields) per record. A blank line (or one of only commas and spaces) holds no
    record, so it is skipped rather than reported as a row with every field empty."""
    line = reader.line_num + 1
    for record in reader:
        if any(field.strip() for field in record):
            yield line, record
        line = reader.line_num + 1


def _check_header(path: Path, subset: str, header: list[str]) -> None:
    """The unnamed row-id column first and each of the subset's columns once, in any order. Other columns are
    ignored, so a copy of the file with a column added (an answer, a note) still loads."""
    want = ["", *COLUMNS[subset]]
    names = [h.strip() for h in header]
    problems = [f"no column {c!r}" for c in COLUMNS[subset] if c not in names]
    problems += [f"column {c!r} appears {names.count(c)} times" for c in want if names.count(c) > 1]
    if not names or names[0]:
        problems.insert(0, "the first column is not the unnamed row-id column" if names else "the file is empty")
    if problems:
        raise DatasetError(
            f"{path}: columns {names!r}, expected {want!r}: {'; '.join(problems)}. Fix the header, or run "
            f"`mmtrace data download` again or fetch the authors' {subset}.csv from {SOURCE_URL}."
        )


def _record_fields(header: list[str], record: list[str]) -> dict[str, str]:
    """Map a record to its columns; a short record leaves fields empty, which row validation reports."""
    values = dict(zip((h.strip() for h in header), record))
    if len(record) > len(header):
        values["__extra__"] = ",".join(record[len(header):])
    return values


# ------------------------------------------------------------------------------------------------ images


def resolve_image(subset: str, image_url: str, folder: str | Path | None) -> tuple[Path | None, str | None]:
    """Find a row's image file under the user's folder: (path, None) or (None, why not and what to do).

    OK-VQA's `./val2014/COCO_....jpg` is taken relative to the folder, or to the folder itself when the user
    points at val2014/ directly. Known and Movies name `./A photo of <subject>` without an extension: try the
    usual extensions, then a folder of that name holding images (the first in natural order).
    """
    if folder is None:
        return None, f"no image folder given for {subset}; pass --images {subset}=DIR"
    rel = Path(image_url.strip())
    if ".." in rel.parts or rel.is_absolute():
        return None, f"image_url {image_url!r} leaves the image folder; fix the CSV row"
    base = Path(folder).expanduser()
    unusable = None
    for candidate in _candidates(base, rel, subset):
        if candidate.is_file():
            return candidate, None
        if candidate.is_dir() and (inner := _first_image(candidate)) is not None:
            return inner, None
        unusable = unusable or _unusable(candidate)
    if unusable:
        return None, f"image {image_url!r}: {unusable}"
    hint = "the folder holding val2014/" if subset == "okvqa" else "the folder holding the 'A photo of ...' images"
    return None, (f"image {image_url!r} not found under {base} (tried {', '.join(IMAGE_EXTENSIONS)} for "
                  f"names without one); point --images {subset}= at {hint}")


def _candidates(base: Path, rel: Path, subset: str) -> Iterator[Path]:
    """Paths to try for one row, in order; names are tried in NFC and NFD (archives made on macOS use NFD)."""
    forms = dict.fromkeys(unicodedata.normalize(f, str(rel)) for f in ("NFC", "NFD"))
    for form in forms:
        rel_form = Path(form)
        yield base / rel_form
        if subset == "okvqa" and len(rel_form.parts) > 1:
            yield base / rel_form.name
        if rel_form.suffix.lower() not in IMAGE_EXTENSIONS:
            for ext in IMAGE_EXTENSIONS:
                yield base / (str(rel_form) + ext)
                yield base / (str(rel_form) + ext.upper())


def _natural_key(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _first_image(folder: Path) -> Path | None:
    """The folder's first image in natural order; None when it holds none or cannot be listed."""
    try:
        images = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    except OSError:
        return None
    return min(images, key=_natural_key) if images else None


def _unusable(candidate: Path) -> str | None:
    """Why an entry at a candidate path cannot be the image (None when nothing is there), so the row's message
    names the real problem instead of "not found"."""
    if candidate.is_dir():
        return (f"{candidate} is a folder holding no readable image ({', '.join(IMAGE_EXTENSIONS)}); put the image "
                f"file there")
    if candidate.is_symlink():
        try:
            candidate.stat()
        except OSError as exc:
            what = "loops back on itself" if exc.errno == errno.ELOOP else "points to nothing"
            return f"{candidate} is a symbolic link that {what}; replace it with the image file"
    if os.path.lexists(candidate) and not candidate.is_file():
        return f"{candidate} is not a regular file; replace it with the image file"
    return None


def check_image(path: Path) -> str | None:
    """None when the image can be traced, else why not: over the pixel limit, not an image, or truncated.

    The size comes from the header (`open_image`), so a huge file is refused before any decoding. The pixels
    are then decoded at reduced scale (JPEG's draft mode still reads every byte), since a JPEG cut short passes
    PIL's `verify` and would otherwise fail only in the worker, too late for `--missing-images blank`.
    """
    from mmtrace.workers.adapters import ImageRefused, open_image

    try:
        with open_image(path) as image:
            image.draft(None, (1, 1))
            image.load()
    except ImageRefused as exc:
        return str(exc)
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"image {path} cannot be read ({type(exc).__name__}: {exc}); replace the file"
    return None


# ------------------------------------------------------------------------------------------------ samples


def row_to_sample(row: Row, image_folder: str | Path | None, missing_images: str, sample_id: str,
                  duplicate: bool = False) -> Sample:
    """One Sample for one row; every problem found is listed in `error`, none raises."""
    f = row.fields
    question, raw_constraint, image_url = f.get("question", ""), f.get("main_entity", ""), f.get("image_url", "")
    problems = _field_problems(row)
    if duplicate:
        problems.append(f"row id {row.row_id} repeats an earlier row's (kept as {sample_id}); make the ids unique")
    constraint = raw_constraint.strip()
    constraints: tuple[str, ...] = ()
    meta: list[tuple[str, str]] = [(k, f.get(k, "").strip()) for k in META_COLUMNS[row.subset]]
    meta.append(("image_url", image_url.strip()))
    if question.strip() and raw_constraint.strip():
        match = match_row(row)
        if match.problem:
            problems.append(match.problem)
        else:
            constraint, constraints = _constraint_fields(match.texts)
            meta.extend(_match_meta(match, raw_constraint))
    image, image_problem = _image_for(row.subset, image_url, image_folder)
    if image_problem and missing_images == "blank":
        meta.append(("image_blank_reason", image_problem))
    elif image_problem:
        problems.append(f"{image_problem}, or pass --missing-images blank to trace the row with a blank image")
    error = f"{row_label(row)}: " + "; ".join(problems) if problems else None
    return Sample(sample_id=sample_id, subset=row.subset, question=question.strip(), constraint=constraint,
                  constraints=constraints, image=image, answer=None, error=error, meta=tuple(meta))


# ------------------------------------------------------------------------------------------------ matching


@dataclass(frozen=True)
class RowMatch:
    """Where a row's constraint cell lands in its question, from the text alone (no image is needed).

    `matches` holds one match per constraint of the cell, in question order, when every one was found and
    none overlap another; otherwise `problem` says which failed and what to do.
    """

    question: str
    matches: tuple[ConstraintMatch, ...] = ()
    problem: str | None = None

    @property
    def texts(self) -> tuple[str, ...]:
        """The constraints in the question's own spelling, so later lookups match exactly."""
        return tuple(m.text(self.question) for m in self.matches)

    @property
    def method(self) -> str:
        """The weakest method among the row's constraints (exact, then case, then words)."""
        return max((m.method for m in self.matches), key=METHODS.index)

    @property
    def confidence(self) -> float:
        return min(m.confidence for m in self.matches)


def match_row(row: Row) -> RowMatch:
    """Match every constraint named in the row's main_entity cell (lines or ';'-separated parts)."""
    question, parts = row.fields.get("question", ""), split_constraints(row.fields.get("main_entity", ""))
    if not question.strip() or not parts:
        return RowMatch(question, problem="the question or main_entity is empty; fill it in or leave the row out")
    found, failed = [], []
    for k, part in enumerate(parts, 1):
        try:
            found.append(match_constraint(question, part))
        except ConstraintNotFound as exc:
            failed.append(f"constraint {k} of {len(parts)} ({part!r}): {exc}" if len(parts) > 1 else str(exc))
    if failed:
        return RowMatch(question, problem="; ".join(failed) + f"; fix main_entity in {row.subset}.csv to words of "
                                                              f"the question (one constraint per line), or leave the "
                                                              f"row out")
    return _in_question_order(row, question, parts, found)


def _in_question_order(row: Row, question: str, parts: tuple[str, ...],
                       found: list[ConstraintMatch]) -> RowMatch:
    """The matches sorted by position; two constraints on shared characters cannot be corrupted apart."""
    pairs = sorted(zip(found, parts), key=lambda pair: (pair[0].start, pair[0].end))
    for (a, part_a), (b, part_b) in zip(pairs, pairs[1:]):
        if b.start < a.end:
            return RowMatch(question, problem=(
                f"the constraints {part_a!r} and {part_b!r} overlap in the question ({a.text(question)!r} and "
                f"{b.text(question)!r}); keep one of them in main_entity of {row.subset}.csv"))
    return RowMatch(question, tuple(match for match, _ in pairs))


def _constraint_fields(texts: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(constraint, constraints) for a Sample: one text goes in `constraint`, several in `constraints`."""
    return (texts[0], ()) if len(texts) == 1 else ("", texts)


def _match_meta(match: RowMatch, raw_constraint: str) -> list[tuple[str, str]]:
    meta = [("match", match.method), ("match_confidence", f"{match.confidence:.2f}")]
    if "; ".join(match.texts) != raw_constraint:
        meta.append(("constraint_csv", raw_constraint))
    return meta


def match_counts(rows: Iterable[Row]) -> dict[str, int]:
    """How a subset's rows match: rows, then per weakest method, rows naming several constraints (also
    counted under their method), and unmatched rows. Computed from text alone, so images never count."""
    counts = dict.fromkeys(("rows", *METHODS, "several", "unmatched"), 0)
    for row in rows:
        match = match_row(row)
        counts["rows"] += 1
        if match.problem:
            counts["unmatched"] += 1
            continue
        counts[match.method] += 1
        counts["several"] += len(match.matches) > 1
    return counts


def row_label(row: Row) -> str:
    """`okvqa row 14`, or `okvqa line 16` when the row id is unusable, so a message always finds its row."""
    if re.fullmatch(r"\d+", row.row_id):
        return f"{row.subset} row {row.row_id}"
    return f"{row.subset} line {row.line}"


def _field_problems(row: Row) -> list[str]:
    """Empty or malformed fields, each named with what to do."""
    problems = []
    if "__extra__" in row.fields:
        problems.append(f"the record has more fields than the header ({row.fields['__extra__']!r} left over); "
                        f"quote the field holding a comma")
    if not re.fullmatch(r"\d+", row.row_id):
        problems.append(f"the row id {row.row_id!r} is not a non-negative integer; fix the first column")
    for column in COLUMNS[row.subset]:
        if not row.fields.get(column, "").strip():
            problems.append(f"field {column!r} is empty; fill it in or leave the row out")
    return problems


def _image_for(subset: str, image_url: str, folder: str | Path | None) -> tuple[str, str | None]:
    """(image for the Sample, problem or None): the file when it verifies, else BLANK_IMAGE and the reason
    with the fix on the files' side (the caller adds the `--missing-images blank` alternative)."""
    if not image_url.strip():
        return BLANK_IMAGE, None  # already reported as an empty field
    path, problem = resolve_image(subset, image_url, folder)
    if path is not None:
        problem = check_image(path)
    if problem is None:
        return str(path), None
    return BLANK_IMAGE, problem


def _sample_ids(rows: Iterable[Row]) -> list[tuple[str, bool]]:
    """(`subset/<row id>`, repeated?) per row; a row without a usable id, or a repeated one, gets
    `subset/line<N>` instead so ids stay unique (row ids are digits, so the two forms never collide)."""
    seen: set[str] = set()
    ids = []
    for row in rows:
        sid = f"{row.subset}/{row.row_id}"
        duplicate = sid in seen
        if duplicate or not re.fullmatch(r"\d+", row.row_id):
            sid = f"{row.subset}/line{row.line}"
        seen.add(sid)
        ids.append((sid, duplicate))
    return ids


def _check_arguments(subsets: Iterable[str], images: Mapping[str, object] | None, missing_images: str,
                     limit: int | None) -> tuple[str, ...]:
    subsets = tuple(subsets)
    unknown = [s for s in subsets if s not in SUBSETS] + [s for s in (images or {}) if s not in SUBSETS]
    if unknown:
        raise DatasetError(f"unknown VQA-Constraints subset(s) {unknown}; valid: {', '.join(SUBSETS)}")
    if not subsets:
        raise DatasetError(f"no subsets selected; choose among {', '.join(SUBSETS)}")
    if missing_images not in MISSING_IMAGE_POLICIES:
        raise DatasetError(f"missing_images={missing_images!r}; use one of {MISSING_IMAGE_POLICIES}")
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    for subset, folder in (images or {}).items():
        if not Path(folder).expanduser().is_dir():
            raise DatasetError(f"--images {subset}={folder}: not a folder; give the folder holding its images")
    return tuple(dict.fromkeys(subsets))


def load_vqa_constraints(
    root: str | Path,
    subsets: Iterable[str] = SUBSETS,
    images: Mapping[str, str | Path] | None = None,
    missing_images: str = "error",
    limit: int | None = None,
) -> list[Sample]:
    """All rows of the chosen subsets as Samples, in subset then file order; `limit` keeps the first N overall.

    `images` maps a subset to the folder holding its images. A missing or unreadable image is an error on
    the row, or with `missing_images="blank"` the row gets `BLANK_IMAGE` (and the reason in `meta`).
    Every CSV is read and checked even when `limit` stops early, so a broken file is never hidden.
    """
    subsets = _check_arguments(subsets, images, missing_images, limit)
    per_subset = [read_rows(root, subset) for subset in subsets]
    samples: list[Sample] = []
    for rows in per_subset:
        for row, (sid, duplicate) in zip(rows, _sample_ids(rows)):
            if limit is not None and len(samples) >= limit:
                return samples
            folder = (images or {}).get(row.subset)
            samples.append(row_to_sample(row, folder, missing_images, sid, duplicate))
    return samples


def summarise(samples: Iterable[Sample]) -> dict[str, dict[str, int]]:
    """Per subset: rows, rows without error ("ok"), rows with one (for `data download` and run reports)."""
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        counts = out.setdefault(s.subset, {"rows": 0, "ok": 0, "errors": 0})
        counts["rows"] += 1
        counts["errors" if s.error else "ok"] += 1
    return out
