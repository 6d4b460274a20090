"""`workers/edit.py` (MultEdit) checked against computations written out here, never against its own helpers.

The closed form against the normal equations, `lstsq` and Sherman–Morrison; AlphaEdit's projected form against
its formula and against the constrained least-squares problem it solves; edits applied to and reverted from a
loaded tiny model bit for bit; the key/value capture and the δ shift against a forward through the MLP by hand;
MultEdit's effect on the captured key; the fine-tuning baselines' bound and hygiene.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mmtrace.workers.adapters import load_adapter
from mmtrace.workers.edit import (
    Edit,
    Scorer,
    applied,
    edit_position,
    find_value,
    finetune,
    multedit,
    null_space_projector,
    preserved_keys,
    solve_update,
    with_views,
)
from mmtrace.workers.patching import Shift, capturing, shifting
from mmtrace.workers.spec import BLANK_IMAGE, EditSpec, Sample
from mmtrace.workers.toy import build_tiny_llava, build_tiny_llava_phi

D_OUT, D_IN = 7, 11

TEXT = Sample(sample_id="e/text", subset="e", question="The Space Needle is located in", constraint="The Space Needle")
TEXT2 = Sample(sample_id="e/text2", subset="e", question="This mountain is located in the continent of",
               constraint="This mountain")
TEXT3 = Sample(sample_id="e/text3", subset="e", question="What sport can you use this for", constraint="this")
VISUAL = Sample(sample_id="e/visual", subset="e", question="This building is located in", constraint="This building",
                image=BLANK_IMAGE)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ fixtures
# Smaller than conftest's models of the same names (2 layers, width 32), which they shadow in this module.


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("edit-llava"), layers=2, width=32, vision_layers=1)


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    return build_tiny_llava_phi(tmp_path_factory.mktemp("edit-phi"), layers=2, width=32, vision_layers=1)


@pytest.fixture(scope="module")
def llava(llava_dir):
    return load_adapter(str(llava_dir))


@pytest.fixture(scope="module")
def phi(phi_dir):
    return load_adapter(str(phi_dir))


@pytest.fixture
def fresh(llava_dir):
    """A model of its own, for tests that write weights (a failure must not leak into other tests)."""
    return load_adapter(str(llava_dir))


def params(adapter) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in adapter.model.named_parameters()}


def assert_same_weights(adapter, before: dict[str, torch.Tensor]) -> None:
    now = dict(adapter.model.named_parameters())
    assert set(now) == set(before)
    changed = [name for name, p in now.items() if not torch.equal(p.detach(), before[name])]
    assert not changed, changed


# ------------------------------------------------------------------------------------------------ the closed form


def problem(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    keys = torch.randn(D_IN, n, generator=g, dtype=torch.float64)
    values = torch.randn(D_OUT, n, generator=g, dtype=torch.float64)
    return w0, keys, values


def normal_equations(w0, keys, values, lam):
    """The authors' form: W* = (V Kᵀ + λ W0)(K Kᵀ + λ I)⁻¹, a d_in × d_in inverse."""
    return (values @ keys.T + lam * w0) @ torch.linalg.inv(keys @ keys.T + lam * torch.eye(D_IN, dtype=w0.dtype))


def stacked_lstsq(w0, keys, values, lam):
    """argmin ‖W K − V‖² + λ‖W − W0‖² as one least-squares system [Kᵀ; √λ I] Wᵀ = [Vᵀ; √λ W0ᵀ]."""
    a = torch.cat([keys.T, math.sqrt(lam) * torch.eye(D_IN, dtype=w0.dtype)])
    b = torch.cat([values.T, math.sqrt(lam) * w0.T])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


@pytest.mark.parametrize("lam", [1e-3, 0.5, 10.0])
@pytest.mark.parametrize("n", [1, 3])
def test_closed_form_equals_regularised_least_squares(n, lam):
    w0, keys, values = problem(n, seed=n)
    left, right = solve_update(keys, values - w0 @ keys, lam)
    assert left.shape == (D_OUT, n) and right.shape == (D_IN, n)  # rank n, never a dense d_in × d_in
    assert left.dtype == right.dtype == torch.float64
    solved = w0 + left @ right.T
    assert rel(solved, normal_equations(w0, keys, values, lam)) < 1e-8
    assert rel(solved, stacked_lstsq(w0, keys, values, lam)) < 1e-8
    if n == 1:  # Sherman–Morrison: W0 + (v − W0 k) kᵀ / (kᵀk + λ)
        k, v = keys[:, 0], values[:, 0]
        rank_one = w0 + torch.outer(v - w0 @ k, k) / (k @ k + lam)
        assert rel(solved, rank_one) < 1e-8
    # and the Edit that carries the factors gives the same ΔW
    edit = Edit(layer=0, method="multedit", position="last", left=left, right=right)
    assert rel(w0 + edit.delta(), solved) < 1e-12


