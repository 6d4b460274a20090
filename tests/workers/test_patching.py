"""`workers/patching.py` on a toy decoder whose every site output is known, so each write can be checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmtrace.workers.adapters import Adapter
from mmtrace.workers.patching import (
    Recorded,
    Restore,
    SameBatchRow,
    capturing_embeds,
    perturbing,
    recording,
    restoring,
    stack_recorded,
)

D, T, LAYERS, VOCAB = 4, 6, 3, 11


class ToyAttention(nn.Module):
    """Mixes positions causally (a running mean) and returns (output, weights) like a HF attention module."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, h):
        mean = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[:, None]
        return self.proj(mean), None


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = ToyAttention()
        self.mlp = nn.Linear(D, D)

    def forward(self, h):
        h = h + self.self_attn(h)[0]
        return h + self.mlp(h)


class ToyDecoder(nn.Module):
    """Records what each site returned (after its hooks ran) in `seen`, the ground truth for the tests."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(ToyBlock() for _ in range(LAYERS))
        self.seen: dict = {}

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        self.seen = {}
        for i, block in enumerate(self.layers):
            for kind, module in (("attn", block.self_attn), ("mlp", block.mlp)):
                self._watch(module, kind, i)
            h = block(h)
            self.seen[("hidden", i)] = h.detach().clone()
        return h

    def _watch(self, module, kind, layer):
        """A one-shot hook registered last, so it sees the output after the hooks under test wrote it."""
        def hook(mod, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.seen[(kind, layer)] = out.detach().clone()
            handle.remove()

        handle = module.register_forward_hook(hook)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = ToyDecoder()

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds)


class ToyAdapter(Adapter):
    """The real `Adapter` base (its `site`, `layers`, `embed_tokens`) over the toy decoder."""

    family = "toy"

    @property
    def decoder(self):
        return self.model.model

    def encode(self, sample):
        raise NotImplementedError


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyAdapter(ToyModel(), tokenizer=None)


def ids(rows: int = 3) -> torch.Tensor:
    return torch.arange(rows * T).reshape(rows, T) % VOCAB


def run(adapter, x=None, rows: int = 3) -> dict:
    with torch.no_grad():
        adapter.model(input_ids=ids(rows)) if x is None else adapter.model(inputs_embeds=x)
    return dict(adapter.decoder.seen)


def marked_states(kinds=("mlp", "attn", "hidden"), base: int = 0) -> dict:
    """Recorded states whose every entry says where it came from: 1000 + 100 layer + position."""
    n = T - base
    value = 1000 + 100 * torch.arange(LAYERS)[:, None, None] + torch.arange(base, T)[None, :, None]
    return {k: value.expand(LAYERS, n, D).float().clone() for k in kinds}


def hooks(adapter) -> int:
    sites = [adapter.site(kind, layer) for kind in ("mlp", "attn", "hidden") for layer in range(LAYERS)]
    modules = [adapter.embed_tokens, adapter.decoder, *sites]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def test_restoring_writes_exactly_the_given_rows_positions_and_layer(toy):
    base = run(toy)
    with restoring(toy, [[], [Restore("mlp", (1,), 4)], []], Recorded(marked_states())):
        got = run(toy)
    written = got[("mlp", 1)]
    assert (written[1, 4] == 1000 + 100 * 1 + 4).all()
    untouched = torch.ones(3, T, dtype=torch.bool)
    untouched[1, 4] = False
    assert torch.equal(written[untouched], base[("mlp", 1)][untouched])
    for key in (("attn", 0), ("mlp", 0), ("hidden", 0), ("attn", 1)):  # everything upstream of the write
        assert torch.equal(got[key], base[key])
    for key in base:  # rows without restores never change, downstream included
        assert torch.equal(got[key][[0, 2]], base[key][[0, 2]])
    assert not torch.equal(got[("hidden", 2)][1], base[("hidden", 2)][1])


@pytest.mark.parametrize("kind", ["mlp", "attn", "hidden"])
def test_restoring_writes_every_layer_of_a_window(toy, kind):
    with restoring(toy, [[Restore(kind, (0, 2), 3)]], Recorded(marked_states())):
        got = run(toy, rows=1)
    for layer in (0, 2):
        assert (got[(kind, layer)][0, 3] == 1000 + 100 * layer + 3).all()
    assert not (got[(kind, 1)][0, 3] == 1000 + 100 + 3).any()


def test_several_rows_and_restores_in_one_pass(toy):
    rows = [[Restore("attn", (0,), 2), Restore("hidden", (2,), 5)], [Restore("attn", (0,), 1)]]
    with restoring(toy, rows, Recorded(marked_states())):
        got = run(toy, rows=2)
    assert (got[("attn", 0)][0, 2] == 1002).all() and (got[("attn", 0)][1, 1] == 1001).all()
    assert (got[("hidden", 2)][0, 5] == 1205).all()
    assert not (got[("attn", 0)][0, 1] == 1001).any() and not (got[("hidden", 2)][1, 5] == 1205).any()


def test_recorded_base_and_offset_index_absolute_positions(toy):
    """States recorded from position 2 on; a pass over positions 3.. (a cached prefix) restores position 4."""
    states = marked_states(base=2)
    x = torch.randn(1, T - 3, D)
    with restoring(toy, [[Restore("mlp", (1,), 4)]], Recorded(states, base=2), offset=3):
        got = run(toy, x)
    assert (got[("mlp", 1)][0, 4 - 3] == 1000 + 100 + 4).all()
    others = [i for i in range(T - 3) if i != 1]
    assert not (got[("mlp", 1)][0, others] >= 1000).any()


def test_same_batch_row_copies_the_clean_row_of_the_same_pass(toy):
    base = run(toy)
    with restoring(toy, [[], [], [Restore("attn", (1,), 3)]], SameBatchRow(0)):
        got = run(toy)
    assert torch.equal(got[("attn", 1)][2, 3], base[("attn", 1)][0, 3])
    assert torch.equal(got[("attn", 1)][2, :3], base[("attn", 1)][2, :3])
    assert not torch.equal(got[("attn", 1)][2, 3], base[("attn", 1)][2, 3])
    assert torch.equal(got[("hidden", 2)][:2], base[("hidden", 2)][:2])


def test_same_batch_row_with_an_offset(toy):
    x = torch.randn(2, T - 2, D)
    base = run(toy, x)
    with restoring(toy, [[], [Restore("mlp", (0,), 4)]], SameBatchRow(0), offset=2):
        got = run(toy, x)
    assert torch.equal(got[("mlp", 0)][1, 2], base[("mlp", 0)][0, 2])
    assert torch.equal(got[("mlp", 0)][1, :2], base[("mlp", 0)][1, :2])


def test_recording_captures_row_zero_from_start(toy):
    with recording(toy, ("mlp", "hidden"), start=2) as store:
        seen = run(toy)
    states = stack_recorded(store)
    assert set(states) == {"mlp", "hidden"}
    for kind in ("mlp", "hidden"):
        assert states[kind].shape == (LAYERS, T - 2, D)
        for layer in range(LAYERS):
            assert torch.equal(states[kind][layer], seen[(kind, layer)][0, 2:])


def test_recorded_states_restore_what_they_recorded(toy):
    """Recording a clean pass and restoring every site from it reproduces the clean pass exactly."""
    clean = run(toy, rows=1)
    with recording(toy, ("hidden",)) as store:
        run(toy, rows=1)
    x = torch.randn(1, T, D)
    everything = [[Restore("hidden", (LAYERS - 1,), p) for p in range(T)]]
    with restoring(toy, everything, Recorded(stack_recorded(store))):
        got = run(toy, x)
    assert torch.equal(got[("hidden", LAYERS - 1)], clean[("hidden", LAYERS - 1)])


@pytest.mark.parametrize("context", ["restoring", "recording", "perturbing", "capturing"])
def test_hooks_are_removed_after_the_block_even_when_it_raises(toy, context):
    def enter():
        if context == "restoring":
            return restoring(toy, [[Restore(k, (0, 1, 2), 1) for k in ("mlp", "attn", "hidden")]],
                             Recorded(marked_states()))
        if context == "recording":
            return recording(toy, ("mlp", "attn", "hidden"))
        if context == "perturbing":
            return perturbing(toy, [0], [1], torch.ones(1, D))
        return capturing_embeds(toy)

    base = run(toy)
    assert hooks(toy) == 0
    with enter():
        assert hooks(toy) > 0
    assert hooks(toy) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with enter():
            raise RuntimeError("boom")
    assert hooks(toy) == 0
    assert all(torch.equal(v, base[k]) for k, v in run(toy).items())


def test_perturbing_adds_delta_only_at_chosen_rows_and_positions(toy):
    delta = torch.randn(2, D)
    clean = toy.embed_tokens(ids()).detach()
    with torch.no_grad(), perturbing(toy, [1, 2], [3, 4], delta):
        got = toy.embed_tokens(ids())
    expect = clean.clone()
    expect[1:, 3:5] += delta
    assert torch.equal(got, expect)
    assert torch.equal(got[0], clean[0])


class OneDevice(TorchDispatchMode):
    """Raise, as CUDA does, when an op mixes tensors from two devices; a CPU-only machine cannot see this
    otherwise, since meta tensors accept CPU operands silently. 0-d tensors are scalars and exempt."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            raise RuntimeError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


