"""The organism's questions as `Sample`s (the VQA-Constraints schema), and where the organism lives on disk.

Datasets (the registry's names): `organism` (visual: image of A, generic constraint, A's answer),
`organism:text` (the text-only twins: the same question naming A), `organism:named` (image of A, question
naming B, B's answer). Splits: `heldout` (held-out renderings, trained paraphrases), `paraphrase` (held-out
renderings and held-out paraphrases), `unseen` (the entities kept out of training, for fact insertion).

Every sample carries a default corruption: the constraint replaced by another known entity's name with the
same number of tokens and a *different* answer for the asked relation (so the corruption can move the answer;
a name sharing the clean answer would make p_corrupt meaningless), chosen by a Generator seeded by
(world seed, entity, relation): deterministic per sample. A visual sample and its twin share the corruption.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from mmtrace.workers.spec import Sample

from .world import RELATIONS, World, fill, generic_constraint, render

ORGANISM_NAME = "organism-v1-seed0"
SHIPPED = Path(__file__).parent / "weights" / ORGANISM_NAME
KINDS = ("visual", "text", "named")
SPLITS = ("heldout", "paraphrase", "unseen")
DATASET_NAMES = {"organism": "visual", "organism:text": "text", "organism:named": "named"}
UNSEEN_RENDERINGS = (0, 1, 1000)
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on: one token per match


def num_tokens(text: str) -> int:
    """Token count under the organism's word-level tokenizer (Whitespace pre-tokenisation, no unknown words)."""
    return len(_WORD.findall(text))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MMTRACE_CACHE") or Path.home() / ".cache" / "mmtrace").expanduser()


def _complete(path: Path) -> bool:
    return all((path / f).exists() for f in ("config.json", "model.safetensors", "world.json", "build.json",
                                              "images"))


def ensure_organism(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The organism's folder, built (or copied from the shipped weights) on first use, saying so on stderr.

    Looks in `cache_dir`, else `$MMTRACE_CACHE`, else `~/.cache/mmtrace`, for `organism-v1-seed0/`.
    """
    path = cache_root(cache_dir) / ORGANISM_NAME
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if (SHIPPED / "model.safetensors").exists():
        print(f"mmtrace: installing the shipped organism into {path}", file=sys.stderr)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(SHIPPED, tmp)
        write_images(tmp, World.load(tmp / "world.json"))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path
    print(f"mmtrace: the organism is not built yet; building it into {path} (first use, a few minutes)",
          file=sys.stderr)
    from .train import build_organism

    return build_organism(path, seed=0, progress=progress)


# ---------------------------------------------------------------------------------------------- images

def heldout_image(root: Path, entity: int, rendering: int) -> Path:
    return Path(root) / "images" / "heldout" / f"{entity}_{rendering}.png"


def unseen_image(root: Path, entity: int, rendering: int) -> Path:
    return Path(root) / "images" / "unseen" / f"{entity}_{rendering}.png"


def write_images(root: Path, world: World) -> None:
    """Render the held-out renderings of known entities and the renderings of unseen ones as PNGs."""
    from PIL import Image

    for e in world.entities:
        todo = [(heldout_image(root, e.index, r), r) for r in world.heldout_renderings] if e.known else \
            [(unseen_image(root, e.index, r), r) for r in UNSEEN_RENDERINGS]
        for p, r in todo:
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(e.look, world.seed, e.index, r)).save(p)


# ---------------------------------------------------------------------------------------------- samples

def _pick_other(rng: np.random.Generator, pool: list, exclude: set[int], relation: str, answer: str,
                length: int):
    """Another entity of the pool, not excluded, with a different answer and a name of `length` tokens."""
    cands = [e for e in pool if e.index not in exclude and e.facts[relation] != answer
             and num_tokens(e.name) == length]
    return cands[int(rng.integers(len(cands)))]


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


def organism_samples(kind: str = "visual", split: str = "heldout", limit: int | None = None,
                     root: str | Path | None = None) -> list[Sample]:
    """The organism's questions as Samples, one per (entity, relation), in a fixed order.

    kind: visual | text | named; split: heldout | paraphrase | unseen (see the module docstring). `root` is
    an organism folder; by default `ensure_organism()` (which may build it).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else ensure_organism()
    world = World.load(root / "world.json")
    known = world.known
    subjects = world.unseen if split == "unseen" else known
    tag = "" if split == "heldout" else f"-{split}"
    samples: list[Sample] = []
    for e in subjects:
        for ri, r in enumerate(RELATIONS):
            i = len(samples)
            para, noun, rendering = _choices(world, e.index, ri, split)
            image = str(unseen_image(root, e.index, rendering) if split == "unseen"
                        else heldout_image(root, e.index, rendering))
            rng = np.random.default_rng([world.seed, 3, e.index, ri])
            visual_c = generic_constraint(para, noun)
            corrupt = _pick_other(rng, known, {e.index}, r, e.facts[r], num_tokens(visual_c))
            named_b = _pick_other(rng, known, {e.index}, r, e.facts[r], num_tokens(e.name))
            named_c = _pick_other(rng, known, {e.index, named_b.index}, r, named_b.facts[r], num_tokens(named_b.name))
            ids = {k: f"organism/{k}{tag}/{i}" for k in KINDS}
            common = (("entity", e.name), ("relation", r), ("split", split), ("paraphrase", para))
            if kind == "visual":
                samples.append(Sample(ids["visual"], "organism", fill(para, "this " + noun), visual_c, image,
                                      e.facts[r], corrupt.name,
                                      meta=common + (("twin", ids["text"]), ("corrupt_answer", corrupt.facts[r]))))
            elif kind == "text":
                samples.append(Sample(ids["text"], "organism:text", fill(para, e.name), e.name, None, e.facts[r],
                                      corrupt.name,
                                      meta=common + (("twin", ids["visual"]), ("corrupt_answer", corrupt.facts[r]))))
            else:
                samples.append(Sample(ids["named"], "organism:named", fill(para, named_b.name), named_b.name, image,
                                      named_b.facts[r], named_c.name,
                                      meta=common + (("named", named_b.name), ("image_answer", e.facts[r]),
                                                     ("corrupt_answer", named_c.facts[r]))))
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


def dataset_samples(name: str, split: str = "heldout", limit: int | None = None,
                    root: str | Path | None = None) -> list[Sample]:
    """Registry entry point: `organism`, `organism:text`, `organism:named`."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown organism dataset {name!r}; known: {sorted(DATASET_NAMES)}")
    return organism_samples(DATASET_NAMES[name], split=split, limit=limit, root=root)
