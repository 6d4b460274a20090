"""Editing a fact where the trace points: MultEdit (Basu et al. §3), its null-space variant and two baselines.

MultEdit rewrites the MLP output projection W of one decoder layer so that the key k (W's input at the edit
position, from the clean run with its image) maps to a value v = v0 + δ, δ found by gradient steps on the
target's log-probability at the prompt's last position. The closed form of
`argmin ‖W K − V‖² + λ‖W − W0‖²` is `W0 + R (KᵀK + λI)⁻¹ Kᵀ` with R = V − W0 K: an n×n solve for n edits
(Sherman–Morrison for one), never the d_in×d_in inverse the authors form. AlphaEdit's option projects the update
onto the null space of keys to preserve, which needs the d_in×d_in form. An edit is data (`Edit`): its
low-rank factors, key, value and λ, saved as safetensors + JSON and applied to a loaded model only while it
is needed, the original weights restored bit for bit.

Key capture and δ go through `patching` (`capturing`, `shifting`), like every other intervention.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from mmtrace.workers.adapters import Adapter, SampleError, load_adapter
from mmtrace.workers.encoding import ConstraintNotFound
from mmtrace.workers.patching import Shift, capturing, shifting
from mmtrace.workers.spec import METHODS, POSITIONS, USES, EditSpec, Encoded, Sample  # noqa: F401 - re-exported

SAMPLE_ERRORS = (SampleError, ConstraintNotFound)  # a case's own fault: its error row, never the unit's failure
EDIT_SITE = "down"  # the MLP output projection: its input is the key, its output the value


@dataclass(frozen=True, kw_only=True)
class EditCase:
    """One fact to edit and the questions that measure the edit.

    `sample` is the question as asked (its image, its constraint); `target` the answer the edit should give.
    `paraphrases` and `renderings` should give the target afterwards (generalisation: other wordings, other
    pictures of the same subject); `same_image`, `same_question` and `text_only` should keep their answers
    (specificity: other questions on the image, the question on other images, text-only questions).
    `keep` are prompts whose answers the δ search holds still (ROME's essence prompts); they must not overlap
    the measurement sets, or specificity would be measured on what the edit was fitted to.
    """

    case_id: str
    use: str
    sample: Sample
    target: str
    paraphrases: tuple[Sample, ...] = ()
    renderings: tuple[Sample, ...] = ()
    same_image: tuple[Sample, ...] = ()
    same_question: tuple[Sample, ...] = ()
    text_only: tuple[Sample, ...] = ()
    keep: tuple[Sample, ...] = ()
    error: str | None = None


LOCALITY = ("same_image", "same_question", "text_only")
GENERALITY = ("paraphrases", "renderings")


# ------------------------------------------------------------------------------------------------ edits as data


@dataclass
class Edit:
    """ΔW of layer `layer`'s output projection as `left @ right.T` (dense `left` when `right` is None: the
    fine-tuning baselines' update has no low rank), with what made it."""

    layer: int
    method: str
    position: str
    left: torch.Tensor
    right: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    lam: float | None = None
    meta: dict = field(default_factory=dict)

    TENSORS = ("left", "right", "keys", "values")

    def delta(self) -> torch.Tensor:
        left = self.left.double()
        return left if self.right is None else left @ self.right.double().T

    def save(self, path: str | Path) -> Path:
        """`path`.safetensors (the tensors) and `path`.json (the rest); returns the JSON's path."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).contiguous() for k in self.TENSORS if getattr(self, k) is not None}
        save_file(tensors, str(_beside(path, ".safetensors")))
        info = {k: v for k, v in asdict(self).items() if k not in self.TENSORS}
        _beside(path, ".json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        return _beside(path, ".json")

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        from safetensors.torch import load_file

        info = json.loads(_beside(path, ".json").read_text())
        return cls(**info, **load_file(str(_beside(path, ".safetensors"))))


def _beside(path: str | Path, suffix: str) -> Path:
    """`path` with `suffix`, where a name's own dots ("q1.2") are part of the name, not a suffix to replace."""
    path = Path(path)
    name = path.name[:-len(path.suffix)] if path.suffix in (".json", ".safetensors") else path.name
    return path.with_name(name + suffix)


class Applied:
    """Edits written into a loaded model's weights; `revert()` puts the original tensors back bit for bit.

    The snapshot is the only way back that is exact: W + Δ − Δ differs from W in the last bits. The checkpoint
    on disk is never written.
    """

    def __init__(self, adapter: Adapter, edits: Sequence[Edit]):
        self.saved: dict[int, torch.Tensor] = {}
        self.adapter = adapter
        try:
            for e in edits:
                weight = adapter.down_proj(e.layer).weight
                self.saved.setdefault(e.layer, weight.detach().clone())
                with torch.no_grad():
                    weight.copy_((weight.double() + e.delta().to(weight.device)).to(weight.dtype))
        except BaseException:
            self.revert()  # an edit that cannot be applied leaves none of the others behind
            raise

    def revert(self) -> None:
        with torch.no_grad():
            for layer, original in self.saved.items():
                self.adapter.down_proj(layer).weight.copy_(original)
        self.saved = {}


@contextmanager
def applied(adapter: Adapter, edits: Sequence[Edit]) -> Iterator[Applied]:
    handle = Applied(adapter, edits)
    try:
        yield handle
    finally:
        handle.revert()


# ------------------------------------------------------------------------------------------------ the closed form


def solve_update(keys: torch.Tensor, residuals: torch.Tensor, lam: float, projector: torch.Tensor | None = None,
                 prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left, right) of ΔW = left @ right.T, the minimiser of ‖(W0 + ΔW) K − V‖² + λ‖ΔW‖²_F.

    keys K (d_in, n), residuals R = V − W0 K (d_out, n). Plain: ΔW = R (KᵀK + λI)⁻¹ Kᵀ, an n×n solve. With a
    `projector` P (AlphaEdit) and `prior` = Σ K_p K_pᵀ of earlier edits: ΔW = R Kᵀ P ((KKᵀ + prior) P + λI)⁻¹,
    which with P = I and no prior is the plain form (push-through identity), and is 0 on keys P annihilates.
    """
    if projector is None and prior is None:
        gram = keys.T @ keys + lam * torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
        return residuals, torch.linalg.solve(gram, keys.T).T
    d = keys.shape[0]
    eye = torch.eye(d, dtype=keys.dtype, device=keys.device)
    p = eye if projector is None else projector
    cov = keys @ keys.T + (prior if prior is not None else 0)
    return residuals, torch.linalg.solve(p @ cov + lam * eye, p @ keys)


def null_space_projector(keys: torch.Tensor, tol: float) -> torch.Tensor:
    """P onto the span of eigenvectors of K₀K₀ᵀ whose eigenvalue is below `tol` × the largest (AlphaEdit)."""
    cov = (keys.double() @ keys.double().T)
    evals, evecs = torch.linalg.eigh(cov)
    small = evecs[:, evals < tol * evals.max()]
    return small @ small.T


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Scores:
    """Per sample: the argmax first answer token, whether every target token is the argmax under teacher
    forcing, and p(first target token)."""

    top: list[int]
    hit: list[bool]
    p_target: list[float]


class Scorer:
    """Batched next-token scoring; encodings are cached, since a worker scores the same prompts before and
    after many edits. Prompts are batched by length and modality (no padding, so no padding effects)."""

    def __init__(self, adapter: Adapter, max_batch: int = 64):
        self.adapter = adapter
        self.max_batch = max_batch
        self._encoded: dict[Sample, Encoded] = {}

    def forget(self, samples: Sequence[Sample]) -> None:
        """Drop cached encodings (a case's prompts and pictures, once the case is done: a long-lived worker
        would otherwise hold every picture it ever edited)."""
        for s in samples:
            self._encoded.pop(s, None)

    def encoded(self, sample: Sample) -> Encoded:
        if sample.error:
            raise SampleError(f"{sample.sample_id}: {sample.error}")
        if sample not in self._encoded:
            self._encoded[sample] = self.adapter.encode(sample)
        return self._encoded[sample]

    def inputs(self, sample: Sample, target: Sequence[int] = ()) -> tuple[dict, int]:
        """Model inputs with the target teacher-forced (all but its last token), and the prompt's length."""
        enc = self.encoded(sample)
        ids = torch.cat([enc.input_ids, torch.tensor([list(target[:-1])], dtype=torch.long)], 1)
        out = {"input_ids": ids.to(self.adapter.device)}
        if enc.pixel_values is not None:
            out["pixel_values"] = enc.pixel_values.to(self.adapter.device)
        return out, enc.length

    @torch.no_grad()
    def score(self, samples: Sequence[Sample], targets: Sequence[Sequence[int]] | None = None) -> Scores:
        targets = targets if targets is not None else [()] * len(samples)
        result = Scores([0] * len(samples), [False] * len(samples), [math.nan] * len(samples))
        groups: dict[tuple, list[int]] = {}
        for i, (s, t) in enumerate(zip(samples, targets)):
            enc = self.encoded(s)
            groups.setdefault((enc.length + max(len(t) - 1, 0), enc.pixel_values is not None), []).append(i)
        for members in groups.values():
            for lo in range(0, len(members), self.max_batch):
                self._score_batch(members[lo:lo + self.max_batch], samples, targets, result)
        return result

    def _score_batch(self, idx: list[int], samples, targets, result: Scores) -> None:
        parts = [self.inputs(samples[i], targets[i]) for i in idx]
        batch = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        logp = torch.log_softmax(self.adapter.model(**batch).logits.float(), -1)
        for row, (i, (_, length)) in enumerate(zip(idx, parts)):
            at = logp[row, length - 1:length - 1 + max(len(targets[i]), 1)]
            result.top[i] = int(at[0].argmax())
            if len(targets[i]):
                tgt = torch.tensor(list(targets[i]), device=at.device)
                result.hit[i] = bool((at.argmax(-1) == tgt).all())
                result.p_target[i] = float(at[0, tgt[0]].exp())


# ------------------------------------------------------------------------------------------------ making an edit


def edit_position(enc: Encoded, rule: str) -> int:
    """The absolute position whose key an edit rewrites."""
    if rule == "constraint_last":
        return enc.constraint[1] - 1
    if rule == "last":
        return enc.length - 1
    raise ValueError(f"position must be one of {POSITIONS}, got {rule!r}")


@contextmanager
def _trainable(model: torch.nn.Module, params: Sequence[torch.nn.Parameter] = ()) -> Iterator[None]:
    """Only `params` require grad inside the block (a δ search needs none of the model's)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in keep)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def _target_nll(logits: torch.Tensor, length: int, target: Sequence[int]) -> torch.Tensor:
    """Mean −log p of the teacher-forced target tokens, read from the prompt's last position on, over rows."""
    logp = torch.log_softmax(logits[:, length - 1:length - 1 + len(target)].float(), -1)
    tgt = torch.tensor(list(target), device=logp.device)
    return -logp.gather(2, tgt[None, :, None].expand(logp.shape[0], -1, 1)).mean()


@dataclass
class Value:
    key: torch.Tensor  # (d_in,)
    v0: torch.Tensor  # (d_out,), the output projection's output at the edit position
    delta: torch.Tensor  # (d_out,)
    nll: float  # the target's NLL with δ added

    @property
    def ratio(self) -> float:
        return float(self.delta.norm() / self.v0.norm().clamp_min(1e-12))


STOP_NLL = 0.05  # ROME's early stop: the target is already near-certain
STOP_DRIFT = 0.01  # ... and the prompts to keep have barely moved (mean KL, nats)


def find_value(adapter: Adapter, scorer: Scorer, sample: Sample, target: Sequence[int], layer: int,
               position: int, spec: EditSpec, keep: Sequence[Sample] = ()) -> Value:
    """k and v0 from the clean run with its image, then δ by Adam on the target's NLL + decay·(‖δ‖/‖v0‖)²
    + keep_weight · mean KL(p_before ‖ p_with_δ) over the `keep` prompts (δ added at each one's own edit
    position, as the rewritten weight would add it there), kept within clamp·‖v0‖."""
    inputs, length = scorer.inputs(sample, target)
    inputs = with_views(inputs, spec.views, seed=sample.sample_id)
    rows = len(inputs["input_ids"])
    with torch.no_grad(), capturing(adapter, EDIT_SITE, layer, [position] * rows) as box:
        adapter.model(**inputs)
    key, v0 = box["input"].float().mean(0), box["output"].float().mean(0)
    kept = _Kept(adapter, scorer, keep if spec.keep_weight else (), spec.position)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=spec.lr)
    bound, nll = spec.clamp * v0.norm(), math.inf
    with _trainable(adapter.model, [delta]):
        for step in range(spec.steps + 1):
            with shifting(adapter, [Shift(EDIT_SITE, layer, position, delta)]):
                loss = _target_nll(adapter.model(**inputs).logits, length, target)
            drift = kept.drift(delta, layer) if spec.keep_weight else delta.new_zeros(())
            nll = float(loss.detach())
            if step == spec.steps or (nll < STOP_NLL and float(drift.detach()) < STOP_DRIFT):
                break
            opt.zero_grad()
            (loss + spec.decay * (delta.norm() / v0.norm()) ** 2 + spec.keep_weight * drift).backward()
            opt.step()
            with torch.no_grad():
                delta.mul_(torch.clamp(bound / delta.norm().clamp_min(1e-12), max=1.0))
    return Value(key, v0, delta.detach(), nll)


