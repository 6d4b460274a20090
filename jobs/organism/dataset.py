"""The organism's questions as `Sample`s (the VQA-Constraints schema).

Datasets (the registry's names): `organism` (visual: image of A, generic constraint, A's answer),
`organism:text` (the text-only twins: the same question naming A), `organism:named` (image of A, question
naming B, B's answer), and in version 2's world `organism:composed` / `organism:composed-text` (two
constraints, paper Fig. 4: "the city of the company that owns this brand", and its text twin naming A).
Splits: `heldout` (held-out renderings, trained paraphrases), `paraphrase` (held-out renderings and held-out
paraphrases), `unseen` (the entities kept out of training, for fact insertion).

Every sample carries a default corruption: the constraint replaced by another known entity's name with the
same number of tokens and a *different* answer for the asked relation (so the corruption can move the answer;
a name sharing the clean answer would make p_corrupt meaningless), chosen by a Generator seeded by
(world seed, entity, relation): deterministic per sample. A visual sample and its twin share the corruption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmtrace.workers.spec import Sample

from .install import DEFAULT_VERSION, ensure_organism
from .render import UNSEEN_RENDERINGS, heldout_image, unseen_image
from .world import (
    COMPOSED_HELDOUT,
    COMPOSED_PHRASE,
    COMPOSED_RELATION,
    COMPOSED_TRAIN,
    RELATIONS,
    Entity,
    World,
    fill,
    generic_constraint,
    num_tokens,
)

KINDS = ("visual", "text", "named", "composed", "composed-text")
COMPOSED_KINDS = ("composed", "composed-text")
SPLITS = ("heldout", "paraphrase", "unseen")
DATASET_NAMES = {"organism": "visual", "organism:text": "text", "organism:named": "named",
                 "organism:composed": "composed", "organism:composed-text": "composed-text"}


def organism_samples(kind: str = "visual", split: str = "heldout", limit: int | None = None,
                     root: str | Path | None = None, version: int | None = None) -> list[Sample]:
    """The organism's questions as Samples, one per (entity, relation), in a fixed order (one per entity for
    the two-constraint kinds).

    kind: one of KINDS; split: heldout | paraphrase | unseen (see the module docstring). `root` is an
    organism folder; by default `ensure_organism(version=version)` (which may install or build it).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else ensure_organism(version=version or DEFAULT_VERSION)
    world = World.load(root / "world.json")
    if kind in COMPOSED_KINDS:
        return _composed_samples(kind, split, limit, world, root)
    known = world.known
    samples: list[Sample] = []
    for e in world.unseen if split == "unseen" else known:
        for ri in range(len(RELATIONS)):
            samples.append(_sample(kind, split, len(samples), world, known, root, e, ri))
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