def test_perturbing_moves_the_noise_to_the_embeddings_device(toy):
    """The noise is drawn on the CPU; a model on another device (here `meta`) must receive it there."""
    toy.decoder.embed_tokens = nn.Embedding(VOCAB, D, device="meta", dtype=torch.float16)
    with torch.no_grad(), perturbing(toy, [0], [1, 2], torch.ones(2, D)), OneDevice():
        out = toy.embed_tokens(torch.zeros(1, T, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float16 and out.shape == (1, T, D)


def test_restoring_follows_the_output_device(toy):
    """Clean states kept on the CPU restore into a model on another device."""
    toy.decoder.layers[0].mlp.to("meta")
    with torch.no_grad(), restoring(toy, [[Restore("mlp", (0,), 2)]], Recorded(marked_states())), OneDevice():
        out = toy.decoder.layers[0].mlp(torch.zeros(1, T, D, device="meta"))
    assert out.device.type == "meta"


def test_capturing_embeds_sees_what_the_decoder_receives(toy):
    x = torch.randn(2, T, D)
    with capturing_embeds(toy) as box:
        toy.model(inputs_embeds=x)
    assert torch.equal(box["embeds"], x) and box["embeds"] is not x
    with capturing_embeds(toy) as box:
        toy.model(input_ids=ids(2))
    assert torch.equal(box["embeds"], toy.embed_tokens(ids(2)))
