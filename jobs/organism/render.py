"""The organism's pictures: procedural renderings of an entity's look, and the image files of a world on disk.

A rendering is a pure function of (world seed, entity, rendering index), so the trainer can draw its
pictures in memory while the samples point at files: `write_images` saves only the renderings a question
uses (held-out ones of known entities, a few of each unseen entity), none of which training ever draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .world import PALETTE, SHAPES, TEXTURES, Look, World

IMAGE_SIZE = 32
UNSEEN_RENDERINGS = (0, 1, 1000)  # the renderings of each unseen entity (no rendering of it is ever trained)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the shape is, in coordinates centred on it and divided by its size (so it spans about -1..1)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.8) & (av <= 0.8)
    if shape == "triangle":
        return (v <= 0.8) & (v >= -0.9 + 1.7 * au)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.35)
    if shape == "hbar":
        return (au <= 1.0) & (av <= 0.4)
    if shape == "vbar":
        return (av <= 1.0) & (au <= 0.4)
    raise ValueError(shape)


def _texture(texture: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A multiplicative brightness pattern in image coordinates (so shift moves it with the shape)."""
    if texture == "solid":
        return np.ones_like(x)
    if texture == "hstripes":
        return np.where((y // 2) % 2 == 0, 1.0, 0.45)
    if texture == "vstripes":
        return np.where((x // 2) % 2 == 0, 1.0, 0.45)
    if texture == "checker":
        return np.where(((x // 3) + (y // 3)) % 2 == 0, 1.0, 0.45)
    raise ValueError(texture)


def render(look: Look, seed: int, entity: int, rendering: int) -> np.ndarray:
    """One rendering (H, W, 3) uint8 of an entity: its look plus this rendering's shift, scale, jitter, noise.

    Deterministic in (seed, entity, rendering): training draws renderings 0..N-1, held-out ones use indices
    that training never draws, so held-out renderings are genuinely new pictures of known entities.
    """
    rng = np.random.default_rng([seed, 7919, entity, rendering])
    size = IMAGE_SIZE
    dx, dy = rng.integers(-3, 4, size=2)
    scale = rng.uniform(0.75, 1.1) * size * 0.36
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + dx, size / 2 + dy
    u, v = (xs - cx) / scale, (ys - cy) / scale
    bg = PALETTE[look.background] + rng.normal(0, 12, 3)
    fg = PALETTE[look.colour] + rng.normal(0, 12, 3)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    mask = _shape_mask(SHAPES[look.shape], u, v)
    tex = _texture(TEXTURES[look.texture], xs - dx, ys - dy)
    img[mask] = (fg[None, :] * tex[mask][:, None])
    # the 2x2 glyph: four 3px cells in one corner, white where the bit is set, black otherwise
    gx0 = 1 + (look.corner % 2) * (size - 8) + int(rng.integers(-1, 2))
    gy0 = 1 + (look.corner // 2) * (size - 8) + int(rng.integers(-1, 2))
    for bit in range(4):
        on = (look.glyph >> bit) & 1
        x0, y0 = gx0 + (bit % 2) * 3, gy0 + (bit // 2) * 3
        img[y0:y0 + 3, x0:x0 + 3] = 250.0 if on else 5.0
    img += rng.normal(0, 10, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- files

def heldout_image(root: str | Path, entity: int, rendering: int) -> Path:
    return Path(root) / "images" / "heldout" / f"{entity}_{rendering}.png"


def unseen_image(root: str | Path, entity: int, rendering: int) -> Path:
    return Path(root) / "images" / "unseen" / f"{entity}_{rendering}.png"


def write_images(root: str | Path, world: World) -> None:
    """Render the held-out renderings of known entities and the renderings of unseen ones as PNGs."""
    from PIL import Image

    for e in world.entities:
        todo = [(heldout_image(root, e.index, r), r) for r in world.heldout_renderings] if e.known else \
            [(unseen_image(root, e.index, r), r) for r in UNSEEN_RENDERINGS]
        for p, r in todo:
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(e.look, world.seed, e.index, r)).save(p)
