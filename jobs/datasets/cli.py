"""`mmtrace data download`: fetch the VQA-Constraints CSVs from the authors' repository into the cache;
`mmtrace data match`: how each row's constraint is found in its question (no images needed).

The files are fetched into a staging folder beside the destination, parsed with the loader (so a GitHub
error page or a truncated file is caught before it replaces anything), then each is renamed into place.
A failed download leaves the destination as it was and says how to place the files by hand.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .vqa_constraints import (
    EXPECTED_ROWS,
    SOURCE_URL,
    SUBSETS,
    DatasetError,
    default_data_dir,
    load_vqa_constraints,
    match_counts,
    match_row,
    read_rows,
    row_label,
    summarise,
)

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/microsoft/MLLMInterpret/main/data_constraints/"
FILES = tuple(f"{subset}.csv" for subset in SUBSETS)


class DownloadError(RuntimeError):
    """A file could not be fetched or is not the authors' CSV; the message says what to do instead."""


def file_url(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + "/" + name


def fetch(url: str, timeout: float) -> bytes:
    """The body at `url` (http(s) or file), or DownloadError naming the URL and the cause."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = getattr(response, "status", None)
            if status is not None and status != 200:
                raise DownloadError(f"could not fetch {url}: HTTP {status}")
            return response.read()
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"could not fetch {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"could not fetch {url}: {reason}") from exc


def manual_instructions(out: Path) -> str:
    names = ", ".join(FILES)
    return (f"Download {names} by hand from {SOURCE_URL} (or its raw files under {DEFAULT_BASE_URL}) and put "
            f"them in {out}, or pass --base-url pointing at a mirror; then use --dataset vqa-constraints:{out}")


def download(out: Path, base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0) -> dict[str, dict[str, int]]:
    """Fetch, validate and install the three CSVs in `out`; returns `summarise` counts per subset."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=out))
    try:
        for name in FILES:
            data = fetch(file_url(base_url, name), timeout)
            (staging / name).write_bytes(data)
        try:
            counts = summarise(load_vqa_constraints(staging, missing_images="blank"))
        except DatasetError as exc:
            raise DownloadError(f"a file fetched from {base_url} is not the authors' CSV: {exc}") from exc
        for name in FILES:
            (staging / name).replace(out / name)  # same filesystem: an atomic rename
        return counts
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def report(out: Path, counts: dict[str, dict[str, int]]) -> str:
    """One line per file: rows, rows ready to trace, rows flagged, and a note when the count is unexpected."""
    lines = []
    for subset in SUBSETS:
        c = counts.get(subset, {"rows": 0, "ok": 0, "errors": 0})
        note = "" if c["rows"] == EXPECTED_ROWS[subset] else f" (the authors' file had {EXPECTED_ROWS[subset]})"
        lines.append(f"{out / (subset + '.csv')}: {c['rows']} rows{note}, {c['ok']} with the constraint located, "
                     f"{c['errors']} flagged")
    total = sum(c["rows"] for c in counts.values())
    lines.append(f"{total} rows in all; images are not included (COCO val2014 for okvqa, the authors' Google "
                 f"Drive folder for Known and Movies): pass them with --images SUBSET=DIR")
    return "\n".join(lines)


def run_download(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 1 with a message on stderr when the files cannot be fetched or are wrong."""
    out = Path(args.out).expanduser() if args.out else default_data_dir()
    try:
        counts = download(out, args.base_url, args.timeout)
    except DownloadError as exc:
        print(f"mmtrace data download: {exc}\n{manual_instructions(out)}", file=sys.stderr)
        return 1
    print(report(out, counts))
    return 0


MATCH_COLUMNS = ("rows", "exact", "case", "words", "several", "unmatched")


def match_table(counts: dict[str, dict[str, int]]) -> str:
    """A markdown table of `match_counts` per subset, with a total row."""
    total = {c: sum(sub[c] for sub in counts.values()) for c in MATCH_COLUMNS}
    lines = ["| subset | " + " | ".join(MATCH_COLUMNS) + " |", "|---" + "|---:" * len(MATCH_COLUMNS) + "|"]
    for name, row in [*counts.items(), ("all", total)]:
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:,}" for c in MATCH_COLUMNS) + " |")
    return "\n".join(lines)


def unmatched_lines(root: Path, subsets: tuple[str, ...]) -> list[str]:
    """`okvqa row 189: why` for each row whose constraint is not found."""
    return [f"- {row_label(row)}: {match.problem}" for subset in subsets for row in read_rows(root, subset)
            if (match := match_row(row)).problem]


def run_match(args: argparse.Namespace) -> int:
    """CLI entry: print the match table (and the unmatched rows); 1 when a CSV is missing or malformed."""
    root = Path(args.data).expanduser() if args.data else default_data_dir()
    try:
        counts = {subset: match_counts(read_rows(root, subset)) for subset in SUBSETS}
        unmatched = unmatched_lines(root, SUBSETS) if args.show_unmatched else []
    except DatasetError as exc:
        print(f"mmtrace data match: {exc}", file=sys.stderr)
        return 1
    print("\n".join([match_table(counts), *([""] if unmatched else []), *unmatched]))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data download` and `data match` on the main CLI's subparsers; `args.func(args)` returns the
    exit code."""
    data = subparsers.add_parser("data", help="fetch and inspect datasets")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    dl = commands.add_parser("download", help="download the VQA-Constraints CSVs from the authors' repository")
    dl.add_argument("--out", type=Path, default=None,
                    help="destination folder (default: $MMTRACE_CACHE/vqa_constraints, else "
                         "~/.cache/mmtrace/vqa_constraints)")
    dl.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"where the CSVs live (default: {DEFAULT_BASE_URL})")
    dl.add_argument("--timeout", type=float, default=60.0, help="seconds per file before giving up (default: 60)")
    dl.set_defaults(func=run_download)
    match = commands.add_parser("match", help="count how each VQA-Constraints row's constraint is found in its "
                                              "question (exact, up to case, word by word, or not at all)")
    match.add_argument("--data", type=Path, default=None,
                       help="folder holding the CSVs (default: where `mmtrace data download` puts them)")
    match.add_argument("--show-unmatched", action="store_true", help="list each unmatched row and why")
    match.set_defaults(func=run_match)
    return data
