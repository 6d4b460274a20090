"""The cases a MultEdit run edits: the organism's three uses and CSV files."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmtrace.jobs.edit_cases import (
    EDIT_IMAGES,
    EDIT_RENDERINGS,
    PRESERVE_EVERY,
    EditCaseSet,
    edit_image,
    resolve_cases,
)
from mmtrace.jobs.organism.render import UNSEEN_RENDERINGS, unseen_image
from mmtrace.jobs.organism.world import RELATIONS, World, fill
from mmtrace.workers.edit import Scorer


@pytest.fixture(scope="module")
def world(organism_dir):
    return World.load(organism_dir / "world.json")


@pytest.fixture(scope="module")
def every(organism_dir, organism):
    """organism:all; scoring the 1200 held-out questions once here serves every test of the module."""
    return resolve_cases("organism:all", organism_dir, adapter=organism)


def of(case_set: EditCaseSet, use: str):
    return [c for c in case_set.cases if c.use == use]


def meta(sample, key):
    return dict(sample.meta)[key]


def tops(adapter, samples):
    return Scorer(adapter).score(samples).top


def gold_ids(adapter, samples):
    return [adapter.answer_ids(s.answer)[0] for s in samples]


def test_insert_cases_are_the_unseen_entities(every, world, organism_dir):
    inserts = of(every, "insert")
    assert len(inserts) == 20
    names = [meta(c.sample, "entity") for c in inserts]
    assert names == [e.name for e in world.unseen] and len(set(names)) == 20
    for k, (c, e) in enumerate(zip(inserts, world.unseen)):
        r = RELATIONS[k % len(RELATIONS)]
        assert c.case_id == f"organism/edit/insert/{k}" and meta(c.sample, "relation") == r
        assert c.target == e.facts[r] == c.sample.answer
        assert c.sample.image == str(unseen_image(organism_dir, e.index, UNSEEN_RENDERINGS[0]))
        assert [s.image for s in c.renderings] == [str(unseen_image(organism_dir, e.index, i))
                                                   for i in UNSEEN_RENDERINGS[1:]]
        assert all(Path(s.image).is_file() for s in (c.sample, *c.renderings))
    assert Counter(meta(c.sample, "relation") for c in inserts) == dict.fromkeys(RELATIONS, 4)


def test_correct_cases_are_answered_wrong_before(every, organism):
    correct = of(every, "correct")
    assert 50 <= len(correct) <= 70  # 58 on the shipped organism
    samples = [c.sample for c in correct]
    assert all(c.target == c.sample.answer == meta(c.sample, "gold") for c in correct)
    assert all(t != g for t, g in zip(tops(organism, samples), gold_ids(organism, samples)))
    assert len({(meta(s, "entity"), meta(s, "relation")) for s in samples}) == len(samples)


def test_counterfact_cases_change_a_known_fact(every, world, organism):
    cf = of(every, "counterfact")
    samples = [c.sample for c in cf]
    assert 150 <= len(cf) <= 180  # at most one per entity outside the preserved quarter
    assert all(t == g for t, g in zip(tops(organism, samples), gold_ids(organism, samples)))
    for c in cf:
        r = meta(c.sample, "relation")
        assert c.target != c.sample.answer and c.target in world.relation_values[r]
    positions = {e.name: j for j, e in enumerate(world.known)}
    entities = [meta(s, "entity") for s in samples]
    assert len(set(entities)) == len(entities)
    assert all(positions[e] % PRESERVE_EVERY != PRESERVE_EVERY - 1 for e in entities)
    assert min(Counter(meta(s, "relation") for s in samples).values()) >= 30
    assert len(set(c.target for c in cf)) > 20


def test_measurement_sets(every, world, organism_dir):
    by_name = {e.name: e for e in world.entities}
    for c in every.cases:
        s, e, r = c.sample, by_name[meta(c.sample, "entity")], meta(c.sample, "relation")
        assert s.constraint.lower() in ("this " + n for n in world.constraint_nouns[r])
        # paraphrases: the same picture, every held-out wording of r and two trained ones
        assert 5 <= len(c.paraphrases) <= 6
        assert all(p.image == s.image and p.answer == e.facts[r] and p.question != s.question for p in c.paraphrases)
        assert len({p.question for p in c.paraphrases}) == len(c.paraphrases)
        noun = s.constraint.split()[-1]
        wordings = {fill(p, "this " + noun) for p in world.heldout_paraphrases[r]}
        assert len(wordings) == 4 and wordings <= {p.question for p in c.paraphrases}
        # renderings: the same question on other pictures of e
        assert len(c.renderings) == (3 if e.known else 2)
        assert all(p.question == s.question and p.image != s.image and Path(p.image).is_file() for p in c.renderings)
        assert all(f"/{e.index}_" in p.image for p in c.renderings)
        # same image: the other four relations of e
        assert [meta(p, "relation") for p in c.same_image] == [x for x in RELATIONS if x != r]
        assert {p.image for p in c.same_image} == {s.image}
        assert all(p.answer == e.facts[meta(p, "relation")] for p in c.same_image)
        # same question on other entities' pictures, and their text twins
        assert len(c.same_question) == len(c.text_only) == 8
        assert {p.question for p in c.same_question} == {s.question}
        images = [p.image for p in c.same_question]
        assert len(set(images)) == 8 and s.image not in images and all(Path(i).is_file() for i in images)
        others = [meta(p, "entity") for p in c.same_question]
        assert e.name not in others and [meta(p, "entity") for p in c.text_only] == others
        assert all(by_name[o].known for o in others)
        assert all(p.answer == by_name[meta(p, "entity")].facts[r] != c.target for p in c.same_question)
        assert all(p.image is None and p.constraint == meta(p, "entity") and p.constraint in p.question
                   for p in c.text_only)
    ids = [c.case_id for c in every.cases]
    assert len(set(ids)) == len(ids)
    for c in of(every, "counterfact"):
        e = by_name[meta(c.sample, "entity")]
        assert [p.image for p in c.renderings][1:] == [str(organism_dir / EDIT_IMAGES / f"{e.index}_{k}.png")
                                                       for k in EDIT_RENDERINGS]


def test_heldout_and_preserve(every, world):
    edited = {(meta(c.sample, "entity"), meta(c.sample, "relation")) for c in every.cases}
    held = every.heldout
    assert len(held) == 100 and all(s.answer for s in held)
    assert not {(meta(s, "entity"), meta(s, "relation")) for s in held} & edited
    assert len({meta(s, "entity") for s in held}) >= 80 and {meta(s, "relation") for s in held} == set(RELATIONS)
    keep = every.preserve
    assert len(keep) == 200 and len({s.sample_id for s in keep}) == 200
    assert not {meta(s, "entity") for s in keep} & {e for e, _ in edited}
    assert all(meta(s, "split") == "paraphrase" for s in keep)


def test_deterministic_and_limited(every, organism_dir, organism):
    assert resolve_cases("organism:all", organism_dir, adapter=organism) == every
    few = resolve_cases("organism:all", organism_dir, limit=3, heldout=10, preserve=20, adapter=organism)
    assert Counter(c.use for c in few.cases) == {"correct": 3, "counterfact": 3, "insert": 3}
    assert [c for c in few.cases if c.use == "insert"] == of(every, "insert")[:3]
    assert len(few.heldout) == 10 and len(few.preserve) == 20
    assert resolve_cases("organism:insert", organism_dir).cases == tuple(of(every, "insert"))


def test_edit_images_are_written_once(every, world, organism_dir):
    e = world.known[0]
    path = Path(edit_image(organism_dir, world, e, EDIT_RENDERINGS[0]))
    before = path.stat().st_mtime_ns
    assert edit_image(organism_dir, world, e, EDIT_RENDERINGS[0]) == str(path)
    assert path.stat().st_mtime_ns == before
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_unknown_spec(organism_dir):
    with pytest.raises(ValueError, match="organism:correct"):
        resolve_cases("organism:bogus", organism_dir)
    with pytest.raises(ValueError, match="no such file"):
        resolve_cases("nowhere/cases.csv", organism_dir)


# ---------------------------------------------------------------------------------------------- CSV files


def _png(path: Path) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    return path.name


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


HEADER = "case_id,question,constraint,image,target,answer,paraphrases,renderings,same_image,same_question,text_only"


def test_csv_cases(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _png(tmp_path / "img" / name)
    path = _write(tmp_path / "cases.csv", [
        HEADER,
        "eiffel,Which city is this tower in,this tower,img/a.png,Rome,Paris,"
        "Name the city of this tower||What city holds this tower||Where is the Eiffel Tower ## the Eiffel Tower"
        "||Which country is it in,img/b.png,Who built this tower,img/c.png||img/gone.png,"
        "Which city is the Eiffel Tower in ## the Eiffel Tower",
        f"bridge,Which river does this bridge cross,this bridge,{tmp_path / 'img' / 'd.png'},Thames,,,,,img/c.png,",
    ])
    with pytest.warns(UserWarning, match="2 measurement questions dropped"):
        got = resolve_cases(str(path), "unused")
    a, b = got.cases
    assert (a.case_id, a.use, a.target, a.error, b.error) == ("eiffel", "csv", "Rome", None, None)
    assert a.sample.image == str(tmp_path / "img" / "a.png") and a.sample.answer == "Paris"
    assert [p.question for p in a.paraphrases] == ["Name the city of this tower", "What city holds this tower",
                                                  "Where is the Eiffel Tower"]
    assert a.paraphrases[2].constraint == "the Eiffel Tower" and {p.image for p in a.paraphrases} == {a.sample.image}
    assert [p.image for p in a.renderings] == [str(tmp_path / "img" / "b.png")]
    assert a.renderings[0].question == a.sample.question
    assert [(p.question, p.image) for p in a.same_image] == [("Who built this tower", a.sample.image)]
    assert [p.image for p in a.same_question] == [str(tmp_path / "img" / "c.png")]
    assert [(p.question, p.constraint, p.image) for p in a.text_only] == [
        ("Which city is the Eiffel Tower in", "the Eiffel Tower", None)]
    assert meta(a.sample, "dropped") == "2" and "gone.png" in meta(a.sample, "dropped_reasons")
    assert "Which country" in meta(a.sample, "dropped_reasons")
    assert (b.paraphrases, b.renderings, b.text_only, b.sample.answer) == ((), (), (), None)
    assert got.heldout == (a.sample,)
    assert got.preserve == (*a.same_question, *a.text_only, *b.same_question)
    with pytest.warns(UserWarning):
        assert resolve_cases(str(path), "unused") == got
    with pytest.warns(UserWarning):
        assert [c.case_id for c in resolve_cases(str(path), "unused", limit=1).cases] == ["eiffel"]


def test_csv_missing_column_fails_the_file(tmp_path):
    path = _write(tmp_path / "cases.csv", ["case_id,question,image,target", "x,What is this,a.png,y"])
    with pytest.raises(ValueError, match="missing column 'constraint'"):
        resolve_cases(str(path), "unused")


def test_csv_bad_rows_become_error_cases(tmp_path):
    _png(tmp_path / "ok.png")
    path = _write(tmp_path / "cases.csv", [
        "case_id,question,constraint,image,target",
        "good,What city is this tower in,this tower,ok.png,Paris",
        "noimage,What city is this tower in,this tower,missing.png,Paris",
        "notarget,What city is this tower in,this tower,ok.png,",
        "good,What city is this tower in,this tower,ok.png,Rome",
        "noconstraint,What city is this in,this tower,ok.png,Rome",
    ])
    got = resolve_cases(str(path), "unused")
    good, noimage, notarget, again, noconstraint = got.cases
    assert good.error is None and good.sample.error is None and good.target == "Paris"
    assert "row 2 (line 3)" in noimage.error and "'image'" in noimage.error and "missing.png" in noimage.error
    assert noimage.sample.error == noimage.error and noimage.case_id == "noimage"
    assert "row 3 (line 4)" in notarget.error and "'target'" in notarget.error
    assert "repeats line 2" in again.error
    assert "'constraint'" in noconstraint.error and "this tower" in noconstraint.error
    assert got.heldout == () and got.preserve == ()
