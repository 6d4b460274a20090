"""Running the decoder from any layer, many rows at once, on one shared prefix.

A restoration at layer l and position t changes nothing below l and nothing before t. So the row of such a
cell enters the stack at layer l, with the corrupted run's residual stream at positions t..T-1 as its input,
and in every layer attends to the corrupted run's keys and values of the positions before t. Those keys and
values are one tensor per layer that every row reads and none copies: `shared_prefix_attention` scores a row's
queries against the shared keys (masked from the row's own first position on) and against the row's own keys
(causal), with one softmax over both.

Rows of different positions and entry layers share a batch (`run_rows`): row b holds positions t_b..T-1, right
padded to the longest row; rows are sorted by entry layer, so the rows alive at layer l are the first n_l and
a row joins the batch at its own layer. Padding never reaches a real token: a real query at index i sees its
row's own keys 0..i only, all real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMPLEMENTATION = "mmtrace_shared_prefix"


@dataclass(frozen=True)
class Row:
    """One batch row: it computes positions `position`..T-1 from layer `entry` on."""

    position: int
    entry: int


@dataclass
class Prefix:
    """The corrupted run's keys and values of every layer, (kv heads, P, head dim) each, and the batch's rows.

    Row b may read shared positions < `starts[b]` only; from there on it has keys of its own.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    starts: torch.Tensor  # (B,) long, on the model's device

    @classmethod
    def from_cache(cls, cache, starts: torch.Tensor) -> Prefix:
        return cls([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers], starts)

    def visible(self, rows: int, own: int) -> torch.Tensor:
        """(1, rows, 1, own, P + own) bool: shared keys before the row's start, its own keys causally."""
        length = self.keys[0].shape[1]
        dev = self.starts.device
        shared = torch.arange(length, device=dev)[None, :] < self.starts[:rows, None]  # (rows, P)
        causal = torch.ones(own, own, dtype=torch.bool, device=dev).tril()
        both = torch.cat([shared[:, None, :].expand(rows, own, length), causal.expand(rows, own, own)], dim=-1)
        return both[None, :, None]


def shared_prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of a batch's rows over the shared prefix and their own keys (an `AttentionInterface`).

    query (B, H, T, d) and key/value (B, Hkv, T, d) are the rows' own; grouped-query heads read their kv head.
    The scores are laid out kv head first, (Hkv, B * groups * T, P + T), so the shared part is one matmul per
    kv head over all rows' queries and the prefix is never replicated; the big tensor is masked in place.
    """
    prefix: Prefix = kwargs["mmtrace_prefix"]
    pk, pv = prefix.keys[module.layer_idx], prefix.values[module.layer_idx]  # (Hkv, P, d)
    b, h, t, d = query.shape
    hkv, length = key.shape[1], pk.shape[1]
    q = (query * scaling).view(b, hkv, h // hkv, t, d)
    own = (q @ key[:, :, None].transpose(-1, -2)).transpose(0, 1)  # (Hkv, B, groups, T, T)
    flat = q.transpose(0, 1).reshape(hkv, -1, d)
    scores = torch.cat([torch.bmm(flat, pk.transpose(1, 2)), own.reshape(hkv, -1, t)], dim=-1)
    scores.view(hkv, b, h // hkv, t, -1).masked_fill_(~prefix.visible(b, t), float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs[:, :, :length], pv).view(hkv, b, h // hkv, t, d)
    own_probs = probs[:, :, length:].reshape(hkv, b, h // hkv, t, t).transpose(0, 1)
    out = out.transpose(0, 1) + own_probs @ value[:, :, None]
    return out.reshape(b, h, t, d).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)


_register()


def _entries(residual: torch.Tensor, base: int, rows: Sequence[Row], width: int, length: int,
             first: torch.Tensor | None) -> torch.Tensor:
    """The inputs of `rows` at their entry layer: residual[entry][t - base ..], right padded to `width`, with
    each row's own first token replaced by `first` (one vector per row) when given."""
    dev = residual.device
    starts = torch.tensor([r.position - base for r in rows], device=dev)
    index = (starts[:, None] + torch.arange(width, device=dev)[None, :]).clamp(max=length - base - 1)
    layers = torch.tensor([r.entry for r in rows], device=dev)
    out = residual[layers[:, None], index]
    if first is not None:
        out[:, 0] = first
    return out


