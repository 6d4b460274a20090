"""The model organism: world, tokenizer/processor, packed training forward, samples, and (slow) a fresh build
that must meet its quality bar (README, "The organism") through `from_pretrained`."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtrace.jobs.organism import dataset as ds
from mmtrace.jobs.organism import install
from mmtrace.jobs.organism.model import (
    IMAGE_TOKEN,
    OrganismSize,
    build_model,
    build_processor,
    build_tokenizer,
    normalise_images,
    packed_logits,
)
from mmtrace.jobs.organism.render import render, write_images
from mmtrace.jobs.organism.train import Sampler, Segment, TrainConfig, pack
from mmtrace.jobs.organism.world import (
    FRAMES,
    HELDOUT_RENDERINGS,
    NUM_ENTITIES,
    NUM_UNSEEN,
    RELATIONS,
    World,
    make_world,
    num_tokens,
)
from mmtrace.workers.spec import Sample, build_prompt


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(0)


@pytest.fixture(scope="module")
def tok(world):
    return build_tokenizer(world.all_words())


@pytest.fixture(scope="module")
def world_root(tmp_path_factory, world) -> Path:
    """A folder with just the world and its images: enough for the sample functions (no model needed)."""
    root = tmp_path_factory.mktemp("organism-world")
    world.save(root / "world.json")
    write_images(root, world)
    return root


# ---------------------------------------------------------------------------------------------- world

def test_world_is_deterministic_and_sized(world):
    again = make_world(0)
    assert again.to_json() == world.to_json()
    assert make_world(1).to_json() != world.to_json()
    assert len(world.known) == NUM_ENTITIES and len(world.unseen) == NUM_UNSEEN
    assert len({e.name for e in world.entities}) == len(world.entities)
    assert len({e.look for e in world.entities}) == len(world.entities)
    for e in world.entities:
        assert set(e.facts) == set(RELATIONS)


def test_world_round_trips_through_json(tmp_path, world):
    world.save(tmp_path / "w.json")
    assert World.load(tmp_path / "w.json").to_json() == world.to_json()


def test_paraphrases_split_and_heldout_words_are_trained(world, tok):
    trained_words = set()
    for r in RELATIONS:
        train, held = world.train_paraphrases[r], world.heldout_paraphrases[r]
        assert len(train) >= 12 and len(held) == 4
        assert not set(train) & set(held)
        for p in train:
            trained_words |= set(re.findall(r"\w+|[^\w\s]+", p.replace("{X}", "")))
    for r in RELATIONS:
        for p in world.heldout_paraphrases[r]:
            assert set(re.findall(r"\w+|[^\w\s]+", p.replace("{X}", ""))) <= trained_words, p
    assert len(FRAMES) >= 8


def test_renderings_are_deterministic_and_vary(world):
    e = world.entities[3]
    a = render(e.look, world.seed, e.index, 0)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(e.look, world.seed, e.index, 0))
    held = render(e.look, world.seed, e.index, HELDOUT_RENDERINGS[0])
    assert np.abs(a.astype(int) - held.astype(int)).mean() > 5  # a new rendering: new shift/scale/noise
    other = world.entities[4]
    assert not np.array_equal(render(other.look, world.seed, other.index, 0), a)


# ---------------------------------------------------------------------------------------------- tokenizer

def test_names_and_constraints_have_two_tokens_and_no_unknowns(world, tok):
    unk = tok.unk_token_id
    for e in world.entities:
        ids = tok(e.name, add_special_tokens=False)["input_ids"]
        assert len(ids) == 2 and unk not in ids
        assert num_tokens(e.name) == 2
    for r in RELATIONS:
        for v in world.relation_values[r]:
            assert len(tok(v, add_special_tokens=False)["input_ids"]) == 1
        for noun in world.constraint_nouns[r]:
            assert len(tok("this " + noun, add_special_tokens=False)["input_ids"]) == 2


def test_tokenizer_offsets_are_exact_and_bos_first(world, tok):
    q = world.train_paraphrases["owner"][0].replace("{X}", world.entities[0].name)
    prompt = build_prompt(q, visual=False)
    enc = tok(prompt, return_offsets_mapping=True)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks[0] == "<s>" and enc["offset_mapping"][0] == (0, 0)
    for t, (s, e) in zip(toks[1:], enc["offset_mapping"][1:]):
        assert prompt[s:e] == t
    assert toks[-2:] == ["ASSISTANT", ":"] and tok.unk_token_id not in enc["input_ids"]


def test_processor_expands_image_to_what_the_model_expects(world, tok):
    size = OrganismSize()
    proc = build_processor(tok, size)
    model = build_model(tok, size, seed=0).eval()
    from PIL import Image

    img = render(world.entities[0].look, 0, 0, 1000)
    prompt = build_prompt("The owner of this brand is", visual=True)
    enc = proc(images=Image.fromarray(img), text=prompt, return_tensors="pt", return_offsets_mapping=True)
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_img == size.image_tokens == 16 == model.config.image_seq_length
    assert torch.allclose(enc["pixel_values"], normalise_images(img[None]), atol=1e-5)
    with torch.no_grad():
        model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"])  # raises on a token/feature mismatch


def test_packed_forward_equals_separate_prompts(world, tok):
    """The trainer's packed rows compute exactly what each prompt computes alone through the HF forward."""
    size = OrganismSize()
    proc = build_processor(tok, size)
    model = build_model(tok, size, seed=1).eval()
    from PIL import Image

    sampler = Sampler(world, tok, TrainConfig(), seed=0)
    qs = ["The owner of this brand is", f"{world.entities[5].name} plays the sport of",
          "What is the city of this landmark"]
    img = render(world.entities[0].look, 0, 0, 1000)
    image_id = model.config.image_token_id
    prefix = [tok.bos_token_id] + [image_id] * 16
    segs = [Segment(sampler.segment_ids(q), tok.convert_tokens_to_ids("Oslo")) for q in qs]
    batch = pack([prefix], [segs], tok.eos_token_id, tok.pad_token_id)
    pix = proc(images=Image.fromarray(img), text=IMAGE_TOKEN, return_tensors="pt")["pixel_values"]
    text_batch = pack([[tok.bos_token_id]], [segs[::-1]], tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        got = packed_logits(model, batch.input_ids, batch.position_ids, batch.mask, pix, slice(1, 17),
                            batch.targets_at)
        got_text = packed_logits(model, text_batch.input_ids, text_batch.position_ids, text_batch.mask, None, None,
                                 text_batch.targets_at)
        for k, q in enumerate(qs):
            enc = proc(images=Image.fromarray(img), text=build_prompt(q, True), return_tensors="pt")
            assert enc["input_ids"][0].tolist() == prefix + segs[k].ids  # a segment is the prompt after the image
            want = model(**enc).logits[0, -1]
            assert (got[2 * k] - want).abs().max() < 1e-5
            enc_t = tok(build_prompt(q, False), return_tensors="pt")
            want_t = model(**enc_t).logits[0, -1]
            assert (got_text[2 * (len(qs) - 1 - k)] - want_t).abs().max() < 1e-5


def test_segments_mark_the_subjects_last_token(world, tok):
    sampler = Sampler(world, tok, TrainConfig(), seed=0)
    e = world.known[7]
    for generic in (True, False):
        for _ in range(20):
            seg = sampler._question(e, "sport", generic=generic)
            word = tok.convert_ids_to_tokens(seg.ids[seg.subject_last])
            assert word in (world.constraint_nouns["sport"] if generic else (e.name.split()[-1],))
            assert seg.facts[RELATIONS.index("sport")] == world.relation_values["sport"].index(e.facts["sport"])
    batch = pack([[tok.bos_token_id]], [[seg, seg]], tok.eos_token_id, tok.pad_token_id)
    assert batch.probe_at.tolist() == [[0, 1 + seg.subject_last], [0, 2 + len(seg.ids) + seg.subject_last]]


# ---------------------------------------------------------------------------------------------- samples

def test_samples_schema_twins_and_corruptions(world_root, tok):
    visual = ds.organism_samples("visual", root=world_root)
    text = ds.organism_samples("text", root=world_root)
    named = ds.organism_samples("named", root=world_root)
    assert len(visual) == len(text) == len(named) == NUM_ENTITIES * len(RELATIONS)
    by_id = {s.sample_id: s for s in text}
    for v in visual[:300]:
        assert isinstance(v, Sample) and v.is_visual and Path(v.image).is_file()
        meta = dict(v.meta)
        twin = by_id[meta["twin"]]
        assert dict(twin.meta)["twin"] == v.sample_id and twin.image is None
        assert twin.answer == v.answer and twin.constraint == meta["entity"] and twin.constraint in twin.question
        assert v.constraint in v.question and v.constraint.lower().startswith("this ")
        for s in (v, twin):
            n = len(tok(s.constraint, add_special_tokens=False)["input_ids"])
            assert len(tok(" " + s.corrupt_constraint, add_special_tokens=False)["input_ids"]) == n
            assert s.corrupt_constraint != s.constraint
            assert dict(s.meta)["corrupt_answer"] != s.answer
        assert twin.corrupt_constraint == v.corrupt_constraint
    for n in named[:300]:
        meta = dict(n.meta)
        assert n.constraint == meta["named"] != meta["entity"] and n.answer != meta["image_answer"]
    assert visual[17].sample_id == "organism/visual/17"
    assert [s.sample_id for s in ds.organism_samples("visual", limit=10, root=world_root)] == \
        [s.sample_id for s in visual[:10]]
    assert ds.organism_samples("visual", root=world_root) == visual  # deterministic


def test_paraphrase_and_unseen_splits(world_root, world):
    para = ds.organism_samples("visual", "paraphrase", root=world_root)
    held = {p for r in RELATIONS for p in world.heldout_paraphrases[r]}
    assert all(dict(s.meta)["paraphrase"] in held for s in para)
    unseen = ds.organism_samples("visual", "unseen", root=world_root)
    names = {e.name for e in world.unseen}
    assert len(unseen) == NUM_UNSEEN * len(RELATIONS)
    assert {dict(s.meta)["entity"] for s in unseen} == names and all(Path(s.image).is_file() for s in unseen)
    assert not {dict(s.meta)["entity"] for s in ds.organism_samples("text", root=world_root)} & names
    assert ds.dataset_samples("organism:text", limit=3, root=world_root) == \
        ds.organism_samples("text", limit=3, root=world_root)


def test_cli_parser():
    from mmtrace.jobs.organism.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["organism", "build", "--seed", "3", "--out", "/tmp/x"])
    assert args.seed == 3 and args.out == "/tmp/x" and callable(args.func)