def with_views(inputs: dict, views: int, seed: str) -> dict:
    """The inputs plus `views` perturbed copies of the image (shifted by up to 2 pixels, contrast and
    brightness jittered, pixel noise), one batch row each: ROME averages its key over random prefixes so the
    edit holds whatever precedes the subject; these rows do the same for the picture. Deterministic per seed."""
    pixels = inputs.get("pixel_values")
    if not views or pixels is None:
        return inputs
    gen = torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    copies = [pixels]
    for _ in range(views):
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        scale, shift = 1 + 0.2 * (torch.rand(2, generator=gen) - 0.5)
        noise = 0.1 * torch.randn(pixels.shape, generator=gen).to(pixels)
        copies.append(torch.roll(pixels, (dy, dx), (-2, -1)) * scale + (shift - 1) + noise)
    ids = inputs["input_ids"].expand(len(copies), -1)
    return {**inputs, "input_ids": ids, "pixel_values": torch.cat(copies)}


class _Kept:
    """The prompts a δ search keeps, with their unedited next-token distributions, batched by (length, edit
    position, modality) so each step costs a few forwards however many prompts there are."""

    def __init__(self, adapter: Adapter, scorer: Scorer, prompts: Sequence[Sample], rule: str):
        self.adapter = adapter
        groups: dict[tuple, list[dict]] = {}
        for s in prompts:
            inputs, length = scorer.inputs(s)
            groups.setdefault((length, edit_position(scorer.encoded(s), rule), tuple(inputs)), []).append(inputs)
        self.batches = [({k: torch.cat([i[k] for i in members]) for k in members[0]}, length, position)
                        for (length, position, _), members in groups.items()]
        self.count = len(prompts)
        with torch.no_grad():
            self.before = [self._logp(inputs, length) for inputs, length, _ in self.batches]

    def _logp(self, inputs: dict, length: int) -> torch.Tensor:
        return torch.log_softmax(self.adapter.model(**inputs).logits[:, length - 1].float(), -1)

    def drift(self, delta: torch.Tensor, layer: int) -> torch.Tensor:
        """Mean KL(before ‖ with δ) over the prompts; 0 without any."""
        total = delta.new_zeros(())
        for (inputs, length, position), before in zip(self.batches, self.before):
            with shifting(self.adapter, [Shift(EDIT_SITE, layer, position, delta)]):
                after = self._logp(inputs, length)
            total = total + (before.exp() * (before - after)).sum()
        return total / max(self.count, 1)


