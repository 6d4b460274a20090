"""Interventions as data, applied through one set of hooks.

A `Restore` says: in this batch row, replace the output of `kind` at `position`, in each of `layers`, by a
clean value. A batch is a list of restore sets, one per row. `restoring` applies them for the duration of a
forward pass, taking clean values from a `Source`: either states recorded from an earlier clean pass
(`Recorded`, the fast engine) or row 0 of the same pass (`SameBatchRow`, the authors' 3-row scheme, the
reference engine). `recording` captures states; `perturbing` edits the token embeddings of chosen rows
(Gaussian-noise corruption); `capturing` takes one site's input and output at one position per row (an
edit's key and value) and `shifting` adds a vector to a site's output there, differentiably (an edit's δ).
`knocking_out` blocks attention edges (a `Knockout` per row: source positions no longer visible to target
positions in some layers) by rewriting the mask each attention layer receives; `recording_attention` keeps
each layer's attention weights and value vectors (the parts of an attention contribution).
Engines, attention knockout and edits all go through here, so there is one place that knows module output
shapes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Restore:
    """Copy the clean output of `kind` at absolute `position` into this row, in each of `layers`."""

    kind: str
    layers: tuple[int, ...]
    position: int


def _main_tensor(output):
    """The hidden-state tensor in a module's output: attention returns (attn_output, weights)."""
    return output[0] if isinstance(output, tuple) else output


class Source(Protocol):
    """Where clean values come from: the values for `positions` (absolute) of `kind` at `layer`.

    `live` is the module output being patched; `tokens` are the indices of `positions` along its sequence axis.
    """

    def values(self, kind: str, layer: int, positions: torch.Tensor, live: torch.Tensor,
               tokens: torch.Tensor) -> torch.Tensor:
        ...


class SameBatchRow:
    """Row `row` of the very pass being patched (the authors' clean row 0)."""

    def __init__(self, row: int = 0):
        self.row = row

    def values(self, kind, layer, positions, live, tokens):
        return live[self.row, tokens].clone()


class Recorded:
    """States recorded from a clean pass: `states[kind]` is (layers, T, d) for positions [base, base + T)."""

    def __init__(self, states: dict[str, torch.Tensor], base: int = 0):
        self.states = states
        self.base = base

    def values(self, kind, layer, positions, live, tokens):
        states = self.states[kind][layer].to(live.device)  # a no-op unless the states were kept elsewhere
        return states[positions - self.base].to(live.dtype)


class _OnDevice:
    """An index list (or a tensor) on whichever device the hooked module's output lives, copied once per device.

    Hooks see outputs on the model's device (CUDA, or one device per layer when a model is sharded), so the
    indices follow the output rather than the CPU where the cells were listed.
    """

    def __init__(self, values: Sequence[int] | torch.Tensor):
        self.value = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.long)
        self.by_device: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self.by_device:
            self.by_device[device] = self.value.to(device)
        return self.by_device[device]


