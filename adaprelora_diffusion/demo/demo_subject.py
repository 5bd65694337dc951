"""The demo DreamBooth subject: one toy robot ("bolt"), drawn in any pose and scene.

DreamBooth needs a handful of photos of ONE subject. Real photos would add licensing questions and
size, so the subject is drawn procedurally with PIL: a boxy robot toy with a fixed colour scheme
(orange body, teal head, yellow visor eyes, red antenna ball, grey limbs) that varies only in
pose, size, placement and background, the way real subject photos do.

`SCENES` are the five shipped views (demo/assets/demo_subject, written by
``python -m adaprelora_diffusion.demo.demo_subject [--out DIR]``); `random_scene(index, seed)` draws further
views of the same subject for held-out evaluation (the T3 benchmark). Both are deterministic.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4  # draw large, then downscale, for anti-aliased edges

# Fixed colour scheme: this is what makes the subject recognizable across images.
ORANGE = (236, 112, 28)
ORANGE_DARK = (176, 74, 14)
TEAL = (22, 160, 160)
TEAL_DARK = (12, 104, 108)
YELLOW = (255, 221, 64)
RED = (214, 36, 48)
GREY = (120, 124, 132)
GREY_DARK = (70, 72, 80)
INK = (30, 30, 36)

# One entry per image: where the robot stands, how big, how it leans, and its arm/leg angles
# (degrees from hanging straight down; negative swings toward the image's left).
SCENES = [
    dict(name="bolt_01_front", bg=("gradient", (196, 224, 255), (240, 248, 255)), floor=(150, 190, 110),
         cx=0.50, base=0.88, scale=1.00, tilt=0, arms=(-20, 20), legs=(0, 0), head_turn=0),
    dict(name="bolt_02_wave", bg=("gradient", (255, 236, 200), (255, 250, 235)), floor=(200, 170, 130),
         cx=0.42, base=0.90, scale=0.90, tilt=-6, arms=(-150, 25), legs=(-8, 8), head_turn=-1),
    dict(name="bolt_03_walk", bg=("checker", (214, 236, 218), (186, 218, 196)), floor=None,
         cx=0.58, base=0.92, scale=0.80, tilt=8, arms=(-40, 10), legs=(-18, 18), head_turn=1),
    dict(name="bolt_04_small_far", bg=("gradient", (120, 170, 220), (200, 230, 250)), floor=(90, 150, 90),
         cx=0.35, base=0.80, scale=0.55, tilt=0, arms=(-60, 60), legs=(0, 0), head_turn=1),
    dict(name="bolt_05_closeup", bg=("stripes", (250, 214, 220), (255, 236, 240)), floor=None,
         cx=0.52, base=1.18, scale=1.45, tilt=-4, arms=(-10, 160), legs=(0, 0), head_turn=0),
]


def _background(draw: ImageDraw.ImageDraw, size: int, spec, floor) -> None:
    kind, c1, c2 = spec
    if kind == "gradient":
        for y in range(size):
            t = y / (size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(c1, c2)))
    elif kind == "checker":
        step = size // 8
        for i in range(8):
            for j in range(8):
                draw.rectangle([i * step, j * step, (i + 1) * step, (j + 1) * step], fill=c1 if (i + j) % 2 else c2)
    elif kind == "stripes":
        step = size // 10
        for i in range(-10, 20):
            x = i * step
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + size, size), (x + size, size)],
                         fill=c1 if i % 2 else c2)
    if floor is not None:
        draw.rectangle([0, int(size * 0.78), size, size], fill=floor)


def _rotated_limb(cx, cy, length, width, angle_deg):
    """Polygon of a limb hanging from (cx, cy), rotated by angle_deg (0 = straight down)."""
    a = math.radians(angle_deg)
    dx, dy = math.sin(a), math.cos(a)  # direction along the limb
    px, py = dy, -dx  # perpendicular
    hw = width / 2
    end = (cx + dx * length, cy + dy * length)
    return [(cx + px * hw, cy + py * hw), (cx - px * hw, cy - py * hw),
            (end[0] - px * hw, end[1] - py * hw), (end[0] + px * hw, end[1] + py * hw)], end


def _robot(size: int, scene: dict) -> Image.Image:
    """Draw the robot on a transparent layer (rotated as a whole by the scene's tilt)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    u = size / 128 * scene["scale"]  # one "robot unit" in pixels
    cx = size * scene["cx"]
    feet_y = size * scene["base"]
    o = max(1, round(1.5 * u))  # outline width

    # legs
    leg_top = feet_y - 26 * u
    for side, ang in zip((-1, 1), scene["legs"]):
        poly, end = _rotated_limb(cx + side * 8 * u, leg_top, 22 * u, 7 * u, ang)
        d.polygon(poly, fill=GREY, outline=GREY_DARK, width=o)
        d.rounded_rectangle([end[0] - 7 * u, end[1] - 3 * u, end[0] + 7 * u, end[1] + 4 * u], radius=2 * u,
                            fill=GREY_DARK)
    # body
    body = [cx - 20 * u, leg_top - 34 * u, cx + 20 * u, leg_top + 2 * u]
    d.rounded_rectangle(body, radius=5 * u, fill=ORANGE, outline=ORANGE_DARK, width=o)
    # chest panel: three lights in fixed colours
    d.rounded_rectangle([cx - 11 * u, body[1] + 8 * u, cx + 11 * u, body[1] + 20 * u], radius=2 * u,
                        fill=ORANGE_DARK)
    for k, col in enumerate((RED, YELLOW, TEAL)):
        x = cx - 6 * u + k * 6 * u
        d.ellipse([x - 2 * u, body[1] + 12 * u, x + 2 * u, body[1] + 16 * u], fill=col)
    # arms
    shoulder_y = body[1] + 6 * u
    for side, ang in zip((-1, 1), scene["arms"]):
        poly, end = _rotated_limb(cx + side * 22 * u, shoulder_y, 24 * u, 6 * u, ang)
        d.polygon(poly, fill=GREY, outline=GREY_DARK, width=o)
        d.ellipse([end[0] - 4 * u, end[1] - 4 * u, end[0] + 4 * u, end[1] + 4 * u], fill=TEAL_DARK)
    # head
    hx = cx + scene["head_turn"] * 3 * u
    head = [hx - 16 * u, body[1] - 28 * u, hx + 16 * u, body[1] - 2 * u]
    d.rectangle([cx - 4 * u, body[1] - 3 * u, cx + 4 * u, body[1] + 1 * u], fill=GREY_DARK)  # neck
    d.rounded_rectangle(head, radius=6 * u, fill=TEAL, outline=TEAL_DARK, width=o)
    visor = [hx - 12 * u, head[1] + 7 * u, hx + 12 * u, head[1] + 16 * u]
    d.rounded_rectangle(visor, radius=3 * u, fill=INK)
    for side in (-1, 1):
        ex = hx + side * 6 * u + scene["head_turn"] * 2 * u
        d.ellipse([ex - 3 * u, head[1] + 9 * u, ex + 3 * u, head[1] + 14 * u], fill=YELLOW)
    # antenna
    d.line([(hx, head[1]), (hx, head[1] - 9 * u)], fill=GREY_DARK, width=max(1, round(2 * u)))
    d.ellipse([hx - 4 * u, head[1] - 15 * u, hx + 4 * u, head[1] - 7 * u], fill=RED)

    if scene["tilt"]:
        layer = layer.rotate(scene["tilt"], resample=Image.BICUBIC, center=(cx, feet_y))
    return layer


def render(scene: dict, size: int = SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGBA", (big, big), (255, 255, 255, 255))
    _background(ImageDraw.Draw(canvas), big, scene["bg"], scene["floor"])
    canvas.alpha_composite(_robot(big, scene))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


_FLOORS = ((150, 190, 110), (200, 170, 130), (90, 150, 90), (170, 170, 160))


def random_scene(index: int, seed: int = 0) -> dict:
    """A new view of the same robot: pose, placement, size, tilt and background drawn from
    ``random.Random`` keyed by ``(seed, index)`` (stable across runs and platforms), within the
    ranges the five shipped views span, so held-out views are plausible photos of the subject."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = random.Random(f"adaprelora-demo-subject:{seed}:{index}")

    def pastel():
        return tuple(rng.randint(150, 255) for _ in range(3))

    kind = rng.choice(("gradient", "checker", "stripes"))
    scale = rng.uniform(0.55, 1.3)
    return dict(
        name=f"bolt_random_{seed}_{index}", bg=(kind, pastel(), pastel()),
        # Floors in earthy tones like the shipped views: never near the robot's orange or teal.
        floor=tuple(c + rng.randint(-15, 15) for c in rng.choice(_FLOORS)) if rng.random() < 0.5 else None,
        cx=rng.uniform(0.35, 0.65), base=rng.uniform(0.8, 0.92) + 0.2 * max(0.0, scale - 1.0), scale=scale,
        tilt=rng.uniform(-8, 8), arms=(rng.uniform(-160, -5), rng.uniform(5, 160)),
        legs=(rng.uniform(-18, 0), rng.uniform(0, 18)), head_turn=rng.choice((-1, 0, 1)),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assets" / "demo_subject")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for scene in SCENES:
        path = args.out / f"{scene['name']}.png"
        render(scene).save(path, optimize=True)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