def multedit(adapter: Adapter, values: Sequence[Value], layer: int, spec: EditSpec, *,
             projector: torch.Tensor | None = None, prior: torch.Tensor | None = None,
             meta: dict | None = None) -> Edit:
    """The closed-form update taking each key to its value (one edit or a batch), from the current weights."""
    proj = adapter.down_proj(layer)
    weight = proj.weight.detach().double()
    keys = torch.stack([v.key for v in values], 1).double().to(weight.device)
    targets = torch.stack([v.v0 + v.delta for v in values], 1).double().to(weight.device)
    outputs = weight @ keys + (proj.bias.detach().double()[:, None] if proj.bias is not None else 0)
    residuals = targets - outputs
    lam = spec.lam if projector is None else spec.null_lam
    left, right = solve_update(keys, residuals, lam, projector, prior)
    return Edit(layer=layer, method="multedit", position=spec.position, left=left.float().cpu(),
                right=right.float().cpu(), keys=keys.float().cpu(), values=targets.float().cpu(), lam=lam,
                meta=dict(meta or {}, null_space=projector is not None))


def finetune(adapter: Adapter, scorer: Scorer, sample: Sample, target: Sequence[int], layer: int, spec: EditSpec,
             bound: float | None = None, meta: dict | None = None) -> Edit:
    """The baselines: Adam on the whole output projection W on the edit prompt's target NLL; with `bound`,
    ΔW is clipped to [−bound, bound] after every step (constrained fine-tuning, Zhu et al. 2020)."""
    inputs, length = scorer.inputs(sample, target)
    weight = adapter.down_proj(layer).weight
    original = weight.detach().clone()
    opt = torch.optim.Adam([weight], lr=spec.ft_lr)
    try:
        with _trainable(adapter.model, [weight]):
            for _ in range(spec.ft_steps):
                loss = _target_nll(adapter.model(**inputs).logits, length, target)
                if float(loss.detach()) < STOP_NLL:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                if bound is not None:
                    with torch.no_grad():
                        weight.copy_(original + (weight - original).clamp(-bound, bound))
        delta = weight.detach().double() - original.double()
        delta = (delta if bound is None else delta.clamp(-bound, bound)).float().cpu()
    finally:
        weight.grad = None
        with torch.no_grad():
            weight.copy_(original)
    method = "ft" if bound is None else "cft"
    return Edit(layer=layer, method=method, position="prompt", left=delta, meta=dict(meta or {}, bound=bound))


