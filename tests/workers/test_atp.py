"""Engine atp: its first-order estimates equal a gradient taken through the model's own forward, the cells it
re-checks equal the exact engine's, and on the organism it re-checks the cells that matter."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmtrace.jobs.bench_organism import score_atp
from mmtrace.jobs.report import spearman
from mmtrace.workers.patching import Shift, recording, shifting
from mmtrace.workers.spec import TraceSpec
from mmtrace.workers.trace import make_engine, trace_sample


def organism_samples(root, n):
    from mmtrace.jobs.organism import organism_samples as samples

    return samples("visual", limit=n, root=root)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1.5, 1.5, 3): Pearson of those, worked out by hand = sqrt(3)/2
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(spearman([1], [2])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_estimate_is_the_gradient_of_the_full_forward(organism, organism_dir):
    """(clean - corrupted) . d log p / d output at a site, with the gradient taken through the whole model
    (image, prefix and all) on the corrupted ids, not through the engine's mid-stack rows."""
    sample = organism_samples(organism_dir, 1)[0]
    spec = TraceSpec(recheck=0)
    engine = make_engine("atp", organism, spec)
    prep = engine.prepare(sample)
    start = prep.enc.constraint[0]
    inputs = {"pixel_values": prep.enc.pixel_values}
    with torch.no_grad(), recording(organism, spec.kinds) as clean:
        organism.model(input_ids=prep.enc.input_ids, **inputs)
    with torch.no_grad(), recording(organism, spec.kinds) as corrupt:
        organism.model(input_ids=prep.corruption.ids, **inputs)
    sites = [(kind, layer, pos) for kind in spec.kinds for layer in (0, 3, organism.num_layers - 1)
             for pos in (start, prep.enc.length - 1)]
    deltas = [torch.zeros(clean[k][layer].shape[-1], requires_grad=True) for k, layer, _ in sites]
    with shifting(organism, [Shift(k, layer, pos, d) for (k, layer, pos), d in zip(sites, deltas)]):
        logits = organism.model(input_ids=prep.corruption.ids, **inputs).logits
    logits[0, -1].float().log_softmax(-1)[prep.target].backward()
    for (kind, layer, pos), delta in zip(sites, deltas):
        expected = float((clean[kind][layer][pos] - corrupt[kind][layer][pos]) @ delta.grad)
        got = float(prep.extra["estimate"][kind][layer, pos - start])
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-5), (kind, layer, pos)
    assert max(abs(float(e.abs().max())) for e in prep.extra["estimate"].values()) > 1.0  # not all zero


def test_rechecked_cells_equal_fast_and_are_the_ones_that_matter(organism, organism_dir):
    spec = TraceSpec(recheck=6)
    fast, atp = make_engine("fast", organism, spec), make_engine("atp", organism, spec)
    exact, approx = [], []
    for sample in organism_samples(organism_dir, 3):
        exact.append(trace_sample(organism, sample, spec, fast).cells.to_pandas())
        approx.append(trace_sample(organism, sample, spec, atp).cells.to_pandas())
    exact, approx = pd.concat(exact, ignore_index=True), pd.concat(approx, ignore_index=True)
    assert exact["ie_estimate"].isna().all() and not exact["estimated"].any()
    rechecked = approx["computed"]
    traced = rechecked | approx["estimated"]
    assert not (rechecked & approx["estimated"]).any() and (traced == exact["computed"]).all()
    assert (rechecked.groupby([approx["sample_id"], approx["kind"]]).sum() == 6).all()  # K per sample and kind
    assert (approx.loc[~traced, "p_restored"] == approx.loc[~traced, "p_corrupt"]).all()  # before the constraint
    dp = (approx["p_restored"] - exact["p_restored"]).abs()
    assert dp[rechecked].max() <= 1e-6
    assert dp[approx["estimated"]].max() > 1e-3  # the rest really are estimates
    score = score_atp(exact, approx, 6)
    assert score.top_k_recall >= 0.8 and score.max_abs_dp_rechecked <= 1e-6
    assert score.rho_all > 0.1


def test_recheck_count_is_validated():
    with pytest.raises(ValueError, match="recheck"):
        TraceSpec(recheck=-1)
