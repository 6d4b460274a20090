"""MultiModalCausalTrace: exact engines that agree, and one that estimates first.

`ReferenceEngine` is the authors' procedure, naive on purpose: one forward pass per cell over the whole
sequence (vision tower included), rows [clean, corrupted, corrupted+restored], the clean values taken from
row 0 of the same pass. It is the oracle and the benchmark baseline.

`FastEngine` computes the same numbers at the compute floor:
- the vision tower and the clean pass run once per sample, and the clean states are recorded;
- the corrupted run is computed once, from the first constraint token on, on the clean run's cache of the
  positions before it (their inputs are the same in both runs); its residual stream and KV cache are kept;
- a cell restoring layers lo..hi at position t changes nothing below lo and nothing before t, so its row runs
  layers >= lo on positions >= t only, from the corrupted residual, over the corrupted cache's shared prefix
  (`workers/stack.py`); rows of every position and entry layer share batches sized by the memory budget;
- a cell before the first constraint token restores a state equal to the corrupted one (the clean and
  corrupted inputs agree there), so its p_restored is p_corrupt exactly and it costs nothing.

`AtpEngine` estimates every cell from one backward pass and restores exactly only the cells it ranks highest;
`FastV1Engine` is the fast engine before layer skipping, kept to measure the current one against.
"""

from __future__ import annotations

import copy
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from mmtrace.workers.adapters import Adapter, SampleError
from mmtrace.workers.cells import CELL_SCHEMA, normalised_ie
from mmtrace.workers.encoding import ConstraintNotFound
from mmtrace.workers.patching import (
    Recorded,
    Restore,
    SameBatchRow,
    capturing_embeds,
    perturbing,
    recording,
    restoring,
    retaining,
    stack_recorded,
)
from mmtrace.workers.spec import ENGINES, Encoded, Sample, TraceSpec
from mmtrace.workers.stack import Row, dense_tokens, out_of_memory, plan_batches, release_memory, run_rows, token_budget


@dataclass(frozen=True)
class CellKey:
    """One cell of a sample's grid: restore `kind` in the window centred on `layer`, at `position`."""

    kind: str
    layer: int
    position: int


@dataclass
class Corruption:
    """How the corrupted run differs from the clean one: new ids at the constraint, or embedding noise."""

    ids: torch.Tensor  # (1, T) input ids of the corrupted run
    noise: torch.Tensor | None  # (corrupted positions, d) added to their embeddings, or None
    token: str  # what replaced the constraint, for the record ("" for noise)


@dataclass
class Prepared:
    """A sample after its clean and corrupted runs: everything its cells need, reusable across grid slices."""

    sample: Sample
    enc: Encoded
    corruption: Corruption
    target: int
    p_clean: float
    p_corrupt: float
    extra: dict


@dataclass
class Values:
    """An engine's answer for a list of cells: p_restored, whether each took a forward pass, and (engine atp)
    whether it is an estimate and the estimate of its ie."""

    p: list[float]
    computed: list[bool]
    estimated: list[bool] | None = None
    ie_estimate: list[float | None] | None = None


@dataclass
class SampleTrace:
    """What a trace of one sample returns: its SAMPLE_SCHEMA row and its cells (CELL_SCHEMA)."""

    sample: dict
    cells: pa.Table