def make_edit(adapter: Adapter, scorer: Scorer, case: EditCase, layer: int, method: str, spec: EditSpec,
              projector: torch.Tensor | None = None) -> Edit:
    """One case's edit by `method` (multedit | ft | cft) at `layer`."""
    target = adapter.answer_ids(case.target)
    meta = {"case_id": case.case_id, "target": case.target, "question": case.sample.question}
    if method == "multedit":
        position = edit_position(scorer.encoded(case.sample), spec.position)
        value = find_value(adapter, scorer, case.sample, target, layer, position, spec, case.keep)
        return multedit(adapter, [value], layer, spec, projector=projector,
                        meta=dict(meta, value_ratio=value.ratio, value_nll=value.nll))
    if method in ("ft", "cft"):
        return finetune(adapter, scorer, case.sample, target, layer, spec,
                        spec.cft_bound if method == "cft" else None, meta)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def preserved_keys(adapter: Adapter, scorer: Scorer, samples: Sequence[Sample], layer: int, rule: str) -> torch.Tensor:
    """Keys (d_in, N) of unrelated prompts at the edit position rule: the knowledge a null-space edit keeps."""
    keys = []
    for s in samples:
        inputs, _ = scorer.inputs(s)
        with torch.no_grad(), capturing(adapter, EDIT_SITE, layer, [edit_position(scorer.encoded(s), rule)]) as box:
            adapter.model(**inputs)
        keys.append(box["input"][0].float())
    return torch.stack(keys, 1)


