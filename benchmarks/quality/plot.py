"""Loss-curve PNGs drawn with PIL (matplotlib is not a dependency of this project)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_curves"]

_COLORS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 0, 255),
]


def plot_curves(path: str | Path, title: str, ylabel: str, curves: dict[str, tuple[list[int], list[float]]],
                log_y: bool = True, size: tuple[int, int] = (900, 560)) -> Path:
    """One line per label (x = step, y = metric; log scale when all finite values are > 0).

    Non-finite points (diverged runs) are left out; labels with no finite point are listed
    in the legend as "(diverged)".
    """
    W, H = size
    left, right, top, bottom = 80, 250, 50, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = [(s, v) for xs, ys in curves.values() for s, v in zip(xs, ys) if math.isfinite(v)]
    if log_y and any(v <= 0 for _, v in pts):
        floor = min((v for _, v in pts if v > 0), default=1e-12)
        pts = [(s, max(v, floor)) for s, v in pts]
    else:
        floor = None
    fy = (lambda v: math.log10(max(v, floor) if floor else v)) if log_y else (lambda v: v)
    x_lo, x_hi = (min(s for s, _ in pts), max(s for s, _ in pts)) if pts else (0, 1)
    y_lo, y_hi = (min(fy(v) for _, v in pts), max(fy(v) for _, v in pts)) if pts else (0.0, 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def to_px(s, v):
        x = left + (s - x_lo) / (x_hi - x_lo) * (W - left - right)
        y = H - bottom - (fy(v) - y_lo) / (y_hi - y_lo) * (H - top - bottom)
        return x, y

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((W - right - 60, H - 20), "step", fill="black", font=font)
    draw.text((5, 28), ylabel + (" (log)" if log_y else ""), fill="black", font=font)
    for i in range(5):
        t = y_lo + (y_hi - y_lo) * i / 4
        y = H - bottom - i / 4 * (H - top - bottom)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((5, y - 6), f"{10 ** t:.3g}" if log_y else f"{t:.3g}", fill="black", font=font)
        s = x_lo + (x_hi - x_lo) * i / 4
        x = left + i / 4 * (W - left - right)
        draw.line([x, H - bottom, x, H - bottom + 4], fill="black")
        draw.text((x - 10, H - bottom + 8), f"{s:.0f}", fill="black", font=font)
    for k, (label, (xs, ys)) in enumerate(curves.items()):
        color = _COLORS[k % len(_COLORS)]
        line = [to_px(s, v) for s, v in zip(xs, ys) if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        ly = top + 16 * k
        draw.line([W - right + 10, ly + 6, W - right + 30, ly + 6], fill=color, width=3)
        draw.text((W - right + 36, ly), label + ("" if line else " (diverged)"), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
