"""Hostile data through the real `mmtrace trace`: bad images, bad constraint text and bad CSV files.

Every case checks three things: the message names the row (or the file) and what to do; every other row's
results equal a clean run of the same good rows, cell for cell; and the output folder holds no temporary or
half-written file. Row-level cases share one run each; a clean run of the good rows is shared by the module.
"""

import csv
import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmtrace.cluster.store import LOCK_FILE
from mmtrace.jobs.cli import main
from mmtrace.jobs.datasets import vqa_constraints
from mmtrace.workers.adapters import MAX_IMAGE_PIXELS

SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa_constraints" / "okvqa.csv"
HEADER = ["", "question", "main_entity", "image_url"]
GOOD_IDS = ("0", "2", "4")  # real OK-VQA rows whose constraint is in their question
GOOD = tuple(f"okvqa/{i}" for i in GOOD_IDS)
QUESTION = "What sport can you use this for?"


# ---------------------------------------------------------------------------------------------- files


def real_rows() -> list[list[str]]:
    """The good rows as the authors' file has them (image_url included: the images are made under those names)."""
    with SOURCE.open(newline="", encoding="utf-8-sig") as handle:
        return [r for r in csv.reader(handle) if r[0] in GOOD_IDS]


def write_csv(folder: Path, rows: list[list[str]], header: list[str] = HEADER, line_end: str = "\n",
              bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    csv.writer(text, lineterminator=line_end).writerows([header, *rows])
    (folder / "okvqa.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.getvalue().encode())
    return folder


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (RGB) over a few bytes of data: only a header check is cheap."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def noise(seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def make_images(folder: Path) -> Path:
    """The good rows' images under their real names, and one file per hostile image case."""
    for k, row in enumerate(real_rows()):
        path = folder / row[3]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(k)).save(path)
    rgb = Image.fromarray(noise(7))
    jpeg, png = encoded(rgb, "JPEG"), encoded(rgb, "PNG")
    (folder / "text.jpg").write_text("these are words, not pixels\n")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the header intact, the scan cut short
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "huge.png").write_bytes(png_header_only(20000, 20000))  # over PIL's own bomb limit too
    (folder / "big.png").write_bytes(png_header_only(10000, 10000))  # over ours, under PIL's error limit
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one.png")
    Image.fromarray(noise(8)).convert("CMYK").save(folder / "cmyk.jpg")
    _modes(folder)
    (folder / "folder.jpg").mkdir()
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    return folder


def _modes(folder: Path) -> None:
    """Each non-RGB mode beside the RGB image it must trace exactly like (mode_ref.png)."""
    gray16 = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "i16.png")
    Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("RGB").save(folder / "i16_ref.png")
    gray = Image.fromarray(noise(9)).convert("L")
    gray.save(folder / "l.png")
    gray.convert("RGB").save(folder / "l_ref.png")
    rgba = Image.fromarray(np.dstack([noise(10), noise(11)[..., 0]]), "RGBA")
    rgba.save(folder / "rgba.png")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    Image.alpha_composite(white, rgba).convert("RGB").save(folder / "rgba_ref.png")
    palette = Image.fromarray(noise(12)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "p.png")
    palette.convert("RGB").save(folder / "p_ref.png")


# ---------------------------------------------------------------------------------------------- runs


def trace(model: Path, data: Path, images: Path, out: Path, *extra: str) -> int:
    return main(["trace", "--model", str(model), "--dataset", f"vqa-constraints:{data}:okvqa",
                 "--images", f"okvqa={images}", "--out", str(out), "--kinds", "mlp", "--no-progress", *extra])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def clean(llava_dir, images, tmp_path_factory):
    """The good rows alone: what every hostile run's good rows must equal."""
    root = tmp_path_factory.mktemp("clean")
    assert trace(llava_dir, write_csv(root / "data", real_rows()), images, root / "out") == 0
    return root / "out"


def samples(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "samples.parquet").set_index("sample_id")


def cells(out: Path, sample_ids) -> pd.DataFrame:
    frame = pd.read_parquet(out / "cells")
    frame = frame[frame["sample_id"].isin(list(sample_ids))]
    return frame.sort_values(["sample_id", "kind", "layer", "position"]).reset_index(drop=True)


