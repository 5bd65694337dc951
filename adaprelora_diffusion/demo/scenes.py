"""Procedurally drawn captioned scenes: a free, offline, deterministic text-to-image data set.

A tiny diffusion model pretrained on these learns something checkable (colours, shapes and where
they are), which random weights cannot show. Every image is a pure function of ``(index, seed)``,
so two machines draw the same data set and a test can assert what a caption promises: the pixel
at a shape's centre has the named colour, the corners have the background colour.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

#: Named colours (RGB). Far apart from each other so a sample's colour is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
#: Background colours: a subset, so every background leaves several shape colours that contrast.
BACKGROUNDS: tuple[str, ...] = ("white", "black", "blue", "gray")
_BACKGROUND_RGB = {**COLORS, "gray": (128, 128, 128)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Position word -> (phrase in the caption, centre as fractions of width and height).
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.25, 0.5)),
    "right": ("on the right", (0.75, 0.5)),
    "top": ("at the top", (0.5, 0.25)),
    "bottom": ("at the bottom", (0.5, 0.75)),
    "center": ("in the center", (0.5, 0.5)),
}
#: Size word -> half-extent of the shape as a fraction of the image side. Two shapes are only
#: placed at opposite positions (0.5 apart), so even two large ones never overlap.
SIZES: dict[str, float] = {"small": 0.13, "large": 0.21}
_OPPOSITE_PAIRS = (("left", "right"), ("top", "bottom"))
#: Probability that a scene holds two shapes instead of one.
TWO_SHAPE_PROBABILITY = 0.3


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.kind} {POSITIONS[self.position][0]}"

    def center(self, resolution: int) -> tuple[float, float]:
        fx, fy = POSITIONS[self.position][1]
        return fx * resolution, fy * resolution


@dataclass(frozen=True)
class SceneSpec:
    """What a scene shows; the caption and the picture are both derived from it."""

    shapes: tuple[Shape, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(s.phrase() for s in self.shapes) + f" on a {self.background} background"


def _rng(index: int, seed: int) -> random.Random:
    if not isinstance(index, int) or not isinstance(seed, int) or index < 0:
        raise ValueError(f"index must be a non-negative int and seed an int, got index={index!r}, seed={seed!r}")
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(f"adaprelora-scenes:{seed}:{index}")


def scene_spec(index: int, seed: int = 0) -> SceneSpec:
    """The attributes of scene ``index`` of the data set ``seed`` (no drawing)."""
    rng = _rng(index, seed)
    background = rng.choice(BACKGROUNDS)
    colors = [c for c in COLORS if c != background]
    if rng.random() < TWO_SHAPE_PROBABILITY:
        positions = list(rng.choice(_OPPOSITE_PAIRS))
        rng.shuffle(positions)
        picked = rng.sample(colors, 2)  # two different colours, so the caption tells them apart
    else:
        positions = [rng.choice(list(POSITIONS))]
        picked = [rng.choice(colors)]
    shapes = tuple(
        Shape(kind=rng.choice(SHAPES), color=color, position=pos, size=rng.choice(list(SIZES)))
        for color, pos in zip(picked, positions)
    )
    return SceneSpec(shapes=shapes, background=background)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    # Equilateral triangle pointing up, centred on its centroid.
    return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]


def render(spec: SceneSpec, resolution: int = 64) -> Image.Image:
    """Draw ``spec`` as an RGB image of side ``resolution`` (no anti-aliasing: colours stay exact)."""
    if not isinstance(resolution, int) or resolution < 16:
        raise ValueError(f"resolution must be an int >= 16, got {resolution!r}")
    image = Image.new("RGB", (resolution, resolution), _BACKGROUND_RGB[spec.background])
    draw = ImageDraw.Draw(image)
    for shape in spec.shapes:
        if shape.kind not in SHAPES or shape.color not in COLORS:
            raise ValueError(f"unknown shape or colour in {shape}")
        cx, cy = shape.center(resolution)
        r = SIZES[shape.size] * resolution
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)
    return image


def scene(index: int, seed: int = 0, resolution: int = 64) -> tuple[Image.Image, str]:
    """Scene ``index`` of data set ``seed``: ``(image, caption)``, identical on every call."""
    spec = scene_spec(index, seed)
    return render(spec, resolution), spec.caption()


def class_prompt(shape: str) -> str:
    """The generic prompt of a shape class (``"a circle"``), for prior-preservation images."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return f"a {shape}"