def test_closed_form_without_regularisation_interpolates():
    """λ = 0 with fewer keys than inputs: W* maps every key exactly to its value."""
    w0, keys, values = problem(3, seed=7)
    left, right = solve_update(keys, values - w0 @ keys, 0.0)
    assert rel((w0 + left @ right.T) @ keys, values) < 1e-10


# ------------------------------------------------------------------------------------------------ AlphaEdit


def low_rank_keys(rank: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D_IN, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                                   dtype=torch.float64)


def test_null_space_projector_is_the_orthogonal_projector_off_the_preserved_span():
    k0 = low_rank_keys(4, 20, seed=1)
    p = null_space_projector(k0, 1e-8)
    assert p.dtype == torch.float64 and p.shape == (D_IN, D_IN)
    assert torch.allclose(p, p.T, atol=1e-12)
    assert torch.allclose(p @ p, p, atol=1e-12)
    assert abs(float(torch.trace(p)) - (D_IN - 4)) < 1e-10
    assert float((p @ k0).norm() / k0.norm()) < 1e-12
    u = torch.linalg.svd(k0).U  # independently: I − U_r U_rᵀ over the span's orthonormal basis
    assert torch.allclose(p, torch.eye(D_IN, dtype=torch.float64) - u[:, :4] @ u[:, :4].T, atol=1e-12)


def test_null_space_projector_keeps_the_directions_below_tol():
    """A full-rank K0 whose covariance has eigenvalues 1, 1e-1, …: tol picks which directions count as free."""
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)).Q
    scales = torch.tensor([10.0 ** (-i / 2) for i in range(D_IN)], dtype=torch.float64)  # eigenvalues 10^-i
    k0 = q * scales
    p = null_space_projector(k0, 0.05)  # eigenvalues 1, 0.1 kept; 0.01 and below span the null space
    free = q[:, 2:]
    assert torch.allclose(p, free @ free.T, atol=1e-10)


def alphaedit_by_hand(keys, resid, lam, p, prior):
    """ΔW = R Kᵀ P ((K Kᵀ + prior) P + λ I)⁻¹, AlphaEdit's formula with its d_in × d_in inverse."""
    eye = torch.eye(D_IN, dtype=keys.dtype)
    return resid @ keys.T @ p @ torch.linalg.inv((keys @ keys.T + prior) @ p + lam * eye)