def assert_good_rows_as_clean(out: Path, clean: Path) -> None:
    """The good rows' sample rows and cells equal the clean run's, value for value (an error row's nulls make
    pandas read an integer column as float, so dtypes are not compared; the Parquet schema is fixed)."""
    got, want = samples(out), samples(clean)
    pd.testing.assert_frame_equal(got.loc[list(GOOD)], want.loc[list(GOOD)], check_dtype=False, check_exact=True)
    pd.testing.assert_frame_equal(cells(out, GOOD), cells(clean, GOOD), check_exact=True)


def assert_nothing_half_written(out: Path) -> None:
    """No temporary file or folder anywhere; every Parquet file reads; `cells` links the one version folder
    (the run's lock file is the only other hidden entry)."""
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)
    assert hidden == [os.readlink(out / "cells")]
    parquet = [p for p in out.rglob("*.parquet")] + list((out / "cells").glob("*.parquet"))
    assert parquet and all(pq.read_table(p) is not None for p in parquet)
    for unit in (out / "units").iterdir() if (out / "units").exists() else ():
        assert sorted(p.name for p in unit.iterdir()) == ["cells.parquet", "samples.parquet"], unit


def assert_traced_like(out: Path, sample_id: str, reference_id: str) -> None:
    """Two samples of the same question whose images must reach the model as the same pixels."""
    a, b = cells(out, [sample_id]).drop(columns="sample_id"), cells(out, [reference_id]).drop(columns="sample_id")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)


def test_clean_run_traces_every_good_row(clean):
    got = samples(clean)
    assert list(got.index) == list(GOOD) and (got["status"] == "ok").all()
    assert_nothing_half_written(clean)


# ---------------------------------------------------------------------------------------------- images


IMAGE_ROWS = {  # row id -> (image_url, what its error must say; None: it must trace)
    "100": ("./val2014/absent.jpg", ["not found", "--images okvqa="]),
    "101": ("cut.jpg", ["cut.jpg", "cannot be read", "truncated", "replace the file"]),
    "102": ("cut.png", ["cut.png", "cannot be read", "replace the file"]),
    "103": ("text.jpg", ["text.jpg", "cannot be read", "replace the file"]),
    "104": ("huge.png", ["huge.png", f"{MAX_IMAGE_PIXELS:,}", "downscale it"]),
    "105": ("big.png", ["big.png", "10000 x 10000", f"{MAX_IMAGE_PIXELS:,}", "downscale it"]),
    "106": ("folder.jpg", ["folder.jpg", "is a folder holding no readable image"]),
    "107": ("loop_a.jpg", ["loop_a.jpg", "symbolic link that loops"]),
    "108": ("dangling.jpg", ["dangling.jpg", "symbolic link that points to nothing"]),
    "110": ("one.png", None),
    "111": ("cmyk.jpg", None),
    **{str(112 + 2 * k): (f"{mode}.png", None) for k, mode in enumerate(("i16", "l", "rgba", "p"))},
    **{str(113 + 2 * k): (f"{mode}_ref.png", None) for k, mode in enumerate(("i16", "l", "rgba", "p"))},
}


