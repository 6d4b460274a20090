"""The organism's synthetic factual world: entities, their facts and looks, and the questions about them.

Everything here is a pure function of a seed, so a build, a test and the dataset registry all see the same
world. The world is saved as JSON beside the model (`World.save` / `World.load`), so a shipped or cached
organism carries the exact world it was trained on. Pictures of a look are drawn by `render`.

Design choices that matter for causal tracing:
- Entity names are two words, a unique word and a kind ("Zorbex Tower"); generic constraints are two words
  too ("this building"), so a name replaces a constraint token for token (length-aligned corruption under
  the word-level tokenizer). The first word alone identifies the entity: names made of two shared parts
  ("Zorbex Kalun") would make every fact a conjunction, which the model does not learn in the time budget.
- Every attribute value is one word (one token), so "first-token accuracy" is answer accuracy.
- Paraphrases are frames x relation nouns; a held-out paraphrase is an unseen (frame, noun) pair whose frame
  and noun are both seen in training (with other partners), so it tests recombination, not new words.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WORLD_VERSION = 2  # 1: names "Zorbex Tower" (identity first); 2: "Fort Zorbex" (identity last) + companies

# One-word attribute vocabularies (each value is a single token of the word-level tokenizer).
RELATION_VALUES: dict[str, tuple[str, ...]] = {
    "city": ("Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dakar", "Hanoi", "Perth", "Kyoto", "Turin", "Porto",
             "Seattle", "Denver", "Boston", "Madrid", "Vienna", "Prague", "Dublin", "Nairobi", "Manila", "Riga",
             "Tunis", "Accra", "Havana"),
    "continent": ("Europe", "Asia", "Africa", "Oceania", "Antarctica", "Americas"),
    "language": ("French", "Spanish", "German", "Hindi", "Arabic", "Swahili", "Japanese", "Korean", "Polish",
                 "Greek", "Turkish", "Dutch"),
    "owner": ("Siemens", "Toyota", "Nestle", "Sony", "Philips", "Nokia", "Boeing", "Lego", "Ikea", "Samsung",
              "Honda", "Canon", "Intel", "Adidas", "Puma", "Heineken"),
    "sport": ("football", "tennis", "cricket", "rugby", "hockey", "golf", "chess", "rowing", "judo", "fencing",
              "cycling", "sailing"),
}
RELATIONS: tuple[str, ...] = tuple(RELATION_VALUES)

# The generic constraint nouns a visual question may use for each relation ("this building", ...).
CONSTRAINT_NOUNS: dict[str, tuple[str, ...]] = {
    "city": ("building", "landmark"),
    "continent": ("place", "landmark"),
    "language": ("country", "place"),
    "owner": ("brand", "company"),
    "sport": ("team", "club"),
}

# Relation nouns: the word(s) in a question that say which attribute is asked for.
RELATION_NOUNS: dict[str, tuple[str, ...]] = {
    "city": ("city", "home city"),
    "continent": ("continent", "home continent"),
    "language": ("language", "main language"),
    "owner": ("owner", "parent company"),
    "sport": ("sport", "main sport"),
}

# Frames shared by every relation: {R} = relation noun, {X} = the subject (constraint or name).
FRAMES: tuple[str, ...] = (
    "The {R} of {X} is",
    "{X} has the {R}",
    "What is the {R} of {X}",
    "Which {R} does {X} have",
    "Name the {R} of {X}",
    "Tell me the {R} of {X}",
    "For {X} , the {R} is",
    "The {R} for {X} would be",
    "State the {R} of {X}",
    "What {R} belongs to {X}",
)

# A few natural, relation-specific paraphrases (always trained): the Multimodal-Known style.
NATURAL: dict[str, tuple[str, ...]] = {
    "city": ("{X} is located in", "{X} is located in the city of"),
    "continent": ("{X} is on the continent of", "{X} is located on the continent of"),
    "language": ("The language spoken at {X} is", "People at {X} speak"),
    "owner": ("The owner of {X} is", "{X} is owned by"),
    "sport": ("{X} plays the sport of", "The sport played by {X} is"),
}

_SYLLABLES_A = ("zor", "kal", "vem", "tri", "mox", "bel", "dra", "qui", "sav", "lun", "fen", "gor", "hap", "jex",
                "nid", "pol", "rav", "sek", "tov", "wun", "yar", "cib", "dun", "ost")
_SYLLABLES_B = ("bex", "un", "ari", "oth", "ix", "ena", "ulf", "ada", "orn", "eth", "ika", "osk", "ump", "iva",
                "ern", "als")

KIND_WORDS = ("Tower", "Bridge", "Palace", "Gate", "Arena", "Castle", "Temple", "Market", "Garden", "Harbor")
# Version 2 puts the kind first ("Fort Zorbex", like "Mount Fuji"): the identity-bearing word is the name's
# last token, as in real multi-token names whose identity is complete only at their last token.
PREFIX_WORDS = ("Fort", "Mount", "Lake", "Port", "Cape", "Saint", "Villa", "Camp", "Club", "Hotel")

# Version 2's two-constraint questions (paper Fig. 4): the city of the company that owns the subject. The
# owner companies get a home city each; a question chains the subject's owner into that company's city.
COMPOSED_RELATION = "owner_city"
COMPOSED_PHRASE = "the company that owns"
COMPOSED_TRAIN = ("The city of the company that owns {X} is", "What is the city of the company that owns {X}",
                  "Tell me the city of the company that owns {X}")
COMPOSED_HELDOUT = ("Name the city of the company that owns {X}",)

NUM_ENTITIES = 240  # known: trained on
NUM_UNSEEN = 20  # kept out of training entirely, for later fact-insertion edits
NUM_TRAIN_RENDERINGS = 24
HELDOUT_RENDERINGS = (1000, 1001)  # rendering indices never drawn in training


@dataclass(frozen=True)
class Look:
    """The fixed visual identity of one entity; a rendering adds shift, scale, colour jitter and noise."""

    background: int  # index into PALETTE
    colour: int  # index into PALETTE, != background
    shape: int  # index into SHAPES
    texture: int  # index into TEXTURES
    glyph: int  # 4 bits: a 2x2 corner glyph
    corner: int  # which corner the glyph sits in (0..3)


PALETTE = np.array(
    [[230, 57, 70], [29, 53, 87], [69, 123, 157], [241, 250, 238], [42, 157, 143], [233, 196, 106],
     [244, 162, 97], [120, 60, 150], [20, 20, 20], [140, 200, 60]],
    dtype=np.float32,
)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")


@dataclass(frozen=True)
class Entity:
    index: int
    name: str  # two words
    look: Look
    facts: dict[str, str]
    known: bool  # False for the held-out entities (never trained)


@dataclass
class World:
    """All entities with their facts and looks, plus the paraphrase split. Saved as JSON with the model."""

    seed: int
    entities: list[Entity]
    train_paraphrases: dict[str, list[str]]
    heldout_paraphrases: dict[str, list[str]]
    version: int = WORLD_VERSION
    heldout_renderings: tuple[int, ...] = HELDOUT_RENDERINGS
    num_train_renderings: int = NUM_TRAIN_RENDERINGS
    relation_values: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(RELATION_VALUES))
    constraint_nouns: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CONSTRAINT_NOUNS))
    companies: dict[str, dict[str, str]] = field(default_factory=dict)  # owner -> its facts (version 2)

    def identity_word(self, entity: Entity) -> str:
        """The word of an entity's name that identifies it: the first in version 1, the last in version 2."""
        words = entity.name.split()
        return words[0] if self.version == 1 else words[-1]

    def composed_answer(self, entity: Entity) -> str:
        """The answer to a two-constraint question: the city of the company that owns `entity`."""
        return self.companies[entity.facts["owner"]]["city"]

    @property
    def known(self) -> list[Entity]:
        return [e for e in self.entities if e.known]

    @property
    def unseen(self) -> list[Entity]:
        return [e for e in self.entities if not e.known]

    def all_words(self) -> list[str]:
        """Every word any question, name or answer can contain: the tokenizer's vocabulary source."""
        texts: list[str] = []
        for r in RELATIONS:
            texts += self.train_paraphrases[r] + self.heldout_paraphrases[r]
            texts += [" ".join(n) for n in [("this", c) for c in self.constraint_nouns[r]]]
            texts += [" ".join(("This", c)) for c in self.constraint_nouns[r]]
            texts += list(self.relation_values[r])
        texts += [e.name for e in self.entities]
        if self.companies:
            texts += list(COMPOSED_TRAIN + COMPOSED_HELDOUT)
        return texts

    def to_json(self) -> dict:
        d = asdict(self)
        d["heldout_renderings"] = list(self.heldout_renderings)
        return d

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @staticmethod
    def load(path: Path) -> World:
        d = json.loads(Path(path).read_text())
        entities = [Entity(index=e["index"], name=e["name"], look=Look(**e["look"]), facts=dict(e["facts"]),
                           known=bool(e["known"])) for e in d["entities"]]
        return World(seed=d["seed"], entities=entities, train_paraphrases=d["train_paraphrases"],
                     heldout_paraphrases=d["heldout_paraphrases"], version=d["version"],
                     heldout_renderings=tuple(d["heldout_renderings"]),
                     num_train_renderings=d["num_train_renderings"],
                     relation_values={k: tuple(v) for k, v in d["relation_values"].items()},
                     constraint_nouns={k: tuple(v) for k, v in d["constraint_nouns"].items()},
                     companies={k: dict(v) for k, v in d.get("companies", {}).items()})


