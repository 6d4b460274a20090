"""Measuring the organism through the public path only: `from_pretrained`, the saved processor, plain forwards.

Nothing here uses the trainer's packed forward, so the numbers are what the trace engine will see.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmtrace.workers.spec import Sample, build_prompt

from .dataset import organism_samples
from .world import World


def load_organism(root: str | Path):
    """(model, processor) exactly as a real checkpoint loads: LlavaForConditionalGeneration + AutoProcessor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(root)
    model = LlavaForConditionalGeneration.from_pretrained(root)
    model.eval()
    return model, processor


def corrupted_question(sample: Sample) -> str:
    """The question with its constraint replaced by the sample's corruption (what the engine does by token)."""
    return sample.question.replace(sample.constraint, sample.corrupt_constraint, 1)


@torch.no_grad()
def next_token_probs(model, processor, questions: list[str], images: list[str | None],
                     batch_size: int = 64) -> torch.Tensor:
    """Next-token distributions (N, V) after "ASSISTANT:" for each (question, image-or-None) prompt."""
    from mmtrace.workers.adapters import open_image, to_rgb

    out = []
    for i in range(0, len(questions), batch_size):
        qs, ims = questions[i:i + batch_size], images[i:i + batch_size]
        visual = [im is not None for im in ims]
        if any(visual) and not all(visual):
            raise ValueError("a batch mixes visual and text-only prompts")
        prompts = [build_prompt(q, visual=v) for q, v in zip(qs, visual)]
        if all(visual):
            pics = [to_rgb(open_image(p)) for p in ims]
            enc = processor(images=pics, text=prompts, padding=True, return_tensors="pt")
        else:
            enc = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        out.append(torch.softmax(logits[torch.arange(len(qs)), last].float(), -1))
    return torch.cat(out)


def accuracy(model, processor, samples: list[Sample]) -> float:
    """Greedy first-token accuracy: argmax next token == the gold answer's (single) token."""
    probs = next_token_probs(model, processor, [s.question for s in samples], [s.image for s in samples])
    gold = torch.tensor(processor.tokenizer.convert_tokens_to_ids([s.answer for s in samples]))
    return float((probs.argmax(-1) == gold).float().mean())


@dataclass(frozen=True)
class CorruptionEffect:
    """Means over samples, with the target = the clean run's argmax token (as the trace engine defines it)."""

    n: int
    p_clean: float
    p_corrupt: float
    gap: float  # mean(p_clean - p_corrupt)
    moved: float  # fraction whose corrupted argmax equals the corrupting entity's answer


def corruption_effect(model, processor, samples: list[Sample]) -> CorruptionEffect:
    images = [s.image for s in samples]
    clean = next_token_probs(model, processor, [s.question for s in samples], images)
    corrupt = next_token_probs(model, processor, [corrupted_question(s) for s in samples], images)
    target = clean.argmax(-1)
    idx = torch.arange(len(samples))
    pc, pk = clean[idx, target], corrupt[idx, target]
    want = torch.tensor(processor.tokenizer.convert_tokens_to_ids([dict(s.meta)["corrupt_answer"] for s in samples]))
    return CorruptionEffect(len(samples), float(pc.mean()), float(pk.mean()), float((pc - pk).mean()),
                            float((corrupt.argmax(-1) == want).float().mean()))


@dataclass(frozen=True)
class OrganismScores:
    visual: float  # held-out renderings, trained paraphrases
    text: float  # text-only twins
    named: float  # named-over-image: the name wins over the picture
    paraphrase_visual: float  # held-out paraphrases (with held-out renderings)
    paraphrase_text: float
    corruption_visual: CorruptionEffect
    corruption_text: CorruptionEffect
    composed: float | None = None  # two-constraint questions (version 2), held-out renderings
    composed_text: float | None = None

    @property
    def paraphrase(self) -> float:
        return (self.paraphrase_visual + self.paraphrase_text) / 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paraphrase"] = self.paraphrase
        return d


def evaluate_organism(root: str | Path, limit: int | None = None, corruption_n: int = 200) -> OrganismScores:
    """All acceptance numbers for an organism folder (one sample per held-out (entity, relation))."""
    model, processor = load_organism(root)

    def acc(kind: str, split: str) -> float:
        return accuracy(model, processor, organism_samples(kind, split, limit=limit, root=root))

    def corruption(kind: str) -> CorruptionEffect:
        return corruption_effect(model, processor, organism_samples(kind, limit=corruption_n, root=root))

    composed = bool(World.load(Path(root) / "world.json").companies)
    return OrganismScores(
        visual=acc("visual", "heldout"), text=acc("text", "heldout"), named=acc("named", "heldout"),
        paraphrase_visual=acc("visual", "paraphrase"), paraphrase_text=acc("text", "paraphrase"),
        corruption_visual=corruption("visual"), corruption_text=corruption("text"),
        composed=acc("composed", "heldout") if composed else None,
        composed_text=acc("composed-text", "heldout") if composed else None,
    )
