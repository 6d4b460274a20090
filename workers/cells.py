"""The schema of what a trace produces: one row per cell, one row per sample.

A cell is one restoration: (sample, kind, window centred on `layer`, position). The engines return these
as Arrow tables; the reducer and reports in `jobs/` read nothing else.
"""

from __future__ import annotations

import pyarrow as pa

CELL_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("kind", pa.string()),  # mlp | attn | hidden
        ("layer", pa.int32()),  # the window's centre
        ("window", pa.int32()),
        ("layer_lo", pa.int32()),  # the layers actually restored, inclusive
        ("layer_hi", pa.int32()),
        ("position", pa.int32()),  # index in the merged sequence (image tokens expanded)
        ("token", pa.string()),
        ("token_role", pa.string()),  # image | before | constraint | after | last (constraint1, between, ...)
        ("aligned_role", pa.string()),  # token_role refined (constraint_first, after_first, ...)
        ("corrupted", pa.string()),  # which constraint spans the corrupted run replaced: all, or 1, 2, ...
        ("p_clean", pa.float64()),
        ("p_corrupt", pa.float64()),
        ("p_restored", pa.float64()),
        ("ie", pa.float64()),  # p_restored - p_corrupt
        ("ie_norm", pa.float64()),  # ie / (p_clean - p_corrupt); NaN where the denominator is 0
        ("computed", pa.bool_()),  # False where the value is known exactly without a forward pass
        ("estimated", pa.bool_()),  # True where p_restored is engine atp's first-order estimate, not exact
        ("ie_estimate", pa.float64()),  # engine atp's first-order estimate of ie (null for the exact engines)
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("subset", pa.string()),
        ("question", pa.string()),
        ("constraint", pa.string()),
        ("answer", pa.string()),  # the gold answer when the dataset has one
        ("answer_token", pa.string()),  # the clean run's argmax next token: the traced target
        ("answer_token_id", pa.int64()),
        ("p_clean", pa.float64()),
        ("p_corrupt", pa.float64()),
        ("corrupt_token", pa.string()),  # what replaced the constraint ("" for noise)
        ("num_tokens", pa.int32()),
        ("constraint_start", pa.int32()),
        ("constraint_end", pa.int32()),
        ("first_traced", pa.int32()),
        ("placeholder_image", pa.bool_()),
        ("num_cells", pa.int32()),  # a unit: its slice's cells; the run: the sample's cells in cells/ (0 unless ok)
        ("status", pa.string()),  # ok | error | pending (a unit of it not committed yet; run tables only)
        ("error", pa.string()),  # why not ok: the failing slices' messages, or the missing units
        ("corrupted", pa.string()),  # which constraint spans the corrupted run replaced: all, or 1, 2, ...
        ("match", pa.string()),  # how the constraint was found in the question: exact | case | words
        ("match_confidence", pa.float64()),
    ]
)


def normalised_ie(ie: float, p_clean: float, p_corrupt: float) -> float:
    """ie / (p_clean - p_corrupt), NaN when the corruption moved nothing (a 0 denominator)."""
    denom = p_clean - p_corrupt
    return float("nan") if denom == 0 else ie / denom
