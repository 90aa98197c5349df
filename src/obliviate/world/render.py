"""Deterministic, vectorised renderer of the embedded world: one shape, one colour, one texture
per 32x32 RGB image, on a plain dark background with a little noise.

Everything is numpy over a whole batch, so rendering costs milliseconds and never limits
training. Images are supersampled 2x and averaged down, which anti-aliases the edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ontology import DEFAULT_ONTOLOGY, Ontology

IMAGE_SIZE = 32
_SUPERSAMPLE = 2
_DARK_TONE = 0.3  # brightness of the pattern's dark parts relative to the colour

COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "pink": (1.00, 0.45, 0.75),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.25, 0.95),
    "purple": (0.60, 0.15, 0.85),
}


@dataclass(frozen=True)
class SceneBatch:
    """Labels and nuisance parameters of a batch of scenes; ``render`` turns it into pixels."""

    shape: np.ndarray  # (B,) int class index within the shape domain
    colour: np.ndarray  # (B,)
    texture: np.ndarray  # (B,)
    center: np.ndarray  # (B, 2) pixels
    radius: np.ndarray  # (B,) pixels
    rotation: np.ndarray  # (B,) radians
    pattern_angle: np.ndarray  # (B,) radians, orientation of stripes and gradients
    pattern_phase: np.ndarray  # (B,) pixels
    background: np.ndarray  # (B,) grey level
    colour_jitter: np.ndarray  # (B, 3)
    noise_seed: np.ndarray  # (B,) per-image seeds for the background noise

    def __len__(self) -> int:
        return len(self.shape)

    @property
    def labels(self) -> np.ndarray:
        """(B, 3) class indices for (shape, colour, texture)."""
        return np.stack([self.shape, self.colour, self.texture], axis=1)

    def captions(self, ontology: Ontology = DEFAULT_ONTOLOGY) -> list[str]:
        """What each scene shows, as "striped red triangle"."""
        return [" ".join(ontology.names(d)[i] for d, i in (("texture", t), ("colour", c), ("shape", s)))
                for s, c, t in self.labels]


def sample_scenes(
    n: int,
    seed: int,
    shape: np.ndarray | None = None,
    colour: np.ndarray | None = None,
    texture: np.ndarray | None = None,
    ontology: Ontology = DEFAULT_ONTOLOGY,
) -> SceneBatch:
    """Draw ``n`` scenes from ``seed``. Labels left as ``None`` are drawn uniformly."""
    rng = np.random.default_rng(seed)
    counts = [len(ontology.in_domain(d)) for d in ("shape", "colour", "texture")]
    labels = []
    for given, count in zip((shape, colour, texture), counts):
        drawn = rng.integers(0, count, size=n)
        labels.append(drawn if given is None else np.broadcast_to(np.asarray(given, dtype=np.int64), (n,)).copy())
    radius = rng.uniform(8.5, 13.0, size=n)
    margin = radius * 0.9
    center = np.stack([rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin)], axis=1)
    return SceneBatch(
        shape=labels[0],
        colour=labels[1],
        texture=labels[2],
        center=center,
        radius=radius,
        rotation=rng.uniform(0, 2 * np.pi, size=n),
        pattern_angle=rng.uniform(0, np.pi, size=n),
        pattern_phase=rng.uniform(0, 6, size=n),
        background=rng.uniform(0.0, 0.15, size=n),
        colour_jitter=rng.uniform(-0.05, 0.05, size=(n, 3)),
        noise_seed=rng.integers(0, 2**31, size=n),
    )


def _regular_polygon(u, v, sides, offset=0.0):
    angles = offset + 2 * np.pi * np.arange(sides) / sides
    support = np.max(u[..., None] * np.cos(angles) + v[..., None] * np.sin(angles), axis=-1)
    return support <= np.cos(np.pi / sides)


def _star(u, v):
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    sector = np.mod(phi, 2 * np.pi / 5) / (2 * np.pi / 5)  # 0 at a point, 0.5 between points
    edge = 1.0 - (1.0 - 0.42) * (1.0 - np.abs(1.0 - 2.0 * sector))
    return rho <= edge


def _heart(u, v):
    x, y = 1.25 * u, -1.25 * v + 0.25
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


# Masks in shape-local coordinates, where the unit circle is the shape's extent.
_SHAPE_MASKS = {
    "triangle": lambda u, v: _regular_polygon(u, v, 3, np.pi / 2),
    "square": lambda u, v: _regular_polygon(u, v, 4),
    "pentagon": lambda u, v: _regular_polygon(u, v, 5, np.pi / 2),
    "circle": lambda u, v: u**2 + v**2 <= 0.85,
    "ellipse": lambda u, v: u**2 + (v / 0.55) ** 2 <= 1,
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.5**2),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95)),
    "heart": _heart,
}


def _texture_tone(name, x, y, angle, phase):
    """Brightness factor in [_DARK_TONE, 1] of each pixel for a texture, in image pixels."""
    along = x * np.cos(angle) + y * np.sin(angle) + phase
    if name == "solid":
        return np.ones_like(x)
    if name == "gradient":
        # ramp across the image in a random direction: bright to dark over ~24 px
        t = np.clip((along - along.mean(axis=(-2, -1), keepdims=True)) / 24.0 + 0.5, 0, 1)
        return 1.0 - (1.0 - _DARK_TONE) * t
    if name == "striped":
        dark = np.mod(along, 6.0) < 3.0
    elif name == "dotted":
        gx, gy = np.mod(x + phase, 5.0) - 2.5, np.mod(y + phase, 5.0) - 2.5
        dark = gx**2 + gy**2 <= 1.3**2
    elif name == "checkered":
        dark = (np.floor((x + phase) / 4.0) + np.floor((y + phase) / 4.0)) % 2 == 0
    else:
        raise ValueError(f"No renderer for texture {name!r}")
    return np.where(dark, _DARK_TONE, 1.0)


def render(scenes: SceneBatch, ontology: Ontology = DEFAULT_ONTOLOGY) -> np.ndarray:
    """Render scenes to float32 images in [0, 1], shape (B, 3, 32, 32)."""
    n, size = len(scenes), IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(size) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    x, y = np.broadcast_to(x, (n, size, size)), np.broadcast_to(y, (n, size, size))
    dx = (x - scenes.center[:, 0, None, None]) / scenes.radius[:, None, None]
    dy = (y - scenes.center[:, 1, None, None]) / scenes.radius[:, None, None]
    cos, sin = np.cos(scenes.rotation)[:, None, None], np.sin(scenes.rotation)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy

    mask = np.zeros((n, size, size), dtype=bool)
    for index, name in enumerate(ontology.names("shape")):
        rows = scenes.shape == index
        if rows.any():
            mask[rows] = _SHAPE_MASKS[name](u[rows], v[rows])

    tone = np.ones((n, size, size))
    angle, phase = scenes.pattern_angle[:, None, None], scenes.pattern_phase[:, None, None]
    for index, name in enumerate(ontology.names("texture")):
        rows = scenes.texture == index
        if rows.any():
            tone[rows] = _texture_tone(name, x[rows], y[rows], angle[rows], phase[rows])

    palette = np.array([COLOUR_RGB[name] for name in ontology.names("colour")])
    rgb = np.clip(palette[scenes.colour] + scenes.colour_jitter, 0, 1)  # (B, 3)
    foreground = rgb[:, :, None, None] * tone[:, None]
    image = np.where(mask[:, None], foreground, scenes.background[:, None, None, None])
    image = image.reshape(n, 3, IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(3, 5))
    noise = np.stack([np.random.default_rng(s).normal(0, 0.02, size=(1, IMAGE_SIZE, IMAGE_SIZE)) for s in scenes.noise_seed])
    return np.clip(image + noise, 0, 1).astype(np.float32)
