"""The same run twice on CPU gives bit-identical Parquet content: cells, samples and summaries.

No column of these tables holds a time or a duration (checked below), so the tables themselves are compared,
not a projection of them; file names (the hidden `.cells-<host>-<pid>-<rand>` version folder) differ by design.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmtrace.jobs.cli import main
from mmtrace.workers.cells import CELL_SCHEMA, SAMPLE_SCHEMA

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa_constraints"
TABLES = ("cells", "samples.parquet", "summary.parquet", "summary_by_role.parquet")


def assert_bit_identical(a: pa.Table, b: pa.Table, what: str = "") -> None:
    """Same schema and the same values bit for bit; NaN equals NaN here (Arrow's `equals` says it does not)."""
    assert a.schema == b.schema and a.num_rows == b.num_rows, what
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_floating(x.type):
            assert x.is_null().equals(y.is_null()), (what, name)
            bits = pa.uint64() if x.type.bit_width == 64 else pa.uint32()
            x, y = (c.fill_null(0).view(bits) for c in (x, y))
        assert x.equals(y), (what, name)


def trace(model: Path, out: Path, *extra: str) -> Path:
    assert main(["trace", "--model", str(model), "--dataset", f"vqa-constraints:{DATA}:okvqa", "--limit", "4",
                 "--missing-images", "blank", "--kinds", "mlp,attn", "--out", str(out), "--no-progress",
                 "--no-plots", *extra]) == 0
    return out


def test_no_output_column_holds_a_time():
    timed = [f.name for schema in (CELL_SCHEMA, SAMPLE_SCHEMA) for f in schema
             if pa.types.is_temporal(f.type)]
    assert timed == []


@pytest.mark.parametrize("corruption", [[], ["--corruption", "noise"], ["--replacement", "this"]],
                         ids=["replace", "noise", "nan"])
def test_the_same_run_twice_gives_identical_tables(llava_dir, tmp_path, corruption):
    first = trace(llava_dir, tmp_path / "first", *corruption)
    second = trace(llava_dir, tmp_path / "second", *corruption)
    for name in TABLES:
        a, b = pq.read_table(first / name), pq.read_table(second / name)
        assert a.num_rows > 0 and not any(pa.types.is_temporal(f.type) for f in a.schema), name
        assert_bit_identical(a, b, name)
