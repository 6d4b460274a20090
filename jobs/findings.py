"""The few lines `mmtrace trace` ends with: the strongest cells and a per-layer table, read from the summary.

The per-layer table shows, for each kind, the token role where that kind's effect is largest (the last
token for a read-out, the constraint for storage), so the table has one column per kind and stays short.
Hidden state at the last token is left out: restoring it gives the answer back whatever the model stores
where.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmtrace.jobs import report
from mmtrace.workers.spec import KINDS, TraceSpec

TOP = 5


def eligible(by_role: pd.DataFrame) -> pd.DataFrame:
    trivial = (by_role["kind"] == "hidden") & (by_role["token_role"] == "last")
    return by_role[~trivial & by_role["mean_ie"].notna()]


def top_cells(by_role: pd.DataFrame, n: int = TOP) -> list[str]:
    rows = eligible(by_role).nlargest(n, "mean_ie")
    return [f"  {r.kind:6} layer {int(r.layer):2}  {r.token_role:11}  ie {r.mean_ie:+.3f} ± {r.ci95_ie:.3f}"
            for r in rows.itertuples()]


def layer_table(by_role: pd.DataFrame) -> list[str]:
    frame = eligible(by_role)
    kinds = [k for k in KINDS if k in set(frame["kind"])]
    roles = {k: frame[frame["kind"] == k].nlargest(1, "mean_ie")["token_role"].iloc[0] for k in kinds}
    heads = [f"{k}@{roles[k]}" for k in kinds]
    width = max(18, *(len(h) + 2 for h in heads))
    lines = ["  layer " + "".join(f"{h:>{width}}" for h in heads)]
    for layer in sorted(frame["layer"].unique()):
        values = []
        for k in kinds:
            hit = frame[(frame["kind"] == k) & (frame["token_role"] == roles[k]) & (frame["layer"] == layer)]
            values.append(f"{hit['mean_ie'].iloc[0]:+{width}.3f}" if len(hit) else " " * width)
        lines.append(f"  {int(layer):5} " + "".join(values))
    return lines


def effects(out: Path) -> list[str]:
    """Top cells and the per-layer table of a reduced run (its `summary_by_role.parquet`)."""
    path = out / report.SUMMARY_BY_ROLE_FILE
    by_role = report.joint(pd.read_parquet(path)) if path.exists() else None
    if by_role is None or eligible(by_role).empty:
        return ["  no traced cells to show"]
    n = int(by_role["n"].max())
    return [f"strongest cells (mean indirect effect over {n} samples ± 95% CI):", *top_cells(by_role), "",
            "mean indirect effect per layer, each kind at its strongest token role:", *layer_table(by_role)]


def estimates(out: Path) -> list[str]:
    """Engine atp: how many cells are estimates, and how the estimates rank the cells restored exactly."""
    cells = report.read_cells(out)
    estimated = cells["estimated"].fillna(False).astype(bool)
    checked = cells[~estimated & cells["ie_estimate"].notna() & cells["computed"].fillna(False).astype(bool)]
    rho = report.spearman(checked["ie_estimate"], checked["ie"])
    return [f"atp: {int(estimated.sum())} of {len(cells)} cells are first-order estimates (estimated=True); "
            f"{len(checked)} restored exactly; Spearman rho of estimate vs exact ie over those: {rho:.3f}", ""]


def findings(out: str | Path, spec: TraceSpec, engine: str = "fast") -> str:
    """What a person wants at the end of a trace: where the effects sit, and where the files are."""
    out = Path(out)
    paths = [("heatmap", out / "heatmap.png"), ("cells", out / report.CELLS_DIR),
             ("samples", out / report.SAMPLES_FILE), ("summary", out / report.SUMMARY_MD)]
    files = [f"  {name + ':':9} {path}" for name, path in paths if path.exists()]
    atp = estimates(out) if engine == "atp" else []
    return "\n".join([*atp, f"Where the facts sit (window {spec.window}, {spec.window_style} rule):", *effects(out),
                      "", "Files:", *files])