@pytest.mark.parametrize("with_prior", [False, True])
def test_projected_update_equals_alphaedit_and_spares_preserved_keys(with_prior):
    w0, keys, values = problem(3, seed=11)
    resid = values - w0 @ keys
    lam = 0.3
    k0 = low_rank_keys(5, 30, seed=12)
    p = null_space_projector(k0, 1e-9)
    kp = torch.randn(D_IN, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    prior = kp @ kp.T if with_prior else torch.zeros(D_IN, D_IN, dtype=torch.float64)
    left, right = solve_update(keys, resid, lam, projector=p, prior=prior if with_prior else None)
    dw = left @ right.T
    assert rel(dw, alphaedit_by_hand(keys, resid, lam, p, prior)) < 1e-8
    assert float((dw @ k0).norm() / (dw.norm() * k0.norm())) < 1e-8  # preserved keys map as before
    # What it solves: min ‖ΔW K − R‖² + ‖ΔW K_p‖² + λ‖ΔW‖² over ΔW = Y Qᵀ (rows in the null space Q of K0).
    q = torch.linalg.svd(k0).U[:, 5:]
    a = torch.cat([keys.T @ q, kp.T @ q if with_prior else torch.zeros(0, q.shape[1], dtype=q.dtype),
                   math.sqrt(lam) * torch.eye(q.shape[1], dtype=q.dtype)])
    b = torch.cat([resid.T, torch.zeros(a.shape[0] - resid.shape[1], D_OUT, dtype=q.dtype)])
    y = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
    assert rel(dw, y @ q.T) < 1e-8


def test_identity_projector_without_prior_is_the_plain_form():
    w0, keys, values = problem(3, seed=21)
    resid = values - w0 @ keys
    left, right = solve_update(keys, resid, 0.7)
    plain = left @ right.T
    left, right = solve_update(keys, resid, 0.7, projector=torch.eye(D_IN, dtype=torch.float64))
    assert rel(left @ right.T, plain) < 1e-10
    assert rel(plain, normal_equations(w0, keys, values, 0.7) - w0) < 1e-8


def test_prior_alone_is_the_memit_style_objective():
    """No projector, a prior K_p K_pᵀ: the minimiser of ‖ΔW K − R‖² + ‖ΔW K_p‖² + λ‖ΔW‖²."""
    w0, keys, values = problem(2, seed=31)
    resid = values - w0 @ keys
    kp = torch.randn(D_IN, 4, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    left, right = solve_update(keys, resid, 0.2, prior=kp @ kp.T)
    a = torch.cat([keys.T, kp.T, math.sqrt(0.2) * torch.eye(D_IN, dtype=torch.float64)])
    b = torch.cat([resid.T, torch.zeros(4 + D_IN, D_OUT, dtype=torch.float64)])
    assert rel(left @ right.T, torch.linalg.lstsq(a, b, driver="gelsd").solution.T) < 1e-8


# ------------------------------------------------------------------------------------------------ edits as data


def random_edit(layer: int, rank: int | None, seed: int, d_out: int, d_in: int, **kw) -> Edit:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return Edit(layer=layer, method="ft", position="prompt", left=0.01 * torch.randn(d_out, d_in, generator=g),
                    **kw)
    return Edit(layer=layer, method="multedit", position="constraint_last",
                left=0.1 * torch.randn(d_out, rank, generator=g), right=torch.randn(rank, d_in, generator=g).T,
                keys=torch.randn(d_in, rank, generator=g), values=torch.randn(d_out, rank, generator=g), lam=0.01,
                **kw)


def test_apply_then_revert_restores_every_weight_bit_for_bit(fresh):
    down = fresh.down_proj(0).weight
    d_out, d_in = down.shape
    original = params(fresh)
    w0, w1 = fresh.down_proj(0).weight.detach().clone(), fresh.down_proj(1).weight.detach().clone()
    e1, e2 = random_edit(0, 1, 1, d_out, d_in), random_edit(0, 2, 2, d_out, d_in)
    dense = random_edit(1, None, 3, d_out, d_in)
    with applied(fresh, [e1, e2, dense]):
        both = (w0.double() + e1.delta() + e2.delta()).float()  # two edits on one layer: their sum, up to rounding
        assert torch.allclose(fresh.down_proj(0).weight, both, rtol=0, atol=1e-6)
        assert not torch.equal(fresh.down_proj(0).weight, w0)
        assert torch.equal(fresh.down_proj(1).weight, (w1.double() + dense.delta()).to(torch.float32))
        untouched = {k: v for k, v in original.items() if "down_proj" not in k}
        now = dict(fresh.model.named_parameters())
        assert all(torch.equal(now[k].detach(), v) for k, v in untouched.items())
    assert_same_weights(fresh, original)


def test_one_low_rank_edit_writes_w0_plus_delta_rounded_once(fresh):
    w1 = fresh.down_proj(1).weight.detach().clone()
    edit = random_edit(1, 1, 5, *w1.shape)
    original = params(fresh)
    with applied(fresh, [edit]):
        assert torch.equal(fresh.down_proj(1).weight, (w1.double() + edit.delta()).to(torch.float32))
    assert_same_weights(fresh, original)


def test_revert_happens_when_the_block_raises_and_nested_edits_unwind(fresh):
    w0 = fresh.down_proj(0).weight
    shape = tuple(w0.shape)
    original = params(fresh)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(fresh, [random_edit(0, 1, 8, *shape)]):
            raise RuntimeError("boom")
    assert_same_weights(fresh, original)
    with applied(fresh, [random_edit(0, 1, 9, *shape)]):
        outer = fresh.down_proj(0).weight.detach().clone()
        with applied(fresh, [random_edit(0, 2, 10, *shape)]):
            assert not torch.equal(fresh.down_proj(0).weight, outer)
        assert torch.equal(fresh.down_proj(0).weight, outer)
    assert_same_weights(fresh, original)


def test_an_edit_that_fails_to_apply_leaves_no_other_edit_behind(fresh):
    """A bad edit (wrong shape) after a good one: the good one must not stay written into the weights."""
    original = params(fresh)
    good = random_edit(0, 1, 4, *fresh.down_proj(0).weight.shape)
    bad = Edit(layer=1, method="ft", position="prompt", left=torch.ones(3, 3))
    with pytest.raises(RuntimeError):
        with applied(fresh, [good, bad]):
            pass
    assert_same_weights(fresh, original)


def assert_same_edit(a: Edit, b: Edit) -> None:
    for name in ("left", "right", "keys", "values"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.layer, a.method, a.position, a.lam, a.meta) == (b.layer, b.method, b.position, b.lam, b.meta)


def test_save_load_round_trip_keeps_tensors_meta_and_dotted_names(tmp_path):
    meta = {"case_id": "case1.2", "target": "Paris", "value_ratio": 0.25, "null_space": True, "bound": None,
            "question": "Where is it?"}
    low = random_edit(3, 2, 1, 5, 6, meta=meta)
    assert not low.right.is_contiguous()
    other = random_edit(4, 1, 2, 5, 6, meta=dict(meta, case_id="case1.3"))
    dense = random_edit(1, None, 3, 5, 6, meta={"bound": 0.001})
    names = {"case1.2-L0-multedit": low, "case1.3-L0-multedit": other, "case1.2-L0-cft": dense}
    for name, edit in names.items():
        saved = edit.save(tmp_path / name)
        assert saved == tmp_path / f"{name}.json"
        assert (tmp_path / f"{name}.safetensors").exists()
    assert len(list(tmp_path.iterdir())) == 2 * len(names)  # nothing cut at the dot, nothing overwritten
    for name, edit in names.items():
        back = Edit.load(tmp_path / name)
        assert_same_edit(back, edit)
        assert torch.equal(back.delta(), edit.delta())
    assert Edit.load(tmp_path / "case1.2-L0-cft").right is None


# ------------------------------------------------------------------------------------------------ capture and shift


def norm_before_mlp(adapter, layer: int):
    """The module whose output the MLP reads: Llama's post-attention norm, Phi's one input norm (parallel)."""
    block = adapter.layers[layer]
    return getattr(block, "post_attention_layernorm", None) or block.input_layernorm


def mlp_by_hand(adapter, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value) of the MLP at normed input x, from its weights with F.linear."""
    mlp = adapter.site("mlp", layer)
    if hasattr(mlp, "gate_proj"):
        key = mlp.act_fn(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)) * F.linear(x, mlp.up_proj.weight,
                                                                                           mlp.up_proj.bias)
        down = mlp.down_proj
    else:
        key = mlp.activation_fn(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))
        down = mlp.fc2
    return key, F.linear(key, down.weight, down.bias)


def token_batch(adapter, rows: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, adapter.model.config.text_config.vocab_size, (rows, length), generator=g)


@pytest.mark.parametrize("model", ["llava", "phi"])
@pytest.mark.parametrize("layer", [0, 1])
def test_capturing_down_gives_the_mlp_key_and_value_per_row(request, model, layer):
    adapter = request.getfixturevalue(model)
    ids = token_batch(adapter)
    seen = {}
    hook = norm_before_mlp(adapter, layer).register_forward_hook(lambda m, a, out: seen.update(x=out.detach().clone()))
    mlp_hook = adapter.site("mlp", layer).register_forward_hook(lambda m, a, out: seen.update(mlp=out.detach()))
    try:
        with torch.no_grad(), capturing(adapter, "down", layer, [3, 7]) as box:
            adapter.model(input_ids=ids)
    finally:
        hook.remove()
        mlp_hook.remove()
    assert box["input"].shape == (2, adapter.down_proj(layer).in_features)
    assert box["output"].shape == (2, adapter.down_proj(layer).out_features)
    with torch.no_grad():
        key, value = mlp_by_hand(adapter, layer, seen["x"])
    for row, pos in enumerate([3, 7]):
        torch.testing.assert_close(box["input"][row], key[row, pos], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(box["output"][row], value[row, pos], rtol=1e-5, atol=1e-6)
        assert torch.equal(box["output"][row], seen["mlp"][row, pos])  # the down projection ends the MLP
    assert not box["input"].requires_grad


def test_shifting_adds_delta_at_one_position_and_passes_gradients(llava):
    layer, pos = 0, 4
    ids = token_batch(llava)
    site = llava.down_proj(layer)

    def down_output(shifts):
        got = {}
        with torch.no_grad(), shifting(llava, shifts):
            handle = site.register_forward_hook(lambda m, a, out: got.update(out=out.detach().clone()))
            try:
                logits = llava.model(input_ids=ids).logits
            finally:
                handle.remove()
        return got["out"], logits

    base, base_logits = down_output([])
    delta = torch.randn(site.out_features, generator=torch.Generator().manual_seed(1))
    shifted, logits = down_output([Shift("down", layer, pos, delta)])
    added = torch.zeros_like(base)
    added[:, pos] = delta
    assert torch.equal(shifted, base + added)  # delta at pos in every row, exactly nothing elsewhere
    others = [t for t in range(ids.shape[1]) if t != pos]
    assert torch.equal(shifted[:, others], base[:, others])
    assert torch.equal(logits[:, :pos], base_logits[:, :pos])  # causal: earlier positions never see it
    assert not torch.allclose(logits[:, pos:], base_logits[:, pos:])

    # Gradients: d loss / d delta is the sum over rows of d loss / d (site output at pos).
    delta = delta.clone().requires_grad_(True)
    got = {}
    with torch.enable_grad(), shifting(llava, [Shift("down", layer, pos, delta)]):
        # registered after shifting's hook, so it sees the shifted tensor
        handle = site.register_forward_hook(lambda m, a, out: got.update(out=out))
        try:
            loss = llava.model(input_ids=ids).logits.pow(2).mean()
        finally:
            handle.remove()
    d_delta, d_out = torch.autograd.grad(loss, [delta, got["out"]])  # leaves no .grad on the shared model
    assert float(d_delta.norm()) > 0
    torch.testing.assert_close(d_delta, d_out[:, pos].sum(0), rtol=1e-5, atol=1e-8)
    assert not llava.down_proj(layer)._forward_hooks


# ------------------------------------------------------------------------------------------------ making edits


def test_edit_position_rules(llava):
    enc = Scorer(llava).encoded(TEXT)
    pos = edit_position(enc, "constraint_last")
    assert pos == enc.constraint[1] - 1
    assert "".join(enc.tokens[enc.constraint[0]:pos + 1]).strip() == "The Space Needle"
    assert edit_position(enc, "last") == enc.length - 1
    with pytest.raises(ValueError, match="position"):
        edit_position(enc, "first")


def test_scorer_matches_a_forward_per_sample(llava):
    """Batched scoring (grouped by length) equals one plain forward per sample, with teacher forcing."""
    scorer = Scorer(llava)
    samples = [TEXT, TEXT2, TEXT]
    targets = [llava.answer_ids("Paris city"), llava.answer_ids("Antarctica"), llava.answer_ids("Seattle")]
    scores = scorer.score(samples, targets)
    for i, (s, t) in enumerate(zip(samples, targets)):
        ids = llava.encode(s).input_ids
        n = ids.shape[1]
        full = torch.cat([ids, torch.tensor([t[:-1]], dtype=torch.long)], 1)
        with torch.no_grad():
            logp = torch.log_softmax(llava.model(input_ids=full).logits[0].float(), -1)
        assert scores.top[i] == int(logp[n - 1].argmax())
        assert scores.p_target[i] == pytest.approx(float(logp[n - 1, t[0]].exp()), rel=1e-5)
        assert scores.hit[i] == all(int(logp[n - 1 + j].argmax()) == tok for j, tok in enumerate(t))


# (At the last layer only the last position reaches the logits: a constraint key there gets δ = 0.)
@pytest.mark.parametrize("model,sample,layer,rule", [("llava", TEXT, 0, "constraint_last"),
                                                     ("phi", VISUAL, 0, "constraint_last"),
                                                     ("llava", TEXT2, 1, "last")])
def test_multedit_maps_the_captured_key_to_the_shrunk_value(request, model, sample, layer, rule):
    adapter = request.getfixturevalue(model)
    scorer = Scorer(adapter)
    target = adapter.answer_ids("Paris")
    pos = edit_position(scorer.encoded(sample), rule)
    spec = EditSpec(position=rule, steps=3, lr=0.5)
    value = find_value(adapter, scorer, sample, target, layer, pos, spec)

    proj = adapter.down_proj(layer)
    w0 = proj.weight.detach().double()
    bias = proj.bias.detach().double() if proj.bias is not None else torch.zeros(proj.out_features, dtype=torch.float64)
    k, v0, delta = value.key.double(), value.v0.double(), value.delta.double()
    # k and v0 are the down projection's input and output there in the clean run with the image
    inputs, _ = scorer.inputs(sample, target)
    seen = {}
    handle = proj.register_forward_hook(lambda m, a, out: seen.update(k=a[0][0, pos].clone(), v=out[0, pos].clone()))
    try:
        with torch.no_grad():
            adapter.model(**inputs)
    finally:
        handle.remove()
    assert torch.equal(value.key, seen["k"]) and torch.equal(value.v0, seen["v"])
    torch.testing.assert_close(v0, w0 @ k + bias, rtol=1e-5, atol=1e-6)
    assert 0 < float(delta.norm()) <= spec.clamp * float(v0.norm()) * (1 + 1e-6)

    # λ = kᵀk halves the step, so the shrinkage is plainly visible
    spec = dataclasses.replace(spec, lam=float(k @ k))
    edit = multedit(adapter, [value], layer, spec, meta={"case_id": "c"})
    assert edit.layer == layer and edit.lam == spec.lam and edit.meta == {"case_id": "c", "null_space": False}
    shrink = float(k @ k) / (float(k @ k) + spec.lam)
    assert shrink == pytest.approx(0.5)
    resid = v0 + delta - (w0 @ k + bias)
    torch.testing.assert_close(edit.delta(), torch.outer(resid, k) / (k @ k + spec.lam), rtol=1e-5, atol=1e-9)
    want = v0 + delta * shrink  # W* k = W0 k + δ (kᵀk)/(kᵀk + λ)
    torch.testing.assert_close((w0 + edit.delta()) @ k + bias, want, rtol=1e-5, atol=1e-5 * float(v0.norm()))
    assert float((want - (v0 + delta)).norm()) > 0.25 * float(delta.norm())

    original = params(adapter)
    with applied(adapter, [edit]), torch.no_grad(), capturing(adapter, "down", layer, [pos]) as box:
        adapter.model(**inputs)
    assert torch.equal(box["input"][0], value.key)  # the key is upstream of the edited matrix
    torch.testing.assert_close(box["output"][0].double(), want, rtol=1e-4, atol=1e-4 * float(v0.norm()))
    assert_same_weights(adapter, original)
    assert not proj._forward_hooks and not adapter.site("mlp", layer)._forward_hooks


def test_multedit_with_null_space_spares_preserved_keys(llava):
    scorer = Scorer(llava)
    layer = 1
    k0 = preserved_keys(llava, scorer, [TEXT2, TEXT3, VISUAL], layer, "constraint_last")
    assert k0.shape == (llava.down_proj(layer).in_features, 3)
    p = null_space_projector(k0, 1e-9)
    assert abs(float(torch.trace(p)) - (k0.shape[0] - 3)) < 1e-6
    target = llava.answer_ids("Paris")
    spec = EditSpec(steps=2)
    value = find_value(llava, scorer, TEXT, target, layer, edit_position(scorer.encoded(TEXT), spec.position), spec)
    edit = multedit(llava, [value], layer, spec, projector=p)
    assert edit.meta["null_space"] is True
    dw = edit.delta()
    assert float((dw @ k0.double()).norm() / (dw.norm() * k0.double().norm())) < 1e-6
    assert float(dw.norm()) > 0


FT_SPEC = EditSpec(ft_steps=4, ft_lr=0.01)  # Adam steps of ~lr: well past the bound, so the bound binds
BOUND = 1e-3


def test_constrained_finetune_stays_within_its_bound(llava):
    cft = finetune(llava, Scorer(llava), TEXT, llava.answer_ids("Paris"), 0, FT_SPEC, bound=BOUND)
    assert cft.method == "cft" and cft.right is None and cft.meta["bound"] == BOUND
    assert cft.left.shape == llava.down_proj(0).weight.shape
    top = float(cft.left.abs().max())
    assert top >= 0.9 * BOUND  # the bound binds
    assert top <= torch.tensor(BOUND).item()  # the recorded ΔW, at most the bound as float32 holds it


@pytest.mark.parametrize("bound", [BOUND, None])
def test_finetune_leaves_the_model_as_it_found_it(llava, bound):
    scorer = Scorer(llava)
    target = llava.answer_ids("Paris")
    original = params(llava)
    flags = [p.requires_grad for p in llava.model.parameters()]
    for p in llava.model.parameters():  # start clean: an earlier test's finetune may have left one
        p.grad = None
    edit = finetune(llava, scorer, TEXT, target, 0, FT_SPEC, bound=bound)
    assert_same_weights(llava, original)
    assert [p.requires_grad for p in llava.model.parameters()] == flags
    if bound is None:
        assert edit.method == "ft" and float(edit.left.abs().max()) > 2 * BOUND
        before = scorer.score([TEXT], [target]).p_target[0]
        with applied(llava, [edit]):
            after = scorer.score([TEXT], [target]).p_target[0]
        assert after > before  # fine-tuning on the target raised its probability
        assert_same_weights(llava, original)
    assert [n for n, p in llava.model.named_parameters() if p.grad is not None] == []  # no gradient left


# ------------------------------------------------------------------------------------------ views and kept prompts


def test_views_add_perturbed_copies_of_the_image_only():
    ids, pixels = torch.arange(6)[None], torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "pixel_values": pixels}
    assert with_views(inputs, 0, "a") is inputs
    assert with_views({"input_ids": ids}, 3, "a") == {"input_ids": ids}  # text-only: nothing to perturb
    out = with_views(inputs, 3, "a")
    assert out["pixel_values"].shape == (4, 3, 8, 8) and out["input_ids"].shape == (4, 6)
    assert torch.equal(out["pixel_values"][0], pixels[0]) and (out["input_ids"] == ids).all()
    for k in range(1, 4):
        assert not torch.equal(out["pixel_values"][k], pixels[0])
        assert float((out["pixel_values"][k] - pixels[0]).abs().mean()) < 1.5  # a perturbation, not another image
    assert torch.equal(with_views(inputs, 3, "a")["pixel_values"], out["pixel_values"])  # deterministic per seed
    assert not torch.equal(with_views(inputs, 3, "b")["pixel_values"], out["pixel_values"])


def test_kept_prompts_hold_their_answers_while_delta_is_searched():
    """The KL term is really in δ's loss: on the organism, whose key at layer 0 is the pictured entity whatever
    is asked, a δ found without it moves another question on the same picture; with it, far less."""
    from dataclasses import replace

    from mmtrace.jobs.organism import ensure_organism
    from mmtrace.jobs.organism.dataset import organism_samples

    root = ensure_organism(version=2)
    adapter = load_adapter(str(root))
    scorer = Scorer(adapter)
    city, sport = organism_samples("visual", root=root)[0], organism_samples("visual", root=root)[4]
    kept = replace(sport, image=city.image)  # the same picture, another relation
    target = adapter.answer_ids("Oslo" if city.answer != "Oslo" else "Lima")
    pos, kpos = (edit_position(scorer.encoded(s), "constraint_last") for s in (city, kept))
    inputs, length = scorer.inputs(kept)

    def drift(weight: float) -> float:
        value = find_value(adapter, scorer, city, target, 0, pos, EditSpec(keep_weight=weight), keep=[kept])
        with torch.no_grad():
            before = torch.log_softmax(adapter.model(**inputs).logits[0, length - 1], -1)
            with shifting(adapter, [Shift("down", 0, kpos, value.delta)]):
                after = torch.log_softmax(adapter.model(**inputs).logits[0, length - 1], -1)
        return float((before.exp() * (before - after)).sum())

    loose, held = drift(0.0), drift(5.0)
    assert loose > 0.1 and held < 0.25 * loose


def test_a_case_whose_constraint_is_not_in_its_question_is_an_error_row_not_a_failure(llava_dir):
    from mmtrace.workers.edit import EditCase, EditUnit, EditWorker
    from mmtrace.workers.worker import ModelSpec

    worker = EditWorker(ModelSpec(str(llava_dir)), EditSpec(steps=2, ft_steps=2))
    bad = Sample(sample_id="e/bad", subset="e", question="The Space Needle is located in", constraint="Eiffel Tower")
    unit = EditUnit("u", (EditCase(case_id="bad", use="csv", sample=bad, target="Paris"),
                          EditCase(case_id="good", use="csv", sample=TEXT, target="Paris")), (0,), ("multedit",))
    rows = worker(unit).rows.to_pylist()
    assert [r["case_id"] for r in rows] == ["bad", "good"]
    assert "Eiffel Tower" in rows[0]["error"] and rows[1]["error"] is None and rows[1]["efficacy"] is not None