def run_rows(adapter, rows: Sequence[Row], residual: torch.Tensor, base: int, cache, length: int,
             first: torch.Tensor | None = None) -> torch.Tensor:
    """Final-position logits (B, vocab) of `rows`, which must be sorted by entry layer.

    `residual` (layers + 1, T - base, d) holds each layer's input in the corrupted run at positions >= `base`,
    then the last layer's output (a row entering at `num_layers` runs no layer); `cache` the corrupted run's KV
    cache of all T positions; `first` (B, d), if given, each row's input at its own position t at its entry.
    Hooks registered on the layers' sites (a restoration) fire as in a full forward, with token index i of row
    b at absolute position t_b + i.
    """
    dev = residual.device
    starts = torch.tensor([r.position for r in rows], device=dev)
    sizes = length - starts
    width = int(sizes.max())
    position_ids = (starts[:, None] + torch.arange(width, device=dev)[None, :]).clamp(max=length - 1)
    cos, sin = adapter.position_embeddings(residual[:1, :1], position_ids)
    prefix = Prefix.from_cache(cache, starts)
    entries = [r.entry for r in rows]
    hidden = residual.new_empty(0, width, residual.shape[-1])
    with adapter.attention_implementation(IMPLEMENTATION):
        for layer in range(entries[0], adapter.num_layers + 1):
            joining = [i for i, e in enumerate(entries) if e == layer]
            if joining:
                lo, hi = joining[0], joining[-1] + 1
                new = _entries(residual, base, rows[lo:hi], width, length, None if first is None else first[lo:hi])
                hidden = torch.cat([hidden, new])
            if layer == adapter.num_layers:
                break
            n = hidden.shape[0]
            hidden = adapter.layers[layer](hidden, attention_mask=None, position_ids=position_ids[:n],
                                           position_embeddings=(cos[:n], sin[:n]), mmtrace_prefix=prefix)
    last = hidden[torch.arange(len(rows), device=dev), sizes - 1]
    return adapter.lm_head(adapter.final_norm(last))


# -- batches sized by memory ---------------------------------------------------------------------------------
CPU_BUDGET = 2**30  # beyond ~1 GiB of activations a CPU's matmuls run no faster
DENSE_ELEMENTS = 2**17  # a batch's residual stream smaller than this is cheaper padded than split


def device_budget(device: torch.device) -> int:
    """What 'auto' means: half the free memory of a GPU, 1 GiB on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    return CPU_BUDGET


def token_bytes(config, context: int, element: int) -> int:
    """Activation bytes one row token holds during a layer: residual and projections, the MLP's intermediate,
    and the fp32 attention scores over `context` keys with the softmax's temporaries."""
    width, inner, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    return element * (8 * width + 4 * inner) + 16 * heads * context


def token_budget(adapter, budget: str, length: int) -> int:
    """How many row tokens (rows x padded width) a batch may hold under `budget` (TraceSpec.memory_budget)."""
    from mmtrace.workers.spec import parse_bytes

    total = parse_bytes(budget) or device_budget(adapter.device)
    config = adapter.decoder.config
    return max(1, total // token_bytes(config, 2 * length, adapter.dtype.itemsize))


def dense_tokens(adapter) -> int:
    """Row tokens below which a batch's cost is its per-pass overhead (`plan_batches`'s `dense`)."""
    return DENSE_ELEMENTS // adapter.decoder.config.hidden_size


def plan_batches(sizes: Sequence[int], budget: int, max_rows: int, dense: int = 0) -> list[list[int]]:
    """Indices of rows (by their token counts `sizes`) grouped into batches, longest rows first.

    A batch pads its rows to its longest, so it holds rows x longest tokens: at most `budget` (a row alone may
    exceed it) and at most `max_rows` rows. Once a batch holds more than `dense` tokens (where arithmetic, not
    the per-pass overhead, sets its cost), a row more than a quarter shorter than its longest starts a new
    batch, which keeps padding under a quarter of any such batch.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            longest = sizes[batch[0]]
            fits = (len(batch) + 1) * longest <= budget and len(batch) < max_rows
            padded = 4 * (longest - sizes[i]) > longest and (len(batch) + 1) * longest > dense
            if fits and not padded:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or a CPU allocation that failed."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