def caption_words() -> list[str]:
    """Every word a caption can contain (for a word-level tokenizer vocabulary)."""
    words = {"a", "and", "on", "the", "at", "in", "background"}
    words.update(COLORS, BACKGROUNDS, SHAPES, SIZES)
    for phrase, _ in POSITIONS.values():
        words.update(phrase.split())
    return sorted(words)


#: Every colour a judged region can be read as (shape colours plus the extra background).
PALETTE: dict[str, tuple[int, int, int]] = dict(_BACKGROUND_RGB)


def nearest_color(rgb) -> str:
    """Name of the :data:`PALETTE` colour nearest (Euclidean in RGB) to ``rgb``."""
    r, g, b = (float(v) for v in rgb)
    return min(PALETTE, key=lambda n: (PALETTE[n][0] - r) ** 2 + (PALETTE[n][1] - g) ** 2 + (PALETTE[n][2] - b) ** 2)


def _mean_rgb(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    import numpy as np

    mean = np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return float(mean[0]), float(mean[1]), float(mean[2])


PRESENT_FRACTION = 0.02
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def judge(image: Image.Image, spec: SceneSpec) -> dict:
    """Does ``image`` show what ``spec``'s caption says? A coarse, model-free check.

    For each shape, the mean colour of a box inside where even a small shape would be drawn
    must be nearest to the named colour (``color_ok``), and for a single off-centre shape the
    opposite box must *not* be (``position_ok``: a model that ignored the position word and
    painted the colour everywhere, or at the wrong side, fails). The mean of the four corner
    patches must be nearest to the named background (``background_ok``). Chance level for a
    colour is about 1/7. ``color_present`` ignores position: at least ``PRESENT_FRACTION`` of
    the pixels are nearest to the shape's colour (a small circle covers about 5%).
    """
    import numpy as np

    image = image.convert("RGB")
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    palette = np.array(list(PALETTE.values()), dtype=np.float64)
    nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    names = list(PALETTE)
    share = {name: float((nearest == k).mean()) for k, name in enumerate(names)}
    res = image.size[0]
    half = max(1, int(SIZES["small"] * res * 0.6))

    def box_at(position: str) -> tuple[int, int, int, int]:
        fx, fy = POSITIONS[position][1]
        cx, cy = int(fx * res), int(fy * res)
        return (cx - half, cy - half, cx + half, cy + half)

    color_ok, position_ok = [], []
    for shape in spec.shapes:
        color_ok.append(nearest_color(_mean_rgb(image, box_at(shape.position))) == shape.color)
        if len(spec.shapes) == 1 and shape.position in _OPPOSITE:
            position_ok.append(nearest_color(_mean_rgb(image, box_at(_OPPOSITE[shape.position]))) != shape.color)
    c = max(1, res // 8)
    corners = [(0, 0, c, c), (res - c, 0, res, c), (0, res - c, c, res), (res - c, res - c, res, res)]
    means = [_mean_rgb(image, b) for b in corners]
    corner_mean = tuple(sum(m[i] for m in means) / 4 for i in range(3))
    return {
        "color_present": [share[shape.color] >= PRESENT_FRACTION for shape in spec.shapes],
        "color_ok": color_ok,
        "position_ok": position_ok,
        "background_ok": nearest_color(corner_mean) == spec.background,
    }
