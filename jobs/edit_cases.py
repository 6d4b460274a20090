"""The cases a MultEdit run edits (`mmtrace edit --cases SPEC`), with the questions that measure each edit.

`resolve_cases(spec, model_path)` turns a spec into an `EditCaseSet`: the cases, held-out questions whose
accuracy before and after each edit stands in for the paper's MMMU check, and unrelated prompts whose keys a
null-space (AlphaEdit) edit preserves. Specs:

- `organism:correct`: error correction. The held-out visual questions the organism answers wrong (first-token
  argmax != gold), target = the gold answer.
- `organism:counterfact`: a known fact changed. Questions it answers right, target = another value of the
  relation, one case per known entity (relations in turn), skipping every `PRESERVE_EVERY`-th entity.
- `organism:insert`: one case for each of the 20 entities the organism never saw, target = its fact.
- `organism:all`: the three, in that order (`limit` applies to each).
- a path to a CSV file: cases for real models (`CSV_COLUMNS`; see `csv_cases`).

Everything is a pure function of the world, the checkpoint on disk and the file: every random choice comes
from a numpy Generator seeded by (world seed, purpose, entity, relation), as `organism/dataset.py` does, so a
rerun, a resumed run and every worker of a backend edit the same cases and measure them on the same
questions, and content-addressed units stay valid.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtrace.cluster.store import atomic_path
from mmtrace.workers.adapters import Adapter, load_adapter
from mmtrace.workers.edit import EditCase, Scorer
from mmtrace.workers.encoding import ConstraintNotFound, find_constraint
from mmtrace.workers.spec import Sample, format_question

from .organism.dataset import _choices, organism_samples
from .organism.render import UNSEEN_RENDERINGS, heldout_image, render, unseen_image
from .organism.world import RELATIONS, Entity, World, fill, generic_constraint

ORGANISM_USES = ("correct", "counterfact", "insert")
EDIT_RENDERINGS = (1002, 1003)  # new pictures of a known entity: training draws 0..23, the held-out set 1000-1001
EDIT_IMAGES = "edit_images"  # the folder under the organism root that caches those pictures
TRAINED_PARAPHRASES = 2  # trained wordings beside the held-out ones in a case's paraphrase set
OTHERS = 8  # other entities in a case's same-question and text-only sets
PRESERVE_EVERY = 4  # every 4th known entity is never a counterfactual edit (see `organism_cases`)

# Seed tags of the Generators below; dataset.py uses 2, 3 and 4, render.py 7919.
_SEED_TARGET, _SEED_OTHERS, _SEED_PARAPHRASES = 11, 12, 13

CSV_COLUMNS = ("case_id", "question", "constraint", "image", "target")
CSV_LIST_COLUMNS = ("paraphrases", "renderings", "same_image", "same_question", "text_only")
LIST_SEP = "||"  # between the items of a list column
CONSTRAINT_SEP = "##"  # `question ## constraint`: a question item's own constraint


@dataclass(frozen=True)
class EditCaseSet:
    """What an edit run edits and what it measures beside each edit.

    `heldout`: questions with answers, scored before and after every edit (overall accuracy, the stand-in for
    the paper's MMMU check). `preserve`: unrelated prompts whose keys a null-space edit keeps unchanged.
    """

    cases: tuple[EditCase, ...]
    heldout: tuple[Sample, ...] = ()
    preserve: tuple[Sample, ...] = ()


def resolve_cases(spec: str, model_path: str | Path, limit: int | None = None, heldout: int = 100,
                  preserve: int = 200, *, adapter: Adapter | None = None) -> EditCaseSet:
    """The case set a `--cases` spec names (see the module docstring). `model_path` is the organism's folder
    for an organism spec (unused for a CSV); `limit` caps the cases of each use; `heldout` and `preserve` cap
    the two sample sets. `adapter`, when given, is that model already loaded (it scores the organism's
    held-out questions, which `correct` and `counterfact` need; otherwise it is loaded from `model_path`)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec.startswith("organism:"):
        use = spec.split(":", 1)[1]
        if use not in (*ORGANISM_USES, "all"):
            raise ValueError(f"unknown organism cases {spec!r}; use organism:correct, organism:counterfact, "
                             "organism:insert or organism:all, or a CSV file")
        uses = ORGANISM_USES if use == "all" else (use,)
        return organism_cases(model_path, uses, limit=limit, heldout=heldout, preserve=preserve, adapter=adapter)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--cases {spec!r}: no such file, and not organism:correct|counterfact|insert|all")
    return csv_cases(path, limit=limit, heldout=heldout, preserve=preserve)


# ---------------------------------------------------------------------------------------------- the organism


def organism_cases(root: str | Path, uses: tuple[str, ...] = ORGANISM_USES, limit: int | None = None,
                   heldout: int = 100, preserve: int = 200, adapter: Adapter | None = None) -> EditCaseSet:
    """The organism's cases for `uses`, each about one (entity, relation) visual question with the generic
    constraint ("this building") and a picture of the entity.

    `heldout` leaves out the questions the cases edit, so its accuracy drop counts collateral damage only (a
    counterfactual edit makes its own question "wrong" by design). `preserve` takes the held-out-paraphrase
    questions of entities no case edits nor the held-out set measures: a preserved key from the edited entity's
    own picture would make the null-space projection cancel the edit itself. That is why counterfactual cases skip every
    `PRESERVE_EVERY`-th entity: `organism:all` still leaves entities to preserve.
    """
    root = Path(root)
    world = World.load(root / "world.json")
    visual = organism_samples("visual", "heldout", root=root)
    right: tuple[bool, ...] = ()
    if {"correct", "counterfact"} & set(uses):
        right = answered_right(root, visual, adapter)
    cases: list[EditCase] = []
    for use in uses:
        if use not in ORGANISM_USES:
            raise ValueError(f"use must be one of {ORGANISM_USES}, got {use!r}")
        picks = {"correct": _correct_picks, "counterfact": _counterfact_picks, "insert": _insert_picks}[use](
            world, right)
        for i, (e, ri, target) in enumerate(picks[:limit]):
            cases.append(_organism_case(world, root, use, i, e, ri, target))
    edited = {(dict(c.sample.meta)["entity"], dict(c.sample.meta)["relation"]) for c in cases}
    held = spread([s for s in visual if (dict(s.meta)["entity"], dict(s.meta)["relation"]) not in edited], heldout)
    return EditCaseSet(tuple(cases), tuple(held), tuple(_preserved(root, edited, held, preserve)))


def _preserved(root: Path, edited: set[tuple[str, str]], held: list[Sample], count: int) -> list[Sample]:
    """Questions of entities that no case edits and the held-out set does not measure: a preserved key of a
    held-out entity's picture would let the null-space projection protect exactly what the drop measures.
    Where the cases leave no such entity (every entity edited or held out), the held-out ones are used."""
    skip = {e for e, _ in edited}
    pool = [s for s in organism_samples("visual", "paraphrase", root=root) if dict(s.meta)["entity"] not in skip]
    measured = {dict(s.meta)["entity"] for s in held}
    apart = [s for s in pool if dict(s.meta)["entity"] not in measured]
    return spread(apart if len(apart) >= count else pool, count)


def answered_right(root: Path, visual: list[Sample], adapter: Adapter | None = None) -> tuple[bool, ...]:
    """Whether the checkpoint in `root` answers each held-out visual question right (first-token argmax ==
    gold). Remembered per process, keyed by the weights file's path, size and mtime, because one run resolves
    its cases more than once (plan, resume) and scoring the 1200 questions takes ~20 s on a CPU."""
    weights = (root / "model.safetensors").resolve()
    stat = weights.stat()
    key = (str(weights), stat.st_size, stat.st_mtime_ns, tuple(s.sample_id for s in visual))
    if key not in _VERDICTS:
        adapter = adapter if adapter is not None else load_adapter(str(root))
        top = Scorer(adapter).score(visual).top
        _VERDICTS[key] = tuple(t == adapter.answer_ids(s.answer or "")[0] for t, s in zip(top, visual))
    return _VERDICTS[key]


_VERDICTS: dict[tuple, tuple[bool, ...]] = {}


def _correct_picks(world: World, right: tuple[bool, ...]) -> list[tuple[Entity, int, str]]:
    """Every held-out question answered wrong, in the dataset's order; the target is the gold answer."""
    n = len(RELATIONS)
    return [(e, ri, e.facts[RELATIONS[ri]]) for j, e in enumerate(world.known) for ri in range(n)
            if not right[j * n + ri]]


def _counterfact_picks(world: World, right: tuple[bool, ...]) -> list[tuple[Entity, int, str]]:
    """One question per known entity (bar every PRESERVE_EVERY-th), relations in turn so that all five are
    edited about equally; where the model misses that relation, the next one it answers right. The target is
    another value of the relation, drawn per (entity, relation), so a case never depends on which others
    exist."""
    n, picks = len(RELATIONS), []
    for j, e in enumerate(world.known):
        if j % PRESERVE_EVERY == PRESERVE_EVERY - 1:
            continue
        ri = next((ri for ri in ((j + k) % n for k in range(n)) if right[j * n + ri]), None)
        if ri is None:
            continue
        r = RELATIONS[ri]
        values = [v for v in world.relation_values[r] if v != e.facts[r]]
        rng = np.random.default_rng([world.seed, _SEED_TARGET, e.index, ri])
        picks.append((e, ri, values[int(rng.integers(len(values)))]))
    return picks


def _insert_picks(world: World, right: tuple[bool, ...]) -> list[tuple[Entity, int, str]]:
    """Each unseen entity once, relations in turn; the target is its fact, which the model never saw."""
    return [(e, k % len(RELATIONS), e.facts[RELATIONS[k % len(RELATIONS)]]) for k, e in enumerate(world.unseen)]


def _organism_case(world: World, root: Path, use: str, i: int, e: Entity, ri: int, target: str) -> EditCase:
    """The case and its measurement sets. The edited question is the held-out one for (e, r) (its trained
    wording and held-out rendering); an unseen entity is asked with UNSEEN_RENDERINGS[0], and its other
    renderings measure generalisation."""
    r = RELATIONS[ri]
    para, noun, rendering = _choices(world, e.index, ri, "heldout")
    case_id = f"organism/edit/{use}/{i}"
    if e.known:
        image = _known_image(root, e, rendering)
        others = [_known_image(root, e, k) for k in world.heldout_renderings if k != rendering]
        others += [edit_image(root, world, e, k) for k in EDIT_RENDERINGS]
    else:
        rendering = UNSEEN_RENDERINGS[0]
        image = str(unseen_image(root, e.index, rendering))
        others = [str(unseen_image(root, e.index, k)) for k in UNSEEN_RENDERINGS[1:]]
    question, constraint = fill(para, "this " + noun), generic_constraint(para, noun)

    def sample(part: str, k: int, q: str, c: str, img: str | None, who: Entity, rel: str) -> Sample:
        return Sample(sample_id=f"{case_id}/{part}/{k}", subset="organism:edit", question=q, constraint=c,
                      image=img, answer=who.facts[rel], meta=(("entity", who.name), ("relation", rel)))

    paras = list(world.heldout_paraphrases[r]) + _trained_paraphrases(world, e, ri, para)
    rel_others = [(k, RELATIONS[k]) for k in range(len(RELATIONS)) if k != ri]
    same_image, keep = [], []
    for k, r2 in rel_others:
        p2, n2, _ = _choices(world, e.index, k, "heldout")
        same_image.append(sample("same_image", len(same_image), fill(p2, "this " + n2), generic_constraint(p2, n2),
                                 image, e, r2))
        keep += [sample("keep", len(keep), fill(p, "this " + n2), generic_constraint(p, n2), image, e, r2)
                 for p in _trained_paraphrases(world, e, k, p2)]
    mates = _others(world, e, ri, target)
    main = Sample(sample_id=case_id, subset="organism:edit", question=question, constraint=constraint, image=image,
                  answer=e.facts[r],
                  meta=(("entity", e.name), ("relation", r), ("use", use), ("known", str(e.known).lower()),
                        ("paraphrase", para), ("rendering", str(rendering)), ("gold", e.facts[r]),
                        ("target", target)))
    return EditCase(
        case_id=case_id, use=use, sample=main, target=target,
        paraphrases=tuple(sample("paraphrases", k, fill(p, "this " + noun), generic_constraint(p, noun), image, e, r)
                          for k, p in enumerate(paras)),
        renderings=tuple(sample("renderings", k, question, constraint, img, e, r) for k, img in enumerate(others)),
        same_image=tuple(same_image),
        same_question=tuple(sample("same_question", k, question, constraint,
                                   _known_image(root, o, world.heldout_renderings[
                                       (o.index + ri) % len(world.heldout_renderings)]), o, r)
                            for k, o in enumerate(mates)),
        text_only=tuple(sample("text_only", k, fill(para, o.name), o.name, None, o, r) for k, o in enumerate(mates)),
        keep=tuple(keep),
    )


def _trained_paraphrases(world: World, e: Entity, ri: int, edited: str) -> list[str]:
    """TRAINED_PARAPHRASES trained wordings of the relation other than the edited one (the trained list can
    hold a wording twice: a natural paraphrase may equal a frame's)."""
    pool = [p for p in dict.fromkeys(world.train_paraphrases[RELATIONS[ri]]) if p != edited]
    rng = np.random.default_rng([world.seed, _SEED_PARAPHRASES, e.index, ri])
    return [pool[int(k)] for k in rng.choice(len(pool), size=min(TRAINED_PARAPHRASES, len(pool)), replace=False)]


def _others(world: World, e: Entity, ri: int, target: str) -> list[Entity]:
    """OTHERS known entities for the same-question and text-only sets (one draw serves both, so the two sets
    ask about the same entities). Entities whose answer is the target are left out: an edit leaking onto them
    would not change their argmax, so they could not show it."""
    r = RELATIONS[ri]
    pool = [o for o in world.known if o.index != e.index and o.facts[r] != target]
    rng = np.random.default_rng([world.seed, _SEED_OTHERS, e.index, ri])
    return [pool[int(k)] for k in rng.choice(len(pool), size=min(OTHERS, len(pool)), replace=False)]


def _known_image(root: Path, e: Entity, rendering: int) -> str:
    return str(heldout_image(root, e.index, rendering))


def edit_image(root: Path, world: World, e: Entity, rendering: int) -> str:
    """A rendering of `e` beyond the installed ones, written under `root/EDIT_IMAGES` on first use. Rendering
    is a pure function, so the file is a cache; it is written beside itself and renamed in, so that workers
    sharing the folder never read half a PNG."""
    path = Path(root) / EDIT_IMAGES / f"{e.index}_{rendering}.png"
    if not path.is_file():
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(render(e.look, world.seed, e.index, rendering)).save(tmp, format="PNG")
    return str(path)


def spread(items: list[Sample], n: int) -> list[Sample]:
    """`n` items evenly spaced over `items` (all when there are not more): the organism's questions come
    entity by entity, so taking the first n would ask about a handful of entities only."""
    if n >= len(items):
        return list(items)
    return [items[k * len(items) // n] for k in range(max(n, 0))]


# ---------------------------------------------------------------------------------------------- CSV files


def csv_cases(path: str | Path, limit: int | None = None, heldout: int = 100, preserve: int = 200) -> EditCaseSet:
    """Cases from a CSV file, for real models.

    Required columns `CSV_COLUMNS`; optional `answer` (the row's gold answer before the edit) and the list
    columns, each `||`-separated: `paraphrases`, `same_image`, `text_only` are questions (a question that
    does not contain the case's constraint names its own as `question ## constraint`); `renderings` (other
    pictures of the subject, same question) and `same_question` (other subjects' pictures, same question)
    are image paths. Relative image paths resolve against the CSV's folder.

    A missing required column fails the file (ValueError). A bad row (empty field, missing image, constraint
    not in the question, repeated case id) becomes a case with `error` set, so the run records it and goes
    on. A measurement item that cannot be asked (constraint not found, image missing) is dropped; the count
    and the reasons go into the case sample's meta (`dropped`, `dropped_reasons`) and one warning per file.

    `heldout` is the good rows' own questions that have an answer; `preserve` the same-question and
    text-only prompts of all cases.
    """
    path = Path(path).expanduser()
    folder = path.parent
    subset = f"csv:{path.stem}"
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column {missing[0]!r} (columns {header}); a case file needs "
                             f"{', '.join(CSV_COLUMNS)}, optionally answer, {', '.join(CSV_LIST_COLUMNS)}")
        rows = []
        line = reader.line_num + 1
        for record in reader:
            if any(v.strip() for v in record):
                rows.append((line, {h: (v or "").strip() for h, v in zip(header, record)}))
            line = reader.line_num + 1
    cases: list[EditCase] = []
    seen: dict[str, int] = {}
    dropped = 0
    for n, (line, fields) in enumerate(rows[:limit], 1):
        case = _csv_case(path, folder, subset, n, line, fields, seen)
        dropped += int(dict(case.sample.meta).get("dropped", "0"))
        cases.append(case)
    if dropped:
        warnings.warn(f"{path}: {dropped} measurement questions dropped (see the 'dropped_reasons' meta of each "
                      "case's sample)", stacklevel=2)
    good = [c for c in cases if c.error is None]
    held = [c.sample for c in good if c.sample.answer]
    keep: dict[tuple, Sample] = {}
    for c in good:
        for s in (*c.same_question, *c.text_only):
            keep.setdefault((s.question, s.constraint, s.image), s)
    return EditCaseSet(tuple(cases), tuple(held[:heldout]), tuple(list(keep.values())[:preserve]))


def _csv_case(path: Path, folder: Path, subset: str, row: int, line: int, fields: dict[str, str],
              seen: dict[str, int]) -> EditCase:
    """Data row `row` (starting on physical line `line`) as a case; a bad row as a case with `error` naming
    the row, the field and what to do."""
    where = f"{path.name} row {row} (line {line})"
    case_id = fields.get("case_id") or f"csv/{path.stem}/line{line}"
    question, constraint = fields.get("question", ""), fields.get("constraint", "")
    target, answer = fields.get("target", ""), fields.get("answer") or None
    image = str(_resolve(folder, fields["image"])) if fields.get("image") else None
    error = None
    empty = [c for c in CSV_COLUMNS if not fields.get(c)]
    if empty:
        error = f"{where}: the {empty[0]!r} field is empty; fill it in (every case needs {', '.join(CSV_COLUMNS)})"
    elif case_id in seen:
        error = f"{where}: case_id {case_id!r} repeats line {seen[case_id]}; give every case its own id"
    elif not Path(image or "").is_file():
        error = (f"{where}: the 'image' file {image} does not exist; fix the path (a relative one resolves "
                 f"against {folder})")
    else:
        try:
            find_constraint(format_question(question), constraint)
        except ConstraintNotFound as exc:
            error = f"{where}: 'constraint': {exc}; write the constraint exactly as the question has it"
    seen.setdefault(case_id, line)
    meta = (("row", str(row)), ("line", str(line)), ("source", str(path)), ("target", target))
    if error:
        sample = Sample(sample_id=case_id, subset=subset, question=question, constraint=constraint, image=image,
                        answer=answer, error=error, meta=meta)
        return EditCase(case_id=case_id, use="csv", sample=sample, target=target, error=error)
    drops: list[str] = []
    sets: dict[str, list[Sample]] = {c: [] for c in CSV_LIST_COLUMNS}
    for col in CSV_LIST_COLUMNS:
        for k, item in enumerate(i.strip() for i in fields.get(col, "").split(LIST_SEP)):
            if not item:
                continue
            sid = f"{case_id}/{col}/{k}"
            if col in ("renderings", "same_question"):
                img = _resolve(folder, item)
                if not img.is_file():
                    drops.append(f"{col} item {k}: image {img} does not exist")
                    continue
                sets[col].append(Sample(sample_id=sid, subset=subset, question=question, constraint=constraint,
                                        image=str(img), answer=answer if col == "renderings" else None))
                continue
            q, _, own = item.partition(CONSTRAINT_SEP)
            q, c = q.strip(), own.strip() or constraint
            try:
                find_constraint(format_question(q), c)
            except ConstraintNotFound:
                drops.append(f"{col} item {k}: the constraint {c!r} does not occur in {q!r}")
                continue
            sets[col].append(Sample(sample_id=sid, subset=subset, question=q, constraint=c,
                                    image=None if col == "text_only" else image,
                                    answer=answer if col == "paraphrases" else None))
    if drops:
        meta += (("dropped", str(len(drops))), ("dropped_reasons", "; ".join(drops)))
    sample = Sample(sample_id=case_id, subset=subset, question=question, constraint=constraint, image=image,
                    answer=answer, meta=meta)
    return EditCase(case_id=case_id, use="csv", sample=sample, target=target,
                    **{c: tuple(v) for c, v in sets.items()})


def _resolve(folder: Path, image: str) -> Path:
    p = Path(image).expanduser()
    return p if p.is_absolute() else folder / p