def _sample_seed(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def make_corruption(adapter: Adapter, sample: Sample, enc: Encoded, spec: TraceSpec) -> Corruption:
    """The corrupted run's input: the chosen spans' tokens replaced, or noise for their embeddings."""
    ids = enc.input_ids.clone()
    if spec.corruption == "noise":
        gen = torch.Generator().manual_seed(_sample_seed(spec.seed, sample.sample_id))
        weight = adapter.embed_tokens.weight
        sigma = float(weight.detach().float().std())
        noise = spec.noise_scale * sigma * torch.randn(len(enc.corrupted_positions), weight.shape[1], generator=gen)
        return Corruption(ids, noise.to(adapter.dtype), "")
    texts = []
    for i in enc.corrupted:
        (start, end), text = enc.spans[i], sample.replacements[i]
        if text:
            ids[0, start:end] = torch.tensor(adapter.span_ids(text, end - start, sample.sample_id))
        else:
            ids[0, start:end] = adapter.token_id(spec.replacement)
        texts.append(text or spec.replacement)
    return Corruption(ids, None, "; ".join(texts))


def grid(enc: Encoded, spec: TraceSpec, num_layers: int,
         grid_slice: Iterable[tuple[str, int]] | None = None) -> list[CellKey]:
    """The cells of a sample: each (kind, layer) of the slice (default: all) x every traced position."""
    pairs = grid_slice if grid_slice is not None else [(k, i) for k in spec.kinds for i in range(num_layers)]
    return [CellKey(kind, layer, pos) for kind, layer in pairs for pos in range(enc.first_traced, enc.length)]


def fork_cache(cache, position: int, length: int, rows: int):
    """A copy of a one-row KV cache of `length` positions, cut to its first `position` and repeated for `rows`
    rows (a forward appends to the cache it is given, so each batched pass needs its own)."""
    cache = copy.deepcopy(cache)
    cache.crop(position - length)  # a negative count: drop the last length - position states
    cache.batch_repeat_interleave(rows)
    return cache


def _prob(logits: torch.Tensor, target: int) -> torch.Tensor:
    return logits[:, -1].float().softmax(-1)[:, target]


class Engine(ABC):
    """Shared by both engines: preparing a sample and turning cell values into rows."""

    name = "engine"

    def __init__(self, adapter: Adapter, spec: TraceSpec):
        self.adapter = adapter
        self.spec = spec

    @abstractmethod
    def prepare(self, sample: Sample) -> Prepared:
        """Encode the sample and run what every cell of it shares (clean and corrupted runs)."""

    @abstractmethod
    def restored(self, prep: Prepared, keys: list[CellKey]) -> Values:
        """p_restored for each key, and whether it took a forward pass."""

    def cells(self, prep: Prepared, keys: Iterable[CellKey] | None = None) -> pa.Table:
        keys = list(keys) if keys is not None else grid(prep.enc, self.spec, self.adapter.num_layers)
        with torch.inference_mode():
            values = self.restored(prep, keys)
        return self._table(prep, keys, values)

    def _table(self, prep: Prepared, keys, values: Values) -> pa.Table:
        enc, n = prep.enc, self.adapter.num_layers
        windows = [self.spec.layers_for(k.layer, n) for k in keys]
        ie = [v - prep.p_corrupt for v in values.p]
        cols = {
            "sample_id": [prep.sample.sample_id] * len(keys),
            "kind": [k.kind for k in keys],
            "layer": [k.layer for k in keys],
            "window": [self.spec.window] * len(keys),
            "layer_lo": [w[0] for w in windows],
            "layer_hi": [w[-1] for w in windows],
            "position": [k.position for k in keys],
            "token": [enc.tokens[k.position] for k in keys],
            "token_role": [enc.role(k.position) for k in keys],
            "aligned_role": [enc.aligned_role(k.position) for k in keys],
            "corrupted": [prep.sample.corruption_label] * len(keys),
            "p_clean": [prep.p_clean] * len(keys),
            "p_corrupt": [prep.p_corrupt] * len(keys),
            "p_restored": values.p,
            "ie": ie,
            "ie_norm": [normalised_ie(x, prep.p_clean, prep.p_corrupt) for x in ie],
            "computed": values.computed,
            "estimated": values.estimated or [False] * len(keys),
            "ie_estimate": values.ie_estimate if values.ie_estimate is not None else [None] * len(keys),
        }
        return pa.table(cols, schema=CELL_SCHEMA)

    def _model_inputs(self, enc: Encoded, rows: int) -> dict:
        dev = self.adapter.device
        out = {}
        if enc.pixel_values is not None:
            out["pixel_values"] = enc.pixel_values.to(dev).expand(rows, *enc.pixel_values.shape[1:])
        return out


class ReferenceEngine(Engine):
    """The authors' loop: 3 rows (clean, corrupted, restored) over the full sequence, one cell per pass."""

    name = "reference"

    def _batch(self, prep: Prepared, restore: list[Restore] | None) -> torch.Tensor:
        enc, cor = prep.enc, prep.corruption
        ids = torch.cat([enc.input_ids, cor.ids, cor.ids]).to(self.adapter.device)
        rows = [[], [], restore or []]
        with restoring(self.adapter, rows, SameBatchRow(0)), self._noise(prep):
            return self.adapter.model(input_ids=ids, **self._model_inputs(enc, 3)).logits

    def _noise(self, prep: Prepared):
        cor = prep.corruption
        if cor.noise is None:
            return nullcontext()
        return perturbing(self.adapter, [1, 2], prep.enc.corrupted_positions, cor.noise)

    def prepare(self, sample: Sample) -> Prepared:
        enc = self.adapter.encode(sample)
        cor = make_corruption(self.adapter, sample, enc, self.spec)
        prep = Prepared(sample, enc, cor, -1, 0.0, 0.0, {})
        with torch.no_grad():
            logits = self._batch(prep, None)
        probs = logits[:, -1].float().softmax(-1)
        prep.target = int(probs[0].argmax())
        prep.p_clean, prep.p_corrupt = float(probs[0, prep.target]), float(probs[1, prep.target])
        return prep

    def restored(self, prep, keys):
        n = self.adapter.num_layers
        values = []
        for k in keys:
            restore = [Restore(k.kind, self.spec.layers_for(k.layer, n), k.position)]
            values.append(float(_prob(self._batch(prep, restore)[2:3], prep.target)))
        return Values(values, [True] * len(keys))


class FastV1Engine(Engine):
    """The previous fast engine, kept to measure the current one against (`--engine fast-v1`): every cell runs
    every layer, on its own copy of the corrupted cache, one position per batch."""

    name = "fast-v1"

    def prepare(self, sample: Sample) -> Prepared:
        ad = self.adapter
        enc = ad.encode(sample)
        cor = make_corruption(ad, sample, enc, self.spec)
        start = enc.diverges
        dev = ad.device
        with torch.no_grad():
            with capturing_embeds(ad) as box, recording(ad, self.spec.kinds, start=start) as store:
                clean = ad.model(input_ids=enc.input_ids.to(dev), **self._model_inputs(enc, 1), use_cache=True,
                                 logits_to_keep=1)
            embeds = box["embeds"]
            corrupt_embeds = embeds.clone()
            at = enc.corrupted_positions
            if cor.noise is not None:
                corrupt_embeds[0, at] += cor.noise.to(dev)
            else:
                corrupt_embeds[0, at] = ad.embed_tokens(cor.ids[:, at].to(dev))[0]
            with recording(ad, ["hidden", "mlp"]) as corrupted:
                out = self._corrupted(clean.cache, corrupt_embeds, start, enc.length)
        probs_clean = clean.logits[0, -1].float().softmax(-1)
        target = int(probs_clean.argmax())
        p_corrupt = float(_prob(out.logits, target))
        # The corrupted run's residual stream at positions >= start: the embeddings, then each layer's output.
        corrupted = stack_recorded(corrupted)
        residual = torch.cat([corrupt_embeds[:, start:], corrupted["hidden"]])
        extra = {"states": Recorded(stack_recorded(store), base=start), "embeds": corrupt_embeds,
                 "cache": out.cache, "residual": residual, "corrupt_mlp": corrupted["mlp"]}
        return Prepared(sample, enc, cor, target, float(probs_clean[target]), p_corrupt, extra)

    def _corrupted(self, clean_cache, embeds: torch.Tensor, start: int, length: int):
        """The corrupted run, on the clean run's cache of the positions before the constraint: their inputs are
        the same in both runs, so the prefix (the image's tokens included) is computed once per sample."""
        if start == 0:
            return self.adapter.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        clean_cache.crop(start - length)  # a negative count: keep the first `start` positions
        return self.adapter.model(inputs_embeds=embeds[:, start:], cache=clean_cache, use_cache=True, logits_to_keep=1)

    def restored(self, prep, keys):
        values = [prep.p_corrupt] * len(keys)
        computed = [False] * len(keys)
        start = prep.enc.diverges
        by_position: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            if k.position >= start:
                by_position.setdefault(k.position, []).append(i)
        for position, idx in sorted(by_position.items()):
            for lo in range(0, len(idx), self.spec.max_batch):
                chunk = idx[lo:lo + self.spec.max_batch]
                probs = self._run(prep, position, [keys[i] for i in chunk])
                for i, p in zip(chunk, probs.tolist()):
                    values[i], computed[i] = p, True
        return Values(values, computed)

    def _run(self, prep: Prepared, position: int, keys: list[CellKey]) -> torch.Tensor:
        """One batched pass: rows restore their cell at `position`, on the corrupted cache cropped there."""
        n, rows = self.adapter.num_layers, len(keys)
        cache = fork_cache(prep.extra["cache"], position, prep.enc.length, rows)
        embeds = prep.extra["embeds"][:, position:].expand(rows, -1, -1)
        restores = [[Restore(k.kind, self.spec.layers_for(k.layer, n), position)] for k in keys]
        with restoring(self.adapter, restores, prep.extra["states"], offset=position):
            out = self.adapter.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        return _prob(out.logits, prep.target)


class FastEngine(FastV1Engine):
    """Same numbers as the reference at the compute floor: a cell restoring layers lo..hi at position t runs
    only layers >= lo on positions >= t (`workers/stack.py`), on the corrupted run's residual stream and its
    shared KV cache; rows of any position and entry layer share batches sized by the memory budget.

    A restored `hidden` or `mlp` cell does not even run layer lo: at lo only position t's output differs from
    the corrupted run's, and it is known (the clean hidden state; the corrupted output with the corrupted MLP
    output swapped for the clean one), so the row enters at lo + 1 with that vector at t.
    """

    name = "fast"

    def __init__(self, adapter: Adapter, spec: TraceSpec):
        super().__init__(adapter, spec)
        self.splits = 0  # batches halved after running out of memory
        self.skips = {"hidden", "mlp"} if adapter.mlp_adds_to_residual else {"hidden"}

    def restored(self, prep, keys):
        values, computed = [prep.p_corrupt] * len(keys), [False] * len(keys)
        todo = [i for i, k in enumerate(keys) if k.position >= prep.enc.diverges]
        sizes = [prep.enc.length - keys[i].position for i in todo]
        budget = token_budget(self.adapter, self.spec.memory_budget, prep.enc.length)
        for batch in plan_batches(sizes, budget, self.spec.max_batch, dense_tokens(self.adapter)):
            idx = sorted((todo[j] for j in batch), key=lambda i: self._entry(keys[i]))
            probs = self._halving(prep, [keys[i] for i in idx])
            for i, p in zip(idx, probs.tolist()):
                values[i], computed[i] = p, True
        return Values(values, computed)

    def _window(self, key: CellKey) -> tuple[int, ...]:
        return self.spec.layers_for(key.layer, self.adapter.num_layers)

    def _entry(self, key: CellKey) -> int:
        return self._window(key)[0] + (key.kind in self.skips)

    def _halving(self, prep: Prepared, keys: list[CellKey]) -> torch.Tensor:
        """`_rows` on `keys`, split in two and retried (recursively) when a batch runs out of memory."""
        try:
            return self._rows(prep, keys)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if len(keys) == 1 or not out_of_memory(exc):
                raise
        self.splits += 1
        release_memory(self.adapter.device)
        half = len(keys) // 2
        return torch.cat([self._halving(prep, keys[:half]), self._halving(prep, keys[half:])])

    def _rows(self, prep: Prepared, keys: list[CellKey]) -> torch.Tensor:
        """One batched pass: row b restores its cell from its entry layer on, at its own position."""
        start = prep.enc.diverges
        rows = [Row(k.position, self._entry(k)) for k in keys]
        restores = [[Restore(k.kind, self._window(k)[k.kind in self.skips:], k.position)] for k in keys]
        with restoring(self.adapter, restores, prep.extra["states"], offset=[k.position for k in keys]):
            logits = run_rows(self.adapter, rows, prep.extra["residual"], start, prep.extra["cache"],
                              prep.enc.length, first=self._first(prep, keys))
        return logits.float().softmax(-1)[:, prep.target]

    def _first(self, prep: Prepared, keys: list[CellKey]) -> torch.Tensor:
        """Each row's input at its own position at its entry layer (see the class docstring)."""
        residual, clean = prep.extra["residual"], prep.extra["states"].states
        start = prep.enc.diverges
        out = []
        for k in keys:
            lo, i = self._window(k)[0], k.position - start
            if k.kind not in self.skips:
                out.append(residual[lo, i])
            elif k.kind == "hidden":
                out.append(clean["hidden"][lo, i])
            else:  # mlp: the corrupted output with the corrupted MLP output swapped for the clean one
                out.append(residual[lo + 1, i] - prep.extra["corrupt_mlp"][lo, i] + clean["mlp"][lo, i])
        return torch.stack(out).to(residual.dtype)


class AtpEngine(FastEngine):
    """Attribution patching, then exact restoration of the cells it ranks highest (`--engine atp --recheck K`).

    One backward pass of log p(target) through the corrupted run gives every cell's first-order estimate:
    restoring the clean output c at a site whose corrupted output is x changes log p by about
    (c - x) . dlog p/dx, summed over the window's layers, and so p by p_corrupt (e^that - 1). Log p, not p: a
    confident corrupted run has p near 0, where dp/dx vanishes and every estimate with it. Per sample and kind
    the `recheck` cells of largest |estimate| (over the kind's whole grid, so the choice does not depend on how
    the grid is cut into units) are restored exactly by the fast engine; the rest keep the estimate, marked
    `estimated` in the cells table.
    """

    name = "atp"

    def prepare(self, sample: Sample) -> Prepared:
        with torch.inference_mode(False):  # the backward below needs tensors made outside inference mode
            prep = super().prepare(sample)
            attribution = self._attribution(prep)
        estimate = {k: self._windowed(a) for k, a in attribution.items()}
        prep.extra.update(estimate=estimate, recheck=self._top(prep, estimate))
        return prep

    def _attribution(self, prep: Prepared) -> dict[str, torch.Tensor]:
        """Per kind, (layers, T - start): (clean - corrupted) . d log p / d(corrupted output), at each site."""
        start = prep.enc.diverges
        residual = prep.extra["residual"].detach().clone().requires_grad_(True)
        with torch.enable_grad(), retaining(self.adapter, self.spec.kinds) as outputs:
            logits = run_rows(self.adapter, [Row(start, 0)], residual, start, prep.extra["cache"], prep.enc.length)
            logits.float().log_softmax(-1)[0, prep.target].backward()
        clean = prep.extra["states"].states
        return {kind: torch.stack([((clean[kind][i] - out[0]) * out.grad[0]).sum(-1).detach()
                                   for i, out in enumerate(outputs[kind])]).float()
                for kind in self.spec.kinds}

    def _windowed(self, attribution: torch.Tensor) -> torch.Tensor:
        """(layers, T - start): each window centre's estimate, the sum over the layers its window restores."""
        n = self.adapter.num_layers
        return torch.stack([attribution[list(self.spec.layers_for(c, n))].sum(0) for c in range(n)])

    @staticmethod
    def _ie(prep: Prepared, log_ratio: float) -> float:
        """The ie a first-order change of log p implies, within what a probability allows."""
        p = prep.p_corrupt * math.exp(min(log_ratio, 700.0))
        return min(p, 1.0) - prep.p_corrupt

    def _top(self, prep: Prepared, estimate: dict[str, torch.Tensor]) -> set[CellKey]:
        start, chosen = prep.enc.diverges, set[CellKey]()
        for kind, est in estimate.items():
            order = torch.argsort(-est.abs().flatten(), stable=True)[:self.spec.recheck].tolist()
            width = est.shape[1]
            chosen.update(CellKey(kind, i // width, start + i % width) for i in order)
        return chosen

    def restored(self, prep, keys):
        start, chosen = prep.enc.diverges, prep.extra["recheck"]
        est = [self._ie(prep, float(prep.extra["estimate"][k.kind][k.layer, k.position - start]))
               if k.position >= start else 0.0 for k in keys]
        values, computed = [prep.p_corrupt + e for e in est], [False] * len(keys)
        estimated = [k.position >= start for k in keys]
        exact = [i for i, k in enumerate(keys) if k in chosen]
        checked = super().restored(prep, [keys[i] for i in exact])
        for j, i in enumerate(exact):
            values[i], computed[i], estimated[i] = checked.p[j], checked.computed[j], False
        return Values(values, computed, estimated, list(est))


# A sample's own faults: recorded as its error row, committed, never retried.
SAMPLE_ERRORS = (SampleError, ConstraintNotFound)

ENGINE_CLASSES: dict[str, type[Engine]] = {"fast": FastEngine, "reference": ReferenceEngine, "atp": AtpEngine,
                                             "fast-v1": FastV1Engine}
assert tuple(ENGINE_CLASSES) == ENGINES


def make_engine(name: str, adapter: Adapter, spec: TraceSpec) -> Engine:
    if name not in ENGINE_CLASSES:
        raise ValueError(f"engine {name!r} not among {ENGINES}")
    return ENGINE_CLASSES[name](adapter, spec)


def sample_row(prep: Prepared | None, sample: Sample, num_cells: int = 0, error: str | None = None) -> dict:
    """The SAMPLE_SCHEMA row of a traced (or failed) sample."""
    row: dict[str, Any] = {"sample_id": sample.sample_id, "subset": sample.subset, "question": sample.question,
                           "constraint": sample.constraint, "answer": sample.answer, "answer_token": None,
                           "answer_token_id": None, "p_clean": None, "p_corrupt": None, "corrupt_token": None,
                           "num_tokens": None, "constraint_start": None, "constraint_end": None,
                           "first_traced": None, "placeholder_image": sample.placeholder_image,
                           "num_cells": num_cells, "status": "error" if error else "ok", "error": error,
                           "corrupted": sample.corruption_label, "match": sample.meta_value("match", "exact"),
                           "match_confidence": float(sample.meta_value("match_confidence", "1"))}
    if prep is None:
        return row
    enc = prep.enc
    if prep.target >= 0:
        row.update(answer_token=prep.extra.get("answer_token"), answer_token_id=prep.target)
    row.update(p_clean=prep.p_clean, p_corrupt=prep.p_corrupt, corrupt_token=prep.corruption.token,
               num_tokens=enc.length, constraint_start=enc.constraint[0], constraint_end=enc.constraint[1],
               first_traced=enc.first_traced)
    return row


def trace_sample(adapter: Adapter, sample: Sample, spec: TraceSpec, engine: str | Engine = "fast",
                 keys: Iterable[CellKey] | None = None, grid_slice: Iterable[tuple[str, int]] | None = None,
                 prepare=None) -> SampleTrace:
    """Trace one sample (all cells, the given `keys`, or a `grid_slice` of (kind, layer) pairs).

    This is the one place that tells a sample's own fault (`SAMPLE_ERRORS`, or `Sample.error` from the
    dataset) from a failure of the machine: the first returns an error row and no cells, the second (out of
    memory, a CUDA error, a missing module) propagates, so the unit holding the sample is never committed.
    `prepare` lets a caller reuse a prepared sample across slices (the worker keeps the last one).
    """
    eng = make_engine(engine, adapter, spec) if isinstance(engine, str) else engine
    if sample.error:
        return SampleTrace(sample_row(None, sample, error=sample.error), CELL_SCHEMA.empty_table())
    try:
        prep = (prepare or eng.prepare)(sample)
        prep.extra["answer_token"] = adapter.tokenizer.decode([prep.target])
        keys = grid(prep.enc, spec, adapter.num_layers, grid_slice) if keys is None else keys
        table = eng.cells(prep, keys)
    except SAMPLE_ERRORS as exc:
        msg = str(exc) if sample.sample_id in str(exc) else f"{sample.sample_id}: {exc}"
        return SampleTrace(sample_row(None, sample, error=msg), CELL_SCHEMA.empty_table())
    return SampleTrace(sample_row(prep, sample, table.num_rows), table)