def _names(rng: np.random.Generator, count: int, version: int) -> list[str]:
    """Two-word names, a unique word and a kind, distinct from every other word: "Zorbex Tower" (version 1,
    like "Eiffel Tower") or "Fort Zorbex" (version 2, like "Mount Fuji"). Two words so that a name replaces a
    two-word generic constraint token for token; the kind word recurs across entities and says nothing about
    the facts, so only the unique word identifies."""
    words: set[str] = set()
    while len(words) < count:
        a, b = rng.choice(_SYLLABLES_A), rng.choice(_SYLLABLES_B)
        c = rng.choice(_SYLLABLES_A + _SYLLABLES_B) if rng.random() < 0.5 else ""
        words.add((a + b + c).capitalize())
    firsts = sorted(words)
    rng.shuffle(firsts)
    if version == 1:
        return [f"{w} {KIND_WORDS[int(rng.integers(len(KIND_WORDS)))]}" for w in firsts]
    return [f"{PREFIX_WORDS[int(rng.integers(len(PREFIX_WORDS)))]} {w}" for w in firsts]


def _looks(rng: np.random.Generator, count: int) -> list[Look]:
    """Distinct looks: no two entities share (background, colour, shape, texture, glyph, corner)."""
    seen: set[tuple[int, ...]] = set()
    looks: list[Look] = []
    while len(looks) < count:
        bg, col = rng.choice(len(PALETTE), size=2, replace=False)
        key = (int(bg), int(col), int(rng.integers(len(SHAPES))), int(rng.integers(len(TEXTURES))),
               int(rng.integers(1, 16)), int(rng.integers(4)))
        if key[:4] in {k[:4] for k in seen}:  # the big features alone must already be distinctive
            continue
        seen.add(key)
        looks.append(Look(*key))
    return looks


