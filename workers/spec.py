"""The few types that cross rooms: a sample to trace and the spec of a trace.

They live here, beside the engine that consumes them, so that `jobs/` (which makes samples from datasets)
and `cluster/` (which ships them) depend on `workers/` and never the other way round. Both are frozen,
picklable dataclasses: a Ray actor or a Slurm job receives them unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

KINDS = ("mlp", "attn", "hidden")
TOKEN_ROLES = ("image", "before", "constraint", "after", "last")
ALIGNED_ROLES = (
    "image", "before", "constraint_first", "constraint_mid", "constraint_last", "after_first", "after_rest", "last",
)
DEFAULT_TEMPLATE = "<image>\nUSER: {question} Answer in a few words.\nASSISTANT:"
TEXT_TEMPLATE = "USER: {question} Answer in a few words.\nASSISTANT:"


def format_question(question: str) -> str:
    """The authors' prompt adds "?" after every question; we add it only where none is there already."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def build_prompt(question: str, visual: bool, template: str | None = None) -> str:
    """The prompt for one question; `{question}` in the template receives the "?"-terminated question."""
    template = template or (DEFAULT_TEMPLATE if visual else TEXT_TEMPLATE)
    return template.format(question=format_question(question))
# A uniform grey stand-in for a missing image (`--missing-images blank`); rows that use it are marked.
BLANK_IMAGE = "mmtrace:blank"


@dataclass(frozen=True)
class Sample:
    """One question to trace.

    `image` is a file path, `BLANK_IMAGE`, or None for a text-only question (an LLM, or an MLLM's
    text-only twin). `corrupt_constraint`, when set, replaces the constraint in the corrupted run instead of
    the spec's replacement word (the organism's world gives each question a different entity's name of the
    same token length). `error` marks a row that cannot be traced: the run records it and goes on.
    """

    sample_id: str
    subset: str
    question: str
    constraint: str
    image: str | None = None
    answer: str | None = None
    corrupt_constraint: str | None = None
    error: str | None = None
    meta: tuple[tuple[str, str], ...] = ()

    @property
    def is_visual(self) -> bool:
        return self.image is not None

    @property
    def placeholder_image(self) -> bool:
        return self.image == BLANK_IMAGE

    def with_error(self, error: str) -> "Sample":
        return Sample(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "error": error})


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

    kinds: tuple[str, ...] = KINDS
    window: int = 1
    window_style: str = "radius"
    corruption: str = "replace"
    replacement: str = "Paris"
    noise_scale: float = 3.0
    seed: int = 0
    max_batch: int = 64

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds: {bad or 'empty'} not among {KINDS}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.window_style not in ("radius", "width"):
            raise ValueError(f"window_style must be 'radius' or 'width', got {self.window_style!r}")
        if self.corruption not in ("replace", "noise"):
            raise ValueError(f"corruption must be 'replace' or 'noise', got {self.corruption!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    def layers_for(self, layer: int, num_layers: int) -> tuple[int, ...]:
        """The layers restored together for the cell labelled `layer`."""
        if self.window_style == "radius":
            lo, hi = (layer, layer) if self.window <= 1 else (layer - self.window, layer + self.window)
        else:
            lo = layer - self.window // 2
            hi = lo + self.window - 1
        return tuple(range(max(lo, 0), min(hi, num_layers - 1) + 1))

    def digest(self) -> str:
        """Content hash: the part of a run's identity that the trace semantics contribute."""
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "max_batch"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Encoded:
    """A sample after the adapter's processor: what the engines run on.

    Positions are indices into the merged sequence (image tokens expanded). `constraint` is the half-open
    token span [start, end) of the constraint; `first_traced` is the first position restored (the last image
    token for a visual sample, 0 for a text-only one).
    """

    input_ids: "object"  # torch.LongTensor (1, T)
    pixel_values: "object | None"
    constraint: tuple[int, int]
    image_span: tuple[int, int] | None
    first_traced: int
    tokens: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def role(self, position: int) -> str:
        start, end = self.constraint
        if position == self.length - 1:
            return "last"
        if self.image_span is not None and self.image_span[0] <= position < self.image_span[1]:
            return "image"
        if position < start:
            return "before"
        if position < end:
            return "constraint"
        return "after"

    def aligned_role(self, position: int) -> str:
        """A finer role that lines positions up across prompts of different lengths (the heatmap rows)."""
        role = self.role(position)
        start, end = self.constraint
        if role == "constraint":
            if position == start:
                return "constraint_first"
            return "constraint_last" if position == end - 1 else "constraint_mid"
        if role == "after":
            return "after_first" if position == end else "after_rest"
        return role