# ------------------------------------------------------------------------------------------------ evaluation


EDIT_SCHEMA = pa.schema([
    ("case_id", pa.string()), ("use", pa.string()), ("subset", pa.string()), ("question", pa.string()),
    ("constraint", pa.string()), ("target", pa.string()), ("before", pa.string()),
    ("layer", pa.int32()), ("method", pa.string()), ("position", pa.string()), ("null_space", pa.bool_()),
    ("p_target_before", pa.float64()), ("p_target_after", pa.float64()),
    ("efficacy_before", pa.float64()), ("efficacy", pa.float64()),
    ("paraphrase_before", pa.float64()), ("generalisation_paraphrase", pa.float64()),
    ("rendering_before", pa.float64()), ("generalisation_rendering", pa.float64()),
    ("specificity_same_image", pa.float64()), ("specificity_same_question", pa.float64()),
    ("specificity_text", pa.float64()),
    ("heldout_acc_before", pa.float64()), ("heldout_acc_after", pa.float64()),
    ("n_paraphrases", pa.int32()), ("n_renderings", pa.int32()), ("n_same_image", pa.int32()),
    ("n_same_question", pa.int32()), ("n_text_only", pa.int32()), ("n_heldout", pa.int32()),
    ("delta_norm", pa.float64()), ("value_ratio", pa.float64()), ("error", pa.string()),
])


