"""Units: content-addressed ids and grid slices."""

from mmtrace.jobs.identity import unit_base
from mmtrace.jobs.plan import grid_slices, plan_units
from mmtrace.workers.spec import Sample, TraceSpec

S = [Sample(sample_id=f"d/{i}", subset="d", question=f"Question {i} about this", constraint="this")
     for i in range(3)]


def test_slices_cover_the_grid_once():
    slices = grid_slices(("mlp", "attn"), 5, 2)
    pairs = [p for sl in slices for p in sl]
    assert len(pairs) == len(set(pairs)) == 10 and len(slices) == 6
    assert grid_slices(("mlp",), 4, None) == [(("mlp", 0), ("mlp", 1), ("mlp", 2), ("mlp", 3))]


def test_ids_are_stable_and_depend_only_on_what_changes_values():
    base = unit_base("fp", TraceSpec(), "fast")
    a = plan_units(S, base, ("mlp", "attn"), 4)
    assert [u.unit_id for u in a] == [u.unit_id for u in plan_units(S, base, ("mlp", "attn"), 4)]
    assert len({u.unit_id for u in a}) == 6
    only_mlp = plan_units(S, unit_base("fp", TraceSpec(kinds=("mlp",), max_batch=3), "fast"), ("mlp",), 4)
    assert {u.unit_id for u in only_mlp} <= {u.unit_id for u in a}  # kinds and batch size are not semantics
    other = plan_units(S, unit_base("fp", TraceSpec(window=3), "fast"), ("mlp",), 4)
    assert not {u.unit_id for u in other} & {u.unit_id for u in a}
    changed = plan_units([S[0], Sample(sample_id="d/1", subset="d", question="Another question about this",
                                       constraint="this")], base, ("mlp",), 4)
    assert changed[0].unit_id == a[0].unit_id and changed[1].unit_id not in {u.unit_id for u in a}