def _index(rows: Sequence[Sequence[Restore]], offsets: Sequence[int]) -> dict[tuple[str, int], tuple[list, list, list]]:
    """(kind, layer) -> (batch rows, absolute positions, token indices) to patch, so each hook does one write."""
    where: dict[tuple[str, int], tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for b, restores in enumerate(rows):
        for r in restores:
            for layer in r.layers:
                rows_, positions, tokens = where[(r.kind, layer)]
                rows_.append(b)
                positions.append(r.position)
                tokens.append(r.position - offsets[b])
    return where


@contextmanager
def restoring(adapter, rows: Sequence[Sequence[Restore]], source: Source,
              offset: int | Sequence[int] = 0) -> Iterator[None]:
    """Apply `rows[b]` to batch row b during forwards inside the block.

    `offset` is the absolute position of the first input token (non-zero when a KV cache holds the prefix),
    one for all rows or one per row (rows that start at different positions in one batch). The write is in
    place on the module's output, so the residual addition downstream sees the clean value.
    """
    offsets = [offset] * len(rows) if isinstance(offset, int) else list(offset)
    handles = []
    try:
        for (kind, layer), (b, pos, tok) in _index(rows, offsets).items():
            b_t, pos_t, tok_t = _OnDevice(b), _OnDevice(pos), _OnDevice(tok)

            def hook(module, args, output, kind=kind, layer=layer, b_t=b_t, pos_t=pos_t, tok_t=tok_t):
                live = _main_tensor(output)
                dev = live.device
                live[b_t.on(dev), tok_t.on(dev)] = source.values(kind, layer, pos_t.on(dev), live, tok_t.on(dev))
                return output

            handles.append(adapter.site(kind, layer).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _keeping(adapter, kinds: Sequence[str], keep) -> Iterator[dict[str, list]]:
    """A dict kind -> list over layers that each site's forward fills with `keep(output)`."""
    store: dict[str, list] = {k: [None] * adapter.num_layers for k in kinds}
    handles = []
    try:
        for kind in kinds:
            for layer in range(adapter.num_layers):
                def hook(module, args, output, kind=kind, layer=layer):
                    store[kind][layer] = keep(_main_tensor(output))

                handles.append(adapter.site(kind, layer).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def recording(adapter, kinds: Sequence[str], start: int = 0):
    """Record row 0's outputs of every layer's `kinds` sites at positions >= `start`.

    Yields a dict kind -> list over layers, filled during the forward; `stack_recorded` turns it into the
    (layers, T, d) tensors `Recorded` expects.
    """
    return _keeping(adapter, kinds, lambda live: live[0, start:].detach().clone())


def _retained(live: torch.Tensor) -> torch.Tensor:
    live.retain_grad()
    return live


def retaining(adapter, kinds: Sequence[str]):
    """Keep every layer's `kinds` site outputs (the live tensors, with their `.grad` once a backward has run):
    attribution patching's activations and the gradients it weighs them by."""
    return _keeping(adapter, kinds, _retained)


def stack_recorded(store: dict[str, list]) -> dict[str, torch.Tensor]:
    return {kind: torch.stack(per_layer) for kind, per_layer in store.items()}


@contextmanager
def perturbing(adapter, rows: Sequence[int], positions: Sequence[int], delta: torch.Tensor) -> Iterator[None]:
    """Add `delta` (len(positions), d) to the token embeddings of `rows` at `positions`.

    The noise is drawn on the CPU (so a seed gives the same draw on every machine) and moved to the
    embedding output's device and dtype when added.
    """
    rows_t = _OnDevice([r for r in rows for _ in positions])
    pos_t = _OnDevice([p for _ in rows for p in positions])
    add = delta.repeat(len(rows), 1)

    def hook(module, args, output):
        output = output.clone()
        dev = output.device
        output[rows_t.on(dev), pos_t.on(dev)] += add.to(dev, output.dtype)
        return output

    handle = adapter.embed_tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capturing_embeds(adapter) -> Iterator[dict]:
    """Capture the merged input embeddings the decoder receives (image features already scattered in)."""
    box: dict = {}

    def pre_hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # a text model called with ids embeds them inside the decoder
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = adapter.embed_tokens(ids)
        box["embeds"] = embeds.detach().clone()

    handle = adapter.decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@dataclass(frozen=True)
class Shift:
    """Add `delta` (d,) to the output of `kind` at `layer`, at absolute `position`, in every batch row."""

    kind: str
    layer: int
    position: int
    delta: torch.Tensor


@contextmanager
def shifting(adapter, shifts: Sequence[Shift], offset: int = 0) -> Iterator[None]:
    """Apply `shifts` during forwards inside the block.

    Unlike `restoring`, the hook returns a new tensor rather than writing in place, so gradients reach each
    `delta` (an edit optimises it) and the module's own output stays intact for autograd.
    """
    handles = []
    try:
        for s in shifts:
            def hook(module, args, output, s=s):
                live = _main_tensor(output)
                added = torch.zeros_like(live)
                added[:, s.position - offset] = s.delta.to(live.device, live.dtype)
                shifted = live + added
                return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

            handles.append(adapter.site(s.kind, s.layer).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capturing(adapter, kind: str, layer: int, positions: Sequence[int]) -> Iterator[dict[str, torch.Tensor]]:
    """The input and output of `kind` at `layer`, row b at absolute `positions[b]`, as (rows, d) tensors
    `box["input"]` and `box["output"]`, filled during the forward (detached: they are an edit's key and value)."""
    box: dict[str, torch.Tensor] = {}
    pos = _OnDevice(positions)

    def hook(module, args, output):
        live, inp = _main_tensor(output), args[0]
        rows = torch.arange(live.shape[0], device=live.device)
        box["input"] = inp[rows, pos.on(live.device)].detach().clone()
        box["output"] = live[rows, pos.on(live.device)].detach().clone()

    handle = adapter.site(kind, layer).register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@dataclass(frozen=True)
class Knockout:
    """In each of `layers`, hide the keys at absolute `sources` from the queries at absolute `targets`."""

    layers: tuple[int, ...]
    sources: tuple[int, ...]
    targets: tuple[int, ...]


def knockout_masks(rows: Sequence[Sequence[Knockout]], layers: int, offset: int, q_len: int,
                   dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """layer -> an additive (rows, 1, q_len, offset + q_len) mask: causal, plus the rows' blocked edges there.

    Queries are the absolute positions offset..offset+q_len-1 and keys 0..offset+q_len-1 (rows unpadded). A
    query never loses its own key, so no row of the softmax is empty. Layers no row blocks get no mask (the
    model's own mask serves them).
    """
    k_len = offset + q_len
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(offset)
    allowed: dict[int, torch.Tensor] = {}
    for b, knockouts in enumerate(rows):
        for ko in knockouts:
            sources = torch.tensor(ko.sources, dtype=torch.long)
            targets = torch.tensor([t - offset for t in ko.targets if offset <= t < k_len], dtype=torch.long)
            for layer in ko.layers:
                if layer not in allowed:
                    allowed[layer] = causal.expand(len(rows), q_len, k_len).clone()
                block = torch.zeros(q_len, k_len, dtype=torch.bool)
                block[targets.unsqueeze(1), sources.unsqueeze(0)] = True
                block[torch.arange(q_len), torch.arange(q_len) + offset] = False
                allowed[layer][b] &= ~block
    low = torch.finfo(dtype).min
    return {layer: torch.zeros(m.shape, dtype=dtype).masked_fill(~m, low).unsqueeze(1) for layer, m in allowed.items()
            if layer < layers}


@contextmanager
def knocking_out(adapter, rows: Sequence[Sequence[Knockout]], q_len: int, offset: int = 0) -> Iterator[None]:
    """Apply `rows[b]` to batch row b during forwards of `q_len` positions from `offset` inside the block.

    The mask, not the values: each blocked layer's attention is called with an explicit additive mask (merged
    with the model's own), which eager and SDPA attention both honour (`Adapter.masked_attention` switches any
    other implementation to eager).
    """
    masks = knockout_masks(rows, adapter.num_layers, offset, q_len, adapter.dtype)
    handles = []
    try:
        for layer, mask in masks.items():
            on = _OnDevice(mask)

            def pre_hook(module, args, kwargs, on=on):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                mine = on.on(hidden.device)
                kwargs["attention_mask"] = _merged_mask(kwargs.get("attention_mask"), mine, hidden.dtype)
                return args, kwargs

            handles.append(adapter.site("attn", layer).register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _merged_mask(given, mine: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The knockout mask on top of the model's own, when the model passes one of the same shape (a sliding
    window, padding): additive masks add, boolean ones (True = attend) are and-ed."""
    if not isinstance(given, torch.Tensor) or given.shape[-2:] != mine.shape[-2:]:
        return mine.to(dtype)
    if given.dtype == torch.bool:
        return given & (mine == 0)
    return (given.to(dtype) + mine.to(dtype)).clamp_min(torch.finfo(dtype).min)


@dataclass
class AttentionRecord:
    """Row 0's attention at one layer: `weights` (heads, T, T) and the values `values` (T, kv heads, head dim)."""

    weights: torch.Tensor
    values: torch.Tensor


@contextmanager
def recording_attention(adapter, layers: Sequence[int]) -> Iterator[dict[int, AttentionRecord]]:
    """Row 0's attention weights and value vectors at each of `layers`, filled during a full forward (no cache).

    The weights are what the attention returns beside its output, so the pass must run eager attention
    (`adapter.masked_attention(eager=True)`); the values are the value projection's output, split by head.
    """
    store: dict[int, AttentionRecord] = {}
    values: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:
            attn = adapter.site("attn", layer)
            head_dim = adapter.attention_shape(layer).head_dim

            def v_hook(module, args, output, layer=layer, head_dim=head_dim):
                values[layer] = output[0].detach().unflatten(-1, (-1, head_dim)).clone()

            def hook(module, args, output, layer=layer):
                weights = output[1] if isinstance(output, tuple) else None
                if weights is None:
                    raise RuntimeError("attention weights were not returned: run the pass with eager attention")
                store[layer] = AttentionRecord(weights[0].detach().clone(), values.pop(layer))

            handles.append(adapter.value_proj(layer).register_forward_hook(v_hook))
            handles.append(attn.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