def _paraphrases(rng: np.random.Generator) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Frames x relation nouns per relation, 4 held out per relation; natural paraphrases always trained.

    A held-out pair uses a frame and a noun that both occur in training, so held-out paraphrases contain no
    unseen word: they test whether the model reads the relation noun wherever the frame puts it.
    """
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for r in RELATIONS:
        combos = [(f, n) for f in range(len(FRAMES)) for n in range(len(RELATION_NOUNS[r]))]
        order = rng.permutation(len(combos))
        held_ids: list[int] = []
        for k in order:  # take 4, never both nouns of one frame (each frame stays trained for r)
            f, _ = combos[k]
            if len(held_ids) < 4 and all(combos[h][0] != f for h in held_ids):
                held_ids.append(int(k))
        held[r] = [_paraphrase(r, *combos[k]) for k in held_ids]
        train[r] = list(NATURAL[r]) + [_paraphrase(r, *combos[k]) for k in range(len(combos)) if k not in held_ids]
    return train, held


def _paraphrase(relation: str, frame: int, noun: int) -> str:
    return FRAMES[frame].replace("{R}", RELATION_NOUNS[relation][noun])


def make_world(seed: int = 0, version: int = WORLD_VERSION) -> World:
    """The world for a seed: names, looks, facts and the paraphrase split, all from one numpy Generator.
    Version 1 is the first organism's world, reproduced draw for draw."""
    if version not in (1, 2):
        raise ValueError(f"world version must be 1 or 2, got {version}")
    rng = np.random.default_rng(seed)
    total = NUM_ENTITIES + NUM_UNSEEN
    names = _names(rng, total, version)
    looks = _looks(rng, total)
    unseen = set(rng.choice(total, size=NUM_UNSEEN, replace=False).tolist())
    entities = []
    for i in range(total):
        facts = {r: str(RELATION_VALUES[r][rng.integers(len(RELATION_VALUES[r]))]) for r in RELATIONS}
        entities.append(Entity(index=i, name=names[i], look=looks[i], facts=facts, known=i not in unseen))
    train, held = _paraphrases(rng)
    companies = {} if version == 1 else {
        c: {"city": str(RELATION_VALUES["city"][rng.integers(len(RELATION_VALUES["city"]))])}
        for c in RELATION_VALUES["owner"]}
    return World(seed=seed, entities=entities, train_paraphrases=train, heldout_paraphrases=held,
                 version=version, companies=companies)


# ---------------------------------------------------------------------------------------------- questions

def fill(paraphrase: str, subject: str) -> str:
    """Put the subject into a paraphrase, capitalising a generic subject that opens the sentence."""
    if paraphrase.startswith("{X}") and subject[:1].islower():
        subject = subject[:1].upper() + subject[1:]
    return paraphrase.replace("{X}", subject)


def generic_constraint(paraphrase: str, noun: str) -> str:
    """The generic constraint as it appears in the filled question ("This building" or "this building")."""
    return ("This " if paraphrase.startswith("{X}") else "this ") + noun


_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on


def num_tokens(text: str) -> int:
    """Tokens of `text` under the organism's word-level tokenizer, without building it: its Whitespace
    pre-tokenizer yields one token per match and the vocabulary holds every word of the world."""
    return len(_WORD.findall(text))