def test_ensure_installs_the_shipped_organism(tmp_path, capsys):
    if not (install.SHIPPED / "model.safetensors").exists():
        pytest.skip(reason="no weights shipped in the repository")
    root = install.ensure_organism(cache_dir=tmp_path)
    assert root == tmp_path / install.ORGANISM_NAME and "installing the shipped organism" in capsys.readouterr().err
    assert install.ensure_organism(cache_dir=tmp_path) == root and capsys.readouterr().err == ""  # second use: silent
    size = sum(f.stat().st_size for f in install.SHIPPED.iterdir())
    assert size <= 10 * 2**20
    s = ds.organism_samples("visual", limit=1, root=root)[0]
    assert Path(s.image).is_file()


# ---------------------------------------------------------------------------------------------- a fresh build

@pytest.fixture(scope="session")
def fresh_organism(tmp_path_factory) -> Path:
    """One fresh build per test session, through the CLI command (`mmtrace organism build --out DIR`)."""
    from mmtrace.jobs.cli import main

    out = tmp_path_factory.mktemp("organism-build") / "organism"
    assert main(["organism", "build", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def fresh_scores(fresh_organism):
    from mmtrace.jobs.organism.evaluate import evaluate_organism

    return evaluate_organism(fresh_organism)


def check_quality(scores) -> None:
    assert scores.visual >= 0.95, scores
    assert scores.text >= 0.95, scores
    assert scores.named >= 0.95, scores
    assert scores.paraphrase_visual >= 0.70 and scores.paraphrase_text >= 0.70, scores
    for c in (scores.corruption_visual, scores.corruption_text):
        assert c.n >= 50
        assert c.p_clean >= 0.8 and c.gap >= 0.5, c


@pytest.mark.slow
def test_fresh_build_meets_the_acceptance_bar(fresh_organism, fresh_scores):
    info = json.loads((fresh_organism / "build.json").read_text())
    steps = info["train"]["steps"]  # fixed in advance, never cut by a clock: the build time is a benchmark
    assert len(info["loss_curve"]) == len(range(0, steps, 50)) + ((steps - 1) % 50 != 0)
    check_quality(fresh_scores)


@pytest.mark.slow
def test_fresh_build_loads_like_a_checkpoint_and_generates(fresh_organism):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(fresh_organism)
    model = AutoModelForImageTextToText.from_pretrained(fresh_organism).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert (fresh_organism / "model.safetensors").is_file()
    assert model.config.text_config.num_hidden_layers in range(6, 9)
    s = ds.organism_samples("visual", limit=1, root=fresh_organism)[0]
    enc = proc(images=Image.open(s.image).convert("RGB"), text=build_prompt(s.question, True), return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    answer = proc.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == s.answer


@pytest.mark.slow
def test_shipped_weights_match_a_fresh_build(fresh_scores, tmp_path):
    """Shipped weights are only allowed if the build command reproduces a model of the same quality."""
    if not (install.SHIPPED / "model.safetensors").exists():
        pytest.skip(reason="no weights shipped in the repository")
    from mmtrace.jobs.organism.evaluate import evaluate_organism

    root = install.ensure_organism(cache_dir=tmp_path)
    shipped = evaluate_organism(root)
    check_quality(shipped)
    for k in ("visual", "text", "named"):
        assert abs(getattr(shipped, k) - getattr(fresh_scores, k)) <= 0.03
    assert abs(shipped.paraphrase - fresh_scores.paraphrase) <= 0.1


# ---------------------------------------------------------------------------------------------- localisation

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["visual", "text"])
def test_traces_localise(fresh_organism, kind):
    import pyarrow as pa

    from mmtrace.jobs.report import best_cell
    from mmtrace.workers.adapters import load_adapter
    from mmtrace.workers.spec import TraceSpec
    from mmtrace.workers.trace import trace_sample

    adapter = load_adapter(str(fresh_organism))
    # A 3-layer window (ROME's rule): at window 1 the organism's last token reads the constraint through
    # attention spread over layers 2-4, so no single layer restores much (see the README).
    spec = TraceSpec(kinds=("mlp", "attn", "hidden"), window=3, window_style="width")
    samples = ds.organism_samples(kind, limit=30, root=fresh_organism)
    results = [trace_sample(adapter, s, spec, engine="fast") for s in samples]
    assert all(r.sample["status"] == "ok" for r in results), [r.sample["error"] for r in results]
    best = best_cell(pa.concat_tables([r.cells for r in results]))  # hidden at the last token excluded
    print(f"{kind}: best {best}")
    assert best["mean_ie"] >= 0.2 and best["localisation"] >= 10, best
