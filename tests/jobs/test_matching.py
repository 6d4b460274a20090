"""Constraint matching on the authors' CSVs: word-level matches, several constraints per row, `mmtrace data match`."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from mmtrace.jobs.cli import main as mmtrace_main
from mmtrace.jobs.datasets.vqa_constraints import (
    SUBSETS,
    load_vqa_constraints,
    match_counts,
    match_row,
    read_rows,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa_constraints"  # ../shared beside the repo
pytestmark = pytest.mark.skipif(not (DATA / "okvqa.csv").is_file(), reason=f"the shared CSVs are not at {DATA}")

UNMATCHED = {189, 385, 1149, 2358, 2487, 2616, 2672, 2782, 3421, 4224}


@pytest.fixture(scope="module")
def samples():
    return {s.sample_id: s for s in load_vqa_constraints(DATA, missing_images="blank")}


def test_okvqa_14_is_matched_word_by_word(samples):
    s = samples["okvqa/14"]
    assert s.error is None and s.constraint == "bike is on the ground" and s.constraints == ()
    assert s.meta_value("match") == "words" and s.meta_value("match_confidence") == "0.72"
    assert s.meta_value("constraint_csv") == "bike on the ground"


@pytest.mark.parametrize("row, text, method", [(630, "phone", "words"), (4371, "eleiphants", "words"),
                                               (2292, "three whelled vehicle", "words"), (402, "dogs neck", "words"),
                                               (529, "drink", "words"), (1096, "bird", "exact")])
def test_single_constraints(samples, row, text, method):
    s = samples[f"okvqa/{row}"]
    assert (s.error, s.constraint, s.constraints, s.meta_value("match")) == (None, text, (), method)


@pytest.mark.parametrize("row, parts", [(1107, ("cat", "this image")), (1531, ("this animal", "this object"))])
def test_two_constraints_in_one_cell(samples, row, parts):
    s = samples[f"okvqa/{row}"]
    assert s.error is None and s.constraints == parts and s.constraint == "; ".join(parts)
    assert s.meta_value("match") == "exact" and s.meta_value("match_confidence") == "1.00"
    starts = [s.question.index(p) for p in parts]
    assert starts == sorted(starts)


def test_every_row_is_matched_or_names_its_row_and_words(samples):
    unmatched = set()
    for sid, s in samples.items():
        subset, row = sid.split("/")
        if s.error is None:
            assert s.meta_value("match") in ("exact", "case", "words")
            assert 0 < float(s.meta_value("match_confidence")) <= 1
            continue
        unmatched.add(sid)
        assert s.error.startswith(f"{subset} row {row}: ") and "main_entity" in s.error
        assert re.search(r"its words? '\w+'|no content words \(only \w+\)", s.error), s.error
    assert unmatched == {f"okvqa/{r}" for r in UNMATCHED}


def _printed_table(text: str) -> dict[str, dict[str, int]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = {h: int(c.replace(",", "")) for h, c in zip(head[1:], cells[1:])}
    return table


def _counted_from_samples(samples) -> dict[str, dict[str, int]]:
    """The command's columns computed here from Samples, independently of `match_counts`."""
    out: dict[str, Counter] = {subset: Counter() for subset in SUBSETS}
    for s in samples.values():
        c = out[s.subset]
        c["rows"] += 1
        c[s.meta_value("match") or "unmatched"] += 1
        c["several"] += len(s.constraints) > 1
    return {subset: {k: c[k] for k in ("rows", "exact", "case", "words", "several", "unmatched")}
            for subset, c in out.items()}


def test_match_command_prints_the_counts(samples, capsys):
    assert mmtrace_main(["data", "match", "--data", str(DATA)]) == 0
    table = _printed_table(capsys.readouterr().out)
    expected = _counted_from_samples(samples)
    assert {k: v for k, v in table.items() if k != "all"} == expected
    assert table["all"] == {k: sum(e[k] for e in expected.values()) for k in table["all"]}
    assert table["okvqa"]["unmatched"] == len(UNMATCHED) and table["okvqa"]["several"] == 2


def test_match_command_lists_the_unmatched_rows(capsys):
    assert mmtrace_main(["data", "match", "--data", str(DATA), "--show-unmatched"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    assert [int(re.match(r"- okvqa row (\d+): ", line)[1]) for line in listed] == sorted(UNMATCHED)


def test_match_status_needs_no_images():
    rows = read_rows(DATA, "okvqa")
    without = load_vqa_constraints(DATA, subsets=["okvqa"])  # no image folder: every row errs on its image
    assert all(s.error for s in without)
    assert match_counts(rows)["unmatched"] == len(UNMATCHED)
    assert match_row(next(r for r in rows if r.row_id == "14")).texts == ("bike is on the ground",)


def test_match_command_without_csvs_says_where(tmp_path, capsys):
    assert mmtrace_main(["data", "match", "--data", str(tmp_path)]) == 1
    assert "okvqa.csv: not found" in capsys.readouterr().err
