"""The few types that cross rooms: a sample to trace and the spec of a trace.

They live here, beside the engine that consumes them, so that `jobs/` (which makes samples from datasets)
and `cluster/` (which ships them) depend on `workers/` and never the other way round. Both are frozen,
picklable dataclasses: a Ray actor or a Slurm job receives them unchanged.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields
from string import Formatter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the types only: importing spec stays torch-free for planners and drivers
    import torch

KINDS = ("mlp", "attn", "hidden")
WINDOW_STYLES = ("radius", "width")
CORRUPTIONS = ("replace", "noise")
ENGINES = ("fast", "reference", "atp", "fast-v1")  # workers/trace.py maps each to its class
DTYPES = ("float32", "float16", "bfloat16")  # workers/adapters.py maps each to its torch dtype
TOKEN_ROLES = ("image", "before", "constraint", "after", "last")
ALIGNED_ROLES = (
    "image", "before", "constraint_first", "constraint_mid", "constraint_last", "after_first", "after_rest", "last",
)
_ROLE = re.compile(r"(constraint|between)(\d*)(?:_(first|mid|last))?")


def role_rank(role: str) -> tuple[int, int, int]:
    """Where a (token or aligned) role sits in a prompt, for ordering table rows and heatmap rows: a
    several-constraint prompt's spans in order (constraint1_first .. constraint1_last, between1, constraint2_first,
    ...) between `before` and `after`. Unknown roles sort last."""
    fixed = {"image": (0, 0, 0), "before": (1, 0, 0), "after": (3, 0, 0), "after_first": (3, 0, 0),
             "after_rest": (3, 1, 0), "last": (4, 0, 0)}
    if role in fixed:
        return fixed[role]
    m = _ROLE.fullmatch(role)
    if m is None:
        return (5, 0, 0)
    span = int(m.group(2) or 1)
    part = 3 if m.group(1) == "between" else ("first", "mid", "last", None).index(m.group(3)) % 3
    return (2, span, part)


DEFAULT_TEMPLATE = "<image>\nUSER: {question} Answer in a few words.\nASSISTANT:"
TEXT_TEMPLATE = "USER: {question} Answer in a few words.\nASSISTANT:"


def format_question(question: str) -> str:
    """The authors' prompt adds "?" after every question; we add it only where none is there already."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def render_prompt(question: str, visual: bool, template: str | None = None) -> tuple[str, int]:
    """The prompt for one question and the character where the formatted question starts in it.

    The start is the length of the template's text before `{question}`, never a search of the prompt for the
    question, which would land on an earlier copy when the template's text happens to contain it. A template
    must hold one plain `{question}` field and no other (literal braces are written `{{` and `}}`).
    """
    template = template or (DEFAULT_TEMPLATE if visual else TEXT_TEMPLATE)
    parts = list(Formatter().parse(template))
    named = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    if named != [("question", "", None)]:
        raise ValueError(f"the prompt template {template!r} must hold one plain {{question}} field and no other "
                         f"field, got {[n[0] for n in named]}")
    at = next(i for i, part in enumerate(parts) if part[1] is not None)
    before = "".join(part[0] for part in parts[:at + 1])
    return template.format(question=format_question(question)), len(before)


def build_prompt(question: str, visual: bool, template: str | None = None) -> str:
    """The prompt for one question; `{question}` in the template receives the "?"-terminated question."""
    return render_prompt(question, visual, template)[0]