def _mean(flags: Sequence[bool]) -> float:
    return float(sum(flags) / len(flags)) if len(flags) else math.nan


@dataclass
class Snapshot:
    """What an edit is measured on, scored once on one set of weights."""

    edit: Scores
    general: dict[str, Scores]
    local: dict[str, Scores]
    heldout: Scores


def snapshot(adapter: Adapter, scorer: Scorer, case: EditCase, heldout: Sequence[Sample]) -> Snapshot:
    target = adapter.answer_ids(case.target)
    general = {g: scorer.score(getattr(case, g), [target] * len(getattr(case, g))) for g in GENERALITY}
    local = {loc: scorer.score(getattr(case, loc)) for loc in LOCALITY}
    return Snapshot(scorer.score([case.sample], [target]), general, local, heldout_scores(adapter, scorer, heldout))


def heldout_scores(adapter: Adapter, scorer: Scorer, heldout: Sequence[Sample]) -> Scores:
    """Held-out questions scored against their gold answers (a question without one cannot be held out)."""
    missing = [s.sample_id for s in heldout if not s.answer]
    if missing:
        raise ValueError(f"held-out questions need an answer; these have none: {missing[:5]}")
    return scorer.score(heldout, [adapter.answer_ids(str(s.answer)) for s in heldout])


def edit_row(adapter: Adapter, case: EditCase, before: Snapshot, after: Snapshot, edit: Edit,
             spec: EditSpec) -> dict:
    unchanged = {loc: _mean([a == b for a, b in zip(after.local[loc].top, before.local[loc].top)]) for loc in LOCALITY}
    return {
        **case_columns(adapter, case, before), "layer": edit.layer, "method": edit.method,
        "position": spec.position if edit.method == "multedit" else "prompt",
        "null_space": bool(edit.meta.get("null_space", False)),
        "p_target_before": before.edit.p_target[0], "p_target_after": after.edit.p_target[0],
        "efficacy_before": float(before.edit.hit[0]), "efficacy": float(after.edit.hit[0]),
        "paraphrase_before": _mean(before.general["paraphrases"].hit),
        "generalisation_paraphrase": _mean(after.general["paraphrases"].hit),
        "rendering_before": _mean(before.general["renderings"].hit),
        "generalisation_rendering": _mean(after.general["renderings"].hit),
        "specificity_same_image": unchanged["same_image"], "specificity_same_question": unchanged["same_question"],
        "specificity_text": unchanged["text_only"],
        "heldout_acc_before": _mean(before.heldout.hit), "heldout_acc_after": _mean(after.heldout.hit),
        "n_heldout": len(before.heldout.hit), "delta_norm": float(edit.delta().norm()),
        "value_ratio": edit.meta.get("value_ratio", math.nan), "error": None,
    }


