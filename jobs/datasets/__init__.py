"""Datasets by name: one spec string (`--dataset`) turns into the list of Samples a run traces.

Specs:
  vqa-constraints:DIR                         the three VQA-Constraints CSVs in DIR
  vqa-constraints:DIR:okvqa,multimodal_known  only those subsets
  vqa-constraints  /  vqa-constraints::okvqa  DIR defaults to where `mmtrace data download` puts the files
  organism  /  organism:text  /  organism:named   the model organism's world (visual, text-only, named-over-image)
  organism:composed  /  organism:composed-text    its two-constraint questions (version 2)
  organism-v1:text, ...                       a given organism's world; plain `organism` follows the model

A DIR containing ':' must end with '/' (`vqa-constraints:/a:b/`) so its last part is not read as subsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from mmtrace.workers.spec import Sample

from .vqa_constraints import (
    EXPECTED_ROWS,
    SUBSETS,
    DatasetError,
    default_data_dir,
    load_vqa_constraints,
    summarise,
)

__all__ = [
    "DATASET_KINDS", "EXPECTED_ROWS", "ORGANISM_KINDS", "SUBSETS", "DatasetError",
    "default_data_dir", "load_vqa_constraints", "parse_image_dirs", "parse_spec", "resolve_dataset", "span_variants",
    "summarise",
]

DATASET_KINDS = ("vqa-constraints", "organism")
# `organism[:variant]` -> the `kind` passed to jobs.organism.organism_samples.
ORGANISM_KINDS = {"": "visual", "text": "text", "named": "named", "composed": "composed",
                  "composed-text": "composed-text"}

SPEC_HELP = ("vqa-constraints[:DIR[:SUBSET,...]] or organism[-v1|-v2][:text|:named|:composed|:composed-text]; "
             "subsets: " + ", ".join(SUBSETS))


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """(`"vqa-constraints"`, {root, subsets}) or (`"organism"`, {kind}); DatasetError says what is accepted."""
    name, _, rest = spec.strip().partition(":")
    if name == "vqa-constraints":
        return name, _parse_vqa_rest(rest)
    if name.startswith("organism"):
        if rest not in ORGANISM_KINDS:
            raise DatasetError(f"dataset {spec!r}: unknown organism variant {rest!r}; use "
                               + ", ".join(f"organism:{k}" if k else "organism" for k in ORGANISM_KINDS))
        try:
            version = None if name == "organism" else _organism_version(name)
        except ValueError as e:
            raise DatasetError(f"dataset {spec!r}: {e}") from None
        if version is None and name != "organism":
            raise DatasetError(f"dataset {spec!r}: unknown dataset {name!r}; use {SPEC_HELP}")
        return "organism", {"kind": ORGANISM_KINDS[rest], "version": version}
    raise DatasetError(f"dataset {spec!r}: unknown dataset {name!r}; use {SPEC_HELP}")


def _parse_vqa_rest(rest: str) -> dict[str, object]:
    """DIR[:SUBSETS]: the part after the last ':' is a subset list unless it holds a path separator."""
    root, subsets = rest, SUBSETS
    head, sep, tail = rest.rpartition(":")
    if sep and "/" not in tail and "\\" not in tail:
        root, subsets = head, (_parse_subsets(tail) if tail.strip() else SUBSETS)
    return {"root": Path(root).expanduser() if root else default_data_dir(), "subsets": subsets}


def _parse_subsets(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SUBSETS]
    if unknown or not names:
        raise DatasetError(f"unknown VQA-Constraints subset(s) {unknown or [text]}; valid: {', '.join(SUBSETS)}")
    return names


def parse_image_dirs(text: str | None) -> dict[str, str]:
    """`okvqa=/data/coco,multimodal_known=/data/known` -> {subset: folder} (the CLI's --images).

    Folders holding ',' cannot be written this way; pass such a mapping from a config file instead.
    """
    dirs: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        subset, eq, folder = item.partition("=")
        subset, folder = subset.strip(), folder.strip()
        if not eq or not folder:
            raise DatasetError(f"--images item {item.strip()!r}: expected SUBSET=DIR, e.g. okvqa=/data/coco")
        if subset not in SUBSETS:
            raise DatasetError(f"--images item {item.strip()!r}: unknown subset {subset!r}; "
                               f"valid: {', '.join(SUBSETS)}")
        if subset in dirs:
            raise DatasetError(f"--images names {subset!r} twice; give one folder per subset")
        dirs[subset] = folder
    return dirs


def resolve_dataset(
    spec: str,
    *,
    images: Mapping[str, str | Path] | None = None,
    missing_images: str = "error",
    limit: int | None = None,
    organism: int | None = None,
) -> list[Sample]:
    """The Samples named by `spec` (see the module docstring); `images`/`missing_images` apply to VQA only.
    `organism` is the version a plain `organism` spec means (the model's, when the model is an organism)."""
    name, args = parse_spec(spec)
    if name == "organism":
        if images:
            raise DatasetError("--images applies to vqa-constraints only; the organism renders its own images")
        try:
            return list(_organism_samples()(kind=args["kind"], limit=limit, version=args["version"] or organism))
        except ValueError as e:
            raise DatasetError(f"dataset {spec!r}: {e}") from None
    return load_vqa_constraints(args["root"], subsets=args["subsets"], images=images,
                                missing_images=missing_images, limit=limit)


def _organism_version(name: str) -> int | None:
    from mmtrace.jobs.organism.install import organism_version

    return organism_version(name)


def _organism_samples():
    """`mmtrace.jobs.organism.organism_samples`, imported only when asked for (it pulls in the world and
    renderer)."""
    import importlib

    return importlib.import_module("mmtrace.jobs.organism").organism_samples


def span_variants(samples: Iterable[Sample]) -> list[Sample]:
    """Each question with several constraints traced twice over: with every constraint corrupted at once
    (the sample as given), then with each alone (`<id>/span<k>`, k from 1), right after it; others unchanged."""
    out = []
    for s in samples:
        out.append(s)
        if len(s.spans) > 1 and not s.corrupt_spans and not s.error:
            out += [replace(s, sample_id=f"{s.sample_id}/span{k + 1}", corrupt_spans=(k,)) for k in range(len(s.spans))]
    return out