# A uniform grey stand-in for a missing image (`--missing-images blank`); rows that use it are marked.
BLANK_IMAGE = "mmtrace:blank"


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One question to trace.

    `image` is a file path, `BLANK_IMAGE`, or None for a text-only question (an LLM, or an MLLM's
    text-only twin). `corrupt_constraint`, when set, replaces the constraint in the corrupted run instead of
    the spec's replacement word (the organism's world gives each question a different entity's name of the
    same token length). `error` marks a row that cannot be traced: the run records it and goes on.

    A question with several constraints (paper Fig. 4) lists them in `constraints`, in question order and in
    the question's spelling; `constraint` is then their "; "-joined text. `corrupt_spans` picks the spans the
    corrupted run replaces (0-based indices into `spans`; empty: all of them).
    """

    sample_id: str
    subset: str
    question: str
    constraint: str = ""
    image: str | None = None
    answer: str | None = None
    corrupt_constraint: str | None = None
    error: str | None = None
    meta: tuple[tuple[str, str], ...] = ()
    constraints: tuple[str, ...] = ()
    corrupt_spans: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "constraints", tuple(self.constraints))
        object.__setattr__(self, "corrupt_spans", tuple(self.corrupt_spans))
        if len(self.constraints) == 1:
            raise ValueError(f"{self.sample_id}: one constraint goes in `constraint`, not `constraints`")
        if self.constraints and not self.constraint:
            object.__setattr__(self, "constraint", "; ".join(self.constraints))
        bad = [i for i in self.corrupt_spans if not 0 <= i < len(self.spans)]
        if bad:
            raise ValueError(f"{self.sample_id}: corrupt_spans {bad} outside its {len(self.spans)} span(s)")
        assert len(self.replacements) == len(self.spans)  # raises a clear ValueError itself when not

    @property
    def spans(self) -> tuple[str, ...]:
        """Every constraint of the question, in question order (one for most questions)."""
        return self.constraints or (self.constraint,)

    @property
    def corrupted(self) -> tuple[int, ...]:
        """Indices of the spans the corrupted run replaces."""
        return self.corrupt_spans or tuple(range(len(self.spans)))

    @property
    def replacements(self) -> tuple[str | None, ...]:
        """Per span, the text its corruption puts in (None: the spec's replacement word). A several-constraint
        sample's `corrupt_constraint` holds one part per span, "; "-separated, an empty part meaning None."""
        if self.corrupt_constraint is None:
            return (None,) * len(self.spans)
        if not self.constraints:
            return (self.corrupt_constraint,)
        parts = [p.strip() or None for p in self.corrupt_constraint.split(";")]
        if len(parts) != len(self.spans):
            raise ValueError(f"{self.sample_id}: corrupt_constraint {self.corrupt_constraint!r} has {len(parts)} "
                             f"part(s) for {len(self.spans)} constraints; give one per constraint, ';'-separated")
        return tuple(parts)

    @property
    def corruption_label(self) -> str:
        """Which spans the corrupted run replaces, as the tables record it: `all`, or 1-based numbers (`2`)."""
        if len(self.corrupted) == len(self.spans):
            return "all"
        return "+".join(str(i + 1) for i in self.corrupted)

    def meta_value(self, key: str, default: str = "") -> str:
        return dict(self.meta).get(key, default)

    @property
    def is_visual(self) -> bool:
        return self.image is not None

    @property
    def placeholder_image(self) -> bool:
        return self.image == BLANK_IMAGE

    def with_error(self, error: str) -> Sample:
        return Sample(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "error": error})


def option(default: Any = MISSING, *, help: str, identity: bool, choices: tuple | None = None,
           default_factory: Any = MISSING) -> Any:
    """A config field that says, beside itself, what it means (`help`, `choices`, both shown by the CLI) and
    whether it enters a run's identity (`identity`: True when changing it changes the numbers)."""
    meta = {"help": help, "identity": identity, "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def is_identity(cls: type, name: str) -> bool:
    """Whether field `name` of dataclass `cls` enters a run's identity (declared by `option`)."""
    return bool({f.name: f for f in fields(cls)}[name].metadata.get("identity"))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int | None:
    """'512MiB', '8GB', '1e9' -> bytes; 'auto' -> None (the device decides)."""
    value = str(text).strip().lower().replace(" ", "")
    if value == "auto":
        return None
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"memory_budget: {text!r} is not a size; write e.g. 512MiB, 8GB or auto") from None
    if size <= 0:
        raise ValueError(f"memory_budget must be positive, got {text!r}")
    return int(size)