def case_columns(adapter: Adapter, case: EditCase, before: Snapshot | None = None) -> dict:
    s = case.sample
    counts = {f"n_{k}": len(getattr(case, k)) for k in (*GENERALITY, *LOCALITY)}
    return {"case_id": case.case_id, "use": case.use, "subset": s.subset, "question": s.question,
            "constraint": s.constraint, "target": case.target,
            "before": adapter.tokenizer.decode([before.edit.top[0]]).strip() if before else None, **counts}


def error_row(adapter: Adapter, case: EditCase, layer: int, method: str, spec: EditSpec, error: str) -> dict:
    row = dict.fromkeys(EDIT_SCHEMA.names)
    row.update(case_columns(adapter, case), layer=layer, method=method, position=spec.position,
               null_space=spec.null_space, error=error)
    return row


# ------------------------------------------------------------------------------------------------ the worker


@dataclass(frozen=True)
class EditUnit:
    """Cases × layers × methods for one worker; `heldout` measures overall accuracy before and after each edit,
    `preserve` supplies the keys a null-space edit keeps (unused otherwise)."""

    unit_id: str
    cases: tuple[EditCase, ...]
    layers: tuple[int, ...]
    methods: tuple[str, ...]
    heldout: tuple[Sample, ...] = ()
    preserve: tuple[Sample, ...] = ()


@dataclass
class EditResult:
    unit_id: str
    rows: pa.Table
    edits: dict[str, Edit]  # record name -> the edit, saved beside the unit's rows


def case_prompts(case: EditCase) -> list[Sample]:
    """Every prompt a case is made and measured with."""
    return [case.sample, *(s for part in (*GENERALITY, *LOCALITY, "keep") for s in getattr(case, part))]


def record_name(case_id: str, layer: int, method: str) -> str:
    return f"{case_id.replace('/', '_')}-L{layer}-{method}"


class EditWorker:
    """Callable on EditUnits; loads the model once per process. Every edit is reverted before the next, so
    each is measured against the same base weights."""

    def __init__(self, model, spec: EditSpec):
        if model.threads:
            torch.set_num_threads(model.threads)
        self.adapter = load_adapter(model.path, model.dtype, model.device, model.revision, model.trust_remote_code)
        self.spec = spec
        self.scorer = Scorer(self.adapter)
        self._projectors: dict[tuple, torch.Tensor] = {}
        self._before: dict[tuple, Snapshot] = {}

    def __call__(self, unit: EditUnit | SequentialUnit) -> EditResult | SequentialResult:
        if isinstance(unit, SequentialUnit):
            return SequentialResult(unit.unit_id, run_sequential(self, unit))
        rows, edits = [], {}
        for case in unit.cases:
            for layer in unit.layers:
                for method in unit.methods:
                    row, edit = self.one(case, layer, method, unit)
                    rows.append(row)
                    if edit is not None:
                        edits[record_name(case.case_id, layer, method)] = edit
            self.scorer.forget(case_prompts(case))
        return EditResult(unit.unit_id, pa.Table.from_pylist(rows, schema=EDIT_SCHEMA), edits)

    def projector(self, layer: int, preserve: tuple[Sample, ...]) -> torch.Tensor | None:
        return self.projector_for(layer, preserve) if self.spec.null_space else None

    def projector_for(self, layer: int, preserve: tuple[Sample, ...]) -> torch.Tensor:
        """The null-space projector of `preserve`'s keys at `layer`, computed once per worker."""
        key = (layer, preserve)
        if key not in self._projectors:
            keys = preserved_keys(self.adapter, self.scorer, preserve, layer, self.spec.position)
            self._projectors[key] = null_space_projector(keys, self.spec.null_tol)
        return self._projectors[key]

    def before(self, case: EditCase, heldout: tuple[Sample, ...]) -> Snapshot:
        """The unedited model's scores, the same for every layer and method of a case: computed once."""
        key = (case, heldout)
        if key not in self._before:
            self._before = {key: snapshot(self.adapter, self.scorer, case, heldout)}
        return self._before[key]

    def one(self, case: EditCase, layer: int, method: str, unit: EditUnit) -> tuple[dict, Edit | None]:
        """One edit, measured before and after; a case's own fault (a bad image, an unmatched constraint)
        becomes its error row, and the run goes on."""
        if case.error:
            return error_row(self.adapter, case, layer, method, self.spec, case.error), None
        try:
            before = self.before(case, unit.heldout)
            projector = self.projector(layer, unit.preserve) if method == "multedit" else None
            edit = make_edit(self.adapter, self.scorer, case, layer, method, self.spec, projector)
            with applied(self.adapter, [edit]):
                after = snapshot(self.adapter, self.scorer, case, unit.heldout)
        except SAMPLE_ERRORS as exc:
            return error_row(self.adapter, case, layer, method, self.spec, str(exc)), None
        return edit_row(self.adapter, case, before, after, edit, self.spec), edit