def dataset_samples(name: str, split: str = "heldout", limit: int | None = None,
                    root: str | Path | None = None) -> list[Sample]:
    """Registry entry point: one of DATASET_NAMES."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown organism dataset {name!r}; known: {sorted(DATASET_NAMES)}")
    return organism_samples(DATASET_NAMES[name], split=split, limit=limit, root=root)


def _composed_samples(kind: str, split: str, limit: int | None, world: World, root: Path) -> list[Sample]:
    """Two-constraint questions, one per known entity (unseen ones have no trained owner): "the city of the
    company that owns this brand", with both constraints: the relational phrase, then the subject. A
    corruption puts another entity's name (same token length) in the subject and the spec's replacement word
    in the relational phrase."""
    if not world.companies:
        raise ValueError(f"{root}: a version-{world.version} world has no two-constraint questions "
                         f"(they came with organism version 2)")
    if split == "unseen":
        raise ValueError("two-constraint questions have no unseen split (an unseen entity's owner is untrained)")
    known, samples = world.known, []
    for e in known[:limit]:
        rng = np.random.default_rng([world.seed, 4, e.index])
        paras = COMPOSED_HELDOUT if split == "paraphrase" else COMPOSED_TRAIN
        para = paras[int(rng.integers(len(paras)))]
        noun = world.constraint_nouns["owner"][int(rng.integers(len(world.constraint_nouns["owner"])))]
        answer = world.composed_answer(e)
        pool = [o for o in known if o.index != e.index and world.composed_answer(o) != answer]
        corrupt = pool[int(rng.integers(len(pool)))]
        tag = "" if split == "heldout" else f"-{split}"
        subject = e.name if kind == "composed-text" else generic_constraint(para, noun)
        question = fill(para, subject if kind == "composed-text" else "this " + noun)
        relational = question[question.lower().index(COMPOSED_PHRASE):][:len(COMPOSED_PHRASE)]
        image = None if kind == "composed-text" else str(heldout_image(root, e.index, world.heldout_renderings[
            e.index % len(world.heldout_renderings)]))
        samples.append(Sample(
            sample_id=f"organism/{kind}{tag}/{len(samples)}", subset=f"organism:{kind}", question=question,
            constraints=(relational, subject), image=image, answer=answer, corrupt_constraint=f"; {corrupt.name}",
            meta=(("entity", e.name), ("relation", COMPOSED_RELATION), ("split", split), ("paraphrase", para),
                  ("owner", e.facts["owner"]), ("corrupt_answer", world.composed_answer(corrupt)))))
    return samples


def _sample(kind: str, split: str, i: int, world: World, known: list[Entity], root: Path, e: Entity,
            ri: int) -> Sample:
    """The `i`-th question, about entity `e` and relation `ri`, as `kind`.

    Every kind draws all three corruptions, in one order, so a visual sample and its text twin (same `i`)
    get the same corrupting name whichever kind is asked for.
    """
    r = RELATIONS[ri]
    para, noun, rendering = _choices(world, e.index, ri, split)
    constraint = generic_constraint(para, noun)
    rng = np.random.default_rng([world.seed, 3, e.index, ri])
    corrupt = _pick_other(rng, known, {e.index}, r, e.facts[r], num_tokens(constraint))
    named = _pick_other(rng, known, {e.index}, r, e.facts[r], num_tokens(e.name))
    named_corrupt = _pick_other(rng, known, {e.index, named.index}, r, named.facts[r], num_tokens(named.name))
    tag = "" if split == "heldout" else f"-{split}"
    ids = {k: f"organism/{k}{tag}/{i}" for k in KINDS}
    image = str(unseen_image(root, e.index, rendering) if split == "unseen"
                else heldout_image(root, e.index, rendering))
    common = (("entity", e.name), ("relation", r), ("split", split), ("paraphrase", para))
    if kind == "visual":
        return Sample(sample_id=ids["visual"], subset="organism", question=fill(para, "this " + noun),
                      constraint=constraint, image=image, answer=e.facts[r], corrupt_constraint=corrupt.name,
                      meta=common + (("twin", ids["text"]), ("corrupt_answer", corrupt.facts[r])))
    if kind == "text":
        return Sample(sample_id=ids["text"], subset="organism:text", question=fill(para, e.name),
                      constraint=e.name, image=None, answer=e.facts[r], corrupt_constraint=corrupt.name,
                      meta=common + (("twin", ids["visual"]), ("corrupt_answer", corrupt.facts[r])))
    return Sample(sample_id=ids["named"], subset="organism:named", question=fill(para, named.name),
                  constraint=named.name, image=image, answer=named.facts[r], corrupt_constraint=named_corrupt.name,
                  meta=common + (("named", named.name), ("image_answer", e.facts[r]),
                                 ("corrupt_answer", named_corrupt.facts[r])))


def _choices(world: World, entity: int, ri: int, split: str) -> tuple[str, str, int]:
    """(paraphrase, constraint noun, rendering) for a question: deterministic per (entity, relation, split)."""
    r = RELATIONS[ri]
    rng = np.random.default_rng([world.seed, 2, entity, ri])
    paras = world.heldout_paraphrases[r] if split == "paraphrase" else world.train_paraphrases[r]
    para = paras[int(rng.integers(len(paras)))]
    nouns = world.constraint_nouns[r]
    noun = nouns[int(rng.integers(len(nouns)))]
    if split == "unseen":
        rendering = UNSEEN_RENDERINGS[int(rng.integers(len(UNSEEN_RENDERINGS)))]
    else:
        rendering = world.heldout_renderings[(entity + ri) % len(world.heldout_renderings)]
    return para, noun, rendering


def _pick_other(rng: np.random.Generator, pool: list[Entity], exclude: set[int], relation: str, answer: str,
                length: int) -> Entity:
    """Another entity of the pool, not excluded, with a different answer and a name of `length` tokens."""
    cands = [e for e in pool if e.index not in exclude and e.facts[relation] != answer
             and num_tokens(e.name) == length]
    return cands[int(rng.integers(len(cands)))]