@dataclass(frozen=True)
class TraceSpec:
    """What to trace for every sample of a run.

    window/window_style: "radius" is the authors' rule (window 1 restores the one layer i; window w > 1
    restores layers i-w..i+w, clipped); "width" is ROME's (w consecutive layers centred on i, clipped).
    corruption: "replace" sets every constraint token to the first token of `replacement` (the sequence
    length is preserved, as in the authors' code); "noise" adds `noise_scale` x sigma Gaussian noise to the
    constraint's token embeddings, sigma being the std of the embedding matrix, from a generator seeded by
    (seed, sample id) so every cell of a sample sees the same draw.
    """

    kinds: tuple[str, ...] = option(KINDS, choices=KINDS, identity=False,
                                    help="sites to restore (each kind is its own slice of the grid and unit)")
    window: int = option(1, identity=True, help="1 = one layer; w > 1 = layers i-w..i+w (radius) or w layers (width)")
    window_style: str = option("radius", choices=WINDOW_STYLES, identity=True,
                               help="'radius': the authors' rule; 'width': ROME's, w consecutive layers")
    corruption: str = option("replace", choices=CORRUPTIONS, identity=True,
                             help="replace the constraint's tokens, or add Gaussian noise to their embeddings")
    replacement: str = option("Paris", identity=True,
                              help="word whose first token replaces every constraint token (when a sample names "
                                   "no replacement of its own)")
    noise_scale: float = option(3.0, identity=True, help="noise std in units of the embedding matrix's std")
    seed: int = option(0, identity=True, help="seed of the noise (drawn per sample from (seed, sample id))")
    max_batch: int = option(1024, identity=False, help="most rows per batched forward in the fast engines (the "
                                                       "memory budget sizes batches below it)")
    recheck: int = option(20, identity=True,
                          help="engine atp: restore exactly this many cells per sample and kind, those of the "
                               "largest estimated |ie|")
    memory_budget: str = option("auto", identity=False,
                                help="memory a batched forward may use, e.g. 512MiB or 8GB; 'auto': half the free "
                                     "memory of a GPU, 1GiB on a CPU")

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds: {bad or 'empty'} not among {KINDS}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for name, allowed in (("window_style", WINDOW_STYLES), ("corruption", CORRUPTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.recheck < 0:
            raise ValueError(f"recheck must be >= 0, got {self.recheck}")
        parse_bytes(self.memory_budget)

    def layers_for(self, layer: int, num_layers: int) -> tuple[int, ...]:
        """The layers restored together for the cell labelled `layer`."""
        if self.window_style == "radius":
            lo, hi = (layer, layer) if self.window <= 1 else (layer - self.window, layer + self.window)
        else:
            lo = layer - self.window // 2
            hi = lo + self.window - 1
        return tuple(range(max(lo, 0), min(hi, num_layers - 1) + 1))


@dataclass
class Encoded:
    """A sample after the adapter's processor: what the engines run on.

    Positions are indices into the merged sequence (image tokens expanded). `spans` are the half-open token
    spans [start, end) of the question's constraints in order, `constraint` the span from the first one's start
    to the last one's end (the one span of most questions), `corrupted` the indices of the spans the corrupted
    run replaces; `first_traced` is the first position restored (the last image token for a visual sample, 0
    for a text-only one).
    """

    input_ids: torch.Tensor  # (1, T) long
    pixel_values: torch.Tensor | None
    constraint: tuple[int, int]
    image_span: tuple[int, int] | None
    first_traced: int
    tokens: list[str] = field(default_factory=list)
    spans: tuple[tuple[int, int], ...] = ()
    corrupted: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.spans = self.spans or (self.constraint,)
        self.corrupted = self.corrupted or tuple(range(len(self.spans)))
        self.constraint = (self.spans[0][0], self.spans[-1][1])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def diverges(self) -> int:
        """The first position whose input the corruption changes: every state before it is the clean run's."""
        return min(self.spans[i][0] for i in self.corrupted)

    @property
    def corrupted_positions(self) -> list[int]:
        return [p for i in sorted(self.corrupted) for p in range(*self.spans[i])]

    def span_of(self, position: int) -> int | None:
        """Index of the constraint span holding `position`, or None."""
        return next((i for i, (s, e) in enumerate(self.spans) if s <= position < e), None)

    def role(self, position: int) -> str:
        """image | before | constraint | after | last; with several spans, constraint1, constraint2, ... and
        `between` for the text between two spans."""
        if position == self.length - 1:
            return "last"
        if self.image_span is not None and self.image_span[0] <= position < self.image_span[1]:
            return "image"
        span = self.span_of(position)
        if span is not None:
            return "constraint" if len(self.spans) == 1 else f"constraint{span + 1}"
        if position < self.constraint[0]:
            return "before"
        return "after" if position >= self.constraint[1] else "between"

    def aligned_role(self, position: int) -> str:
        """A finer role that lines positions up across prompts of different lengths (the heatmap rows)."""
        role, span = self.role(position), self.span_of(position)
        if span is not None and role != "last":
            start, end = self.spans[span]
            if position == start:
                return f"{role}_first"
            return f"{role}_last" if position == end - 1 else f"{role}_mid"
        if role == "after":
            return "after_first" if position == self.constraint[1] else "after_rest"
        if role == "between":
            return f"between{sum(e <= position for _, e in self.spans)}"
        return role


POSITIONS = ("constraint_last", "last")
METHODS = ("multedit", "ft", "cft")
USES = ("correct", "counterfact", "insert", "csv")


@dataclass(frozen=True)
class EditSpec:
    """How every edit of a run is made (`workers/edit.py`). Defaults: the paper's λ and loss, ROME's bound on δ
    (4‖v0‖) and ROME's KL on prompts to keep, without which an edit at an early layer rewrites every fact of
    the pictured entity (its key there is the same whatever relation is asked; see the README)."""

    position: str = option("constraint_last", choices=POSITIONS, identity=True,
                           help="where the key is read: the constraint's last token (the paper) or the last token "
                                "(ROME)")
    lam: float = option(0.01, identity=True, help="λ of ‖W K − V‖² + λ‖W − W0‖²")
    steps: int = option(25, identity=True, help="Adam steps on δ")
    lr: float = option(0.5, identity=True, help="Adam learning rate on δ")
    clamp: float = option(4.0, identity=True,
                          help="bound ‖δ‖ ≤ clamp·‖v0‖ (ROME: 4; the authors' code: 1e-4, nearly a no-op)")
    decay: float = option(0.001, identity=True, help="weight of (‖δ‖/‖v0‖)² in δ's loss (the paper's penalty)")
    views: int = option(0, identity=True,
                        help="perturbed copies of the image the key is averaged over and δ must serve (ROME "
                             "averages over prefixes); 0 = the edited picture alone, as in the paper")
    keep_weight: float = option(5.0, identity=True,
                                help="weight of the KL keeping each case's `keep` prompts' answers while δ is "
                                     "searched (ROME's essence term; 0 = the paper's loss)")
    null_space: bool = option(False, identity=True,
                              help="AlphaEdit: project the update onto the null space of preserved keys")
    null_lam: float = option(10.0, identity=True,
                             help="λ of a null-space update (AlphaEdit's 10; at the paper's 0.01 the projected update "
                                  "is barely damped and costs held-out accuracy)")
    null_tol: float = option(0.01, identity=True,
                             help="preserved-key covariance eigenvalues below tol × the largest span the null space")
    ft_steps: int = option(25, identity=True, help="Adam steps of the fine-tuning baselines on W")
    ft_lr: float = option(0.001, identity=True, help="Adam learning rate of the fine-tuning baselines")
    cft_bound: float = option(0.001, identity=True, help="constrained fine-tuning: |ΔW| ≤ bound elementwise")

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if min(self.lam, self.keep_weight, self.steps, self.ft_steps, self.views) < 0:
            raise ValueError("lam, keep_weight, steps, ft_steps and views must be >= 0")
        if self.clamp <= 0 or self.null_lam <= 0:
            raise ValueError("clamp and null_lam must be > 0 (a projected update with null_lam 0 can be singular)")


# An attention edge: (source set, target set). image = the image tokens, constraint = its tokens, last = the
# final position, text = every position after the image.
EDGES = {"image->constraint": ("image", "constraint"), "image->last": ("image", "last"),
         "constraint->last": ("constraint", "last"), "image->text": ("image", "text")}


@dataclass(frozen=True)
class AttentionSpec:
    """What `mmtrace attention` measures per sample (`workers/attention.py`)."""

    band: int = option(1, identity=True, help="consecutive layers knocked out together in the edge sweep")
    edges: tuple[str, ...] = option(tuple(EDGES), choices=tuple(EDGES), identity=True,
                                    help="edges knocked out, band by band (those a text-only sample lacks are "
                                         "skipped)")
    ks: tuple[int, ...] = option((1, 2, 4, 8, 12, 16, 64, 256), identity=True,
                                 help="numbers of visual tokens knocked out (top by contribution vs random); those "
                                      "larger than a sample's image are skipped")
    draws: int = option(5, identity=True, help="random draws of k visual tokens per k")
    seed: int = option(0, identity=True, help="seed of the random draws (per sample, k and draw)")
    top_k: int = option(8, identity=True, help="visual tokens marked top in tokens.parquet and outlined in the PNG")
    heads: bool = option(True, identity=True, help="attention.parquet rows per head as well as summed over heads")
    max_batch: int = option(16, identity=False,
                            help="rows per batched knockout pass (each row holds its own copy of the prompt's KV "
                                 "cache)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", tuple(dict.fromkeys(self.edges)))
        object.__setattr__(self, "ks", tuple(sorted({int(k) for k in self.ks})))
        bad = [e for e in self.edges if e not in EDGES]
        if bad:
            raise ValueError(f"edges: {bad} not among {tuple(EDGES)}")
        if min((self.band, self.top_k, self.max_batch, *self.ks), default=1) < 1 or self.draws < 0:
            raise ValueError("band, top_k, max_batch and every k must be >= 1, draws >= 0")