@pytest.fixture(scope="module")
def image_run(llava_dir, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("image-run")
    rows = real_rows() + [[rid, QUESTION, "this", url] for rid, (url, _) in IMAGE_ROWS.items()]
    assert trace(llava_dir, write_csv(root / "data", rows), images, root / "out") == 0
    return root / "out"


@pytest.mark.parametrize("row_id", [r for r, (_, says) in IMAGE_ROWS.items() if says])
def test_a_bad_image_is_its_row_error_naming_row_file_and_fix(image_run, row_id):
    row = samples(image_run).loc[f"okvqa/{row_id}"]
    assert row["status"] == "error" and row["num_cells"] == 0
    assert row["error"].startswith(f"okvqa row {row_id}: ")
    for phrase in IMAGE_ROWS[row_id][1]:
        assert phrase in row["error"], (phrase, row["error"])
    assert "--missing-images blank" in row["error"]


def test_odd_sizes_and_modes_trace_as_rgb(image_run):
    """1x1 is resized by the processor; CMYK, 16-bit, L, RGBA and P reach the model as the RGB they show."""
    got = samples(image_run)
    for row_id in ("110", "111", "112", "114", "116", "118"):
        assert got.loc[f"okvqa/{row_id}", "status"] == "ok", got.loc[f"okvqa/{row_id}", "error"]
        assert got.loc[f"okvqa/{row_id}", "num_cells"] > 0
    for mode_id in ("112", "114", "116", "118"):
        assert_traced_like(image_run, f"okvqa/{mode_id}", f"okvqa/{int(mode_id) + 1}")


def test_bad_images_leave_the_other_rows_as_a_clean_run(image_run, clean):
    assert_good_rows_as_clean(image_run, clean)
    assert_nothing_half_written(image_run)


def test_with_blank_a_bad_image_traces_on_the_placeholder(llava_dir, images, clean, tmp_path):
    """`--missing-images blank` must cover a truncated JPEG too: the dataset decodes it, not only the worker."""
    rows = real_rows() + [["101", QUESTION, "this", "cut.jpg"], ["104", QUESTION, "this", "huge.png"]]
    out = tmp_path / "out"
    assert trace(llava_dir, write_csv(tmp_path / "data", rows), images, out, "--missing-images", "blank") == 0
    got = samples(out)
    assert (got["status"] == "ok").all()
    assert got.loc[["okvqa/101", "okvqa/104"], "placeholder_image"].all()
    assert_good_rows_as_clean(out, clean)
    assert_nothing_half_written(out)


def test_the_worker_refuses_what_the_dataset_check_let_through(llava_dir, images, clean, tmp_path, monkeypatch,
                                                               recwarn):
    """An image that changed after the rows were checked reaches the adapter: still the row's error, decoded
    never (a huge one), the unit committed, no PIL bomb warning."""
    monkeypatch.setattr(vqa_constraints, "check_image", lambda path: None)
    bad = {"101": "cut.jpg", "103": "text.jpg", "104": "huge.png", "105": "big.png"}
    rows = real_rows() + [[rid, QUESTION, "this", url] for rid, url in bad.items()]
    out = tmp_path / "out"
    assert trace(llava_dir, write_csv(tmp_path / "data", rows), images, out) == 0
    got = samples(out)
    for rid, url in bad.items():
        error = got.loc[f"okvqa/{rid}", "error"]
        assert got.loc[f"okvqa/{rid}", "status"] == "error" and error.startswith(f"okvqa/{rid}: ")
        assert url in error and ("replace the file" in error or "downscale it" in error), error
        assert "--missing-images blank" in error
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert_good_rows_as_clean(out, clean)
    assert_nothing_half_written(out)


# ---------------------------------------------------------------------------------------------- text


TEXT_ROWS = {  # row id -> (question, constraint or None for a record that stops before it)
    "100": (QUESTION, "   "),
    "101": (QUESTION, ""),
    "102": (QUESTION, None),
    "103": (QUESTION, QUESTION),
    "104": ("ما هذا الشيء؟", "هذا الشيء"),
    "105": ("מה הספורט הזה?", "הספורט הזה"),
    "106": ("What sport is this 🏀 for?", "this 🏀"),
    "107": ("Qué deporte es éste, señor?", "éste"),
    "108": ("这是什么运动?", "什么运动"),
    "109": ("What does the word شيء mean?", "شيء"),
}


@pytest.fixture(scope="module")
def text_run(llava_dir, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("text-run")
    url = real_rows()[0][3]
    rows = real_rows() + [[rid, q] if c is None else [rid, q, c, url] for rid, (q, c) in TEXT_ROWS.items()]
    assert trace(llava_dir, write_csv(root / "data", rows), images, root / "out") == 0
    return root / "out"


@pytest.mark.parametrize("row_id", ["100", "101", "102"])
def test_an_empty_or_absent_constraint_is_its_row_error(text_run, row_id):
    row = samples(text_run).loc[f"okvqa/{row_id}"]
    assert row["status"] == "error" and row["error"].startswith(f"okvqa row {row_id}: ")
    assert "main_entity" in row["error"] and ("fill it in" in row["error"] or "leave the row out" in row["error"])


def test_the_whole_question_as_constraint_is_traced(text_run):
    """A valid span: every question token is corrupted, and the trace says how the answer depends on them."""
    row = samples(text_run).loc["okvqa/103"]
    assert row["status"] == "ok", row["error"]
    assert row["constraint"] == QUESTION and row["num_cells"] > 0
    assert row["constraint_end"] - row["constraint_start"] >= len(QUESTION.split())
    assert {"constraint", "last"} <= set(cells(text_run, ["okvqa/103"])["token_role"])


@pytest.mark.parametrize("row_id", ["104", "105", "106", "107", "108", "109"])
def test_non_ascii_right_to_left_and_emoji_text_is_traced(text_run, row_id):
    question, constraint = TEXT_ROWS[row_id]
    row = samples(text_run).loc[f"okvqa/{row_id}"]
    assert row["status"] == "ok", row["error"]
    assert (row["question"], row["constraint"]) == (question, constraint)
    assert row["constraint_end"] > row["constraint_start"] and row["num_cells"] > 0


def test_bad_text_leaves_the_other_rows_as_a_clean_run(text_run, clean):
    assert_good_rows_as_clean(text_run, clean)
    assert_nothing_half_written(text_run)


# ---------------------------------------------------------------------------------------------- CSV files


def _with_blank_lines(rows):
    return [[], *rows[:1], [], ["", "", "", ""], *rows[1:], [" "], []]


CSV_VARIANTS = {  # name -> write_csv arguments over the good rows; each must trace exactly as the clean run
    "crlf": lambda rows: {"rows": rows, "line_end": "\r\n"},
    "bom": lambda rows: {"rows": rows, "bom": True},
    "bom_and_crlf": lambda rows: {"rows": rows, "bom": True, "line_end": "\r\n"},
    "blank_lines": lambda rows: {"rows": _with_blank_lines(rows)},
    "extra_columns": lambda rows: {"rows": [[*r, "an answer", "a note"] for r in rows],
                                   "header": [*HEADER, "answer", "note"]},
}


@pytest.mark.parametrize("variant", list(CSV_VARIANTS))
def test_csv_layout_variants_trace_as_the_clean_file(llava_dir, images, clean, tmp_path, variant):
    data = write_csv(tmp_path / "data", **CSV_VARIANTS[variant](real_rows()))
    out = tmp_path / "out"
    assert trace(llava_dir, data, images, out) == 0
    assert list(samples(out).index) == list(GOOD)  # blank lines are no rows
    assert_good_rows_as_clean(out, clean)
    assert_nothing_half_written(out)


def test_duplicate_ids_keep_the_first_and_name_the_second(llava_dir, images, clean, tmp_path):
    rows = real_rows()
    out = tmp_path / "out"
    assert trace(llava_dir, write_csv(tmp_path / "data", [*rows, [rows[1][0], *rows[0][1:]]]), images, out) == 0
    got = samples(out)
    assert list(got.index) == [*GOOD, "okvqa/line5"]
    repeat = got.loc["okvqa/line5"]
    assert repeat["status"] == "error" and repeat["error"].startswith(f"okvqa row {rows[1][0]}: ")
    assert "repeats" in repeat["error"] and "unique" in repeat["error"]
    assert_good_rows_as_clean(out, clean)
    assert_nothing_half_written(out)


FILE_ERRORS = {  # name -> (file bytes, what the message must say)
    "missing_column": (b",question,image_url\n0,What is this?,x.jpg\n", ["okvqa.csv", "no column 'main_entity'"]),
    "unnamed_column_moved": (b"question,,main_entity,image_url\nWhat?,0,this,x.jpg\n",
                             ["okvqa.csv", "unnamed row-id column"]),
    "repeated_column": (b",question,question,main_entity,image_url\n", ["okvqa.csv", "'question' appears 2 times"]),
    "empty_file": (b"", ["okvqa.csv", "the file is empty"]),
    "not_utf8": (b",question,main_entity,image_url\n0,Qu\xe9 es esto?,esto,x.jpg\n",
                 ["okvqa.csv", "line 2 is not UTF-8", "save the file as UTF-8"]),
}


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_a_broken_csv_file_is_refused_before_any_work(llava_dir, images, tmp_path, capsys, case):
    content, says = FILE_ERRORS[case]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "okvqa.csv").write_bytes(content)
    capsys.readouterr()
    assert trace(llava_dir, tmp_path / "data", images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    for phrase in [*says, "Fix" if case != "not_utf8" else "UTF-8"]:
        assert phrase in err, (phrase, err)
    assert not (tmp_path / "out").exists()


def test_a_machine_io_error_is_not_the_rows_fault(llava_dir, images, tmp_path, monkeypatch, capsys):
    """EIO while reading an image says nothing about the file: its unit stays pending for a rerun, never an
    error row, and the run's exit code says so."""
    from mmtrace.workers import adapters

    def failing_disk(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(vqa_constraints, "check_image", lambda path: None)
    monkeypatch.setattr(adapters, "open_image", failing_disk)
    out = tmp_path / "out"
    assert trace(llava_dir, write_csv(tmp_path / "data", real_rows()[:1]), images, out) == 3
    assert "Input/output error" in capsys.readouterr().err
    assert samples(out).loc[GOOD[0], "status"] == "pending"
    assert_nothing_half_written(out)