# ------------------------------------------------------------------------------------------------ sequential


SEQUENTIAL_SCHEMA = pa.schema([
    ("null_space", pa.bool_()), ("layer", pa.int32()), ("step", pa.int32()), ("case_id", pa.string()),
    ("edited_at", pa.int32()), ("hit", pa.bool_()), ("p_target", pa.float64()), ("heldout_acc", pa.float64()),
])


@dataclass(frozen=True)
class SequentialUnit:
    """N MultEdit edits applied one after another at `layer`, each made on the weights the earlier ones left;
    after every step, every edit so far is measured again. With `null_space`, AlphaEdit's form: each update is
    projected off the preserved keys and solved against the keys of the edits before it."""

    unit_id: str
    cases: tuple[EditCase, ...]
    layer: int
    null_space: bool
    heldout: tuple[Sample, ...] = ()
    preserve: tuple[Sample, ...] = ()


@dataclass
class SequentialResult:
    unit_id: str
    rows: pa.Table  # SEQUENTIAL_SCHEMA


def run_sequential(worker: EditWorker, unit: SequentialUnit) -> pa.Table:
    """The rows of one sequential run (one per step × edit made so far); the model is reverted afterwards."""
    ad, sc, spec = worker.adapter, worker.scorer, worker.spec
    cases = [c for c in unit.cases if not c.error]
    projector = worker.projector_for(unit.layer, unit.preserve) if unit.null_space else None
    weight = ad.down_proj(unit.layer).weight
    prior = (torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
             if unit.null_space else None)
    handles, rows, done = [], [], []
    try:
        for case in cases:
            try:
                target = ad.answer_ids(case.target)
                value = find_value(ad, sc, case.sample, target, unit.layer,
                                   edit_position(sc.encoded(case.sample), spec.position), spec, case.keep)
            except SAMPLE_ERRORS:
                continue  # a case that cannot be encoded is left out of the sequence; its edit row says why
            edit = multedit(ad, [value], unit.layer, spec, projector=projector, prior=prior)
            handles.append(Applied(ad, [edit]))
            if prior is not None:
                key = value.key.double().to(weight.device)
                prior += key[:, None] @ key[None]
            done.append(case)
            rows += _sequential_rows(ad, sc, unit, done, len(done) - 1)
    finally:
        for handle in reversed(handles):
            handle.revert()
    return pa.Table.from_pylist(rows, schema=SEQUENTIAL_SCHEMA)


def _sequential_rows(ad: Adapter, sc: Scorer, unit: SequentialUnit, done: Sequence[EditCase], step: int) -> list[dict]:
    scores = sc.score([c.sample for c in done], [ad.answer_ids(c.target) for c in done])
    acc = _mean(heldout_scores(ad, sc, unit.heldout).hit)
    return [{"null_space": unit.null_space, "layer": unit.layer, "step": step, "case_id": c.case_id, "edited_at": i,
             "hit": hit, "p_target": p, "heldout_acc": acc}
            for i, (c, hit, p) in enumerate(zip(done, scores.hit, scores.p_target))]
