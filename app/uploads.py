"""Checking a set of uploaded photos before training, and storing them in the job's folder.

Every file is decoded with PIL, whatever its name says: only JPEG, PNG and WebP that decode
completely are accepted. Pillow's decompression-bomb guard is an error here, not a warning: an
upload has no business claiming a hundred million pixels. The report lists what to fix
(blocking: unreadable files, wrong formats, oversized uploads, no usable image; advice:
duplicates, images smaller than the training resolution, fewer than 3 images).

Stored files get names the app makes (``003_my_dog.jpg``); the client's file name is only a key
for its caption, so no name a client sends becomes a path.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from adaprelora_diffusion.engine.atomic import atomic_write_text

from .errors import AppError

__all__ = ["UploadLimits", "ImageCheck", "SetReport", "inspect_image", "check_image_set", "store_images",
           "ALLOWED_FORMATS", "RECOMMENDED_MIN_IMAGES"]

ALLOWED_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
RECOMMENDED_MIN_IMAGES = 3
_SAFE_STEM = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class UploadLimits:
    max_file_mb: float = 25.0
    max_total_mb: float = 300.0
    max_files: int = 100

    def describe(self) -> str:
        return f"{self.max_files} files, {self.max_file_mb:g} MB each, {self.max_total_mb:g} MB in all"


@dataclass
class ImageCheck:
    name: str  # the client's file name (a caption key, never a path)
    path: Path  # where Gradio put the upload
    problem: str | None = None
    format: str | None = None
    size: tuple[int, int] | None = None  # upright (w, h)
    digest: str | None = None  # of the decoded pixels: same picture, same digest


@dataclass
class SetReport:
    images: list[ImageCheck] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # must be fixed before training
    warnings: list[str] = field(default_factory=list)  # worth fixing

    @property
    def usable(self) -> list[ImageCheck]:
        return [i for i in self.images if i.problem is None]

    def as_markdown(self, leave_out_refused: bool = False) -> str:
        """The report as the page shows it; ``leave_out_refused``: photos that cannot be used are left out
        of the job (named), not a reason to refuse it."""
        if not self.images:
            return "Add 3-30 photos of the subject (jpg, png or webp)."
        refused = {i.problem for i in self.images if i.problem} if leave_out_refused else set()
        lines = [f"**{len(self.usable)} of {len(self.images)} file(s) usable.**"]
        lines += [f"- **Left out:** {e}" for e in self.errors if e in refused]
        lines += [f"- **Fix:** {e}" for e in self.errors if e not in refused] + [f"- **Check:** {w}" for w in self.warnings]
        if not self.errors and not self.warnings:
            lines.append("- The set looks good.")
        return "\n".join(lines)


def inspect_image(name: str, path: Path, max_bytes: int) -> ImageCheck:
    """Decode ``path`` completely; the result names the problem, if any, in plain words."""
    check = ImageCheck(name=name, path=path)
    try:
        size = path.stat().st_size
    except OSError as err:
        check.problem = f"{name}: cannot be read ({err.strerror})."
        return check
    if size > max_bytes:
        check.problem = f"{name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:g} MB limit per file; resize or re-save it."
        return check
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check.format = im.format
                if im.format not in ALLOWED_FORMATS:
                    check.problem = f"{name}: is a {im.format} image; upload jpg, png or webp."
                    return check
                im.load()
                upright = ImageOps.exif_transpose(im).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        check.problem = f"{name}: claims too many pixels (a possible decompression bomb: {err}); upload a normal photo."
        return check
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        check.problem = f"{name}: is not a readable image ({type(err).__name__}); upload jpg, png or webp photos."
        return check
    check.size = upright.size
    check.digest = hashlib.sha256(upright.tobytes()).hexdigest()
    return check


def check_image_set(files: Sequence[tuple[str, Path]], resolution: int, limits: UploadLimits) -> SetReport:
    """Inspect every file and the set as a whole (see the module docstring for what is checked)."""
    report = SetReport()
    if len(files) > limits.max_files:
        report.errors.append(f"{len(files)} files is more than {limits.max_files}: pick the best ones (3-30 is plenty).")
        return report
    total = sum(p.stat().st_size for _, p in files if p.is_file())
    if total > limits.max_total_mb * 1e6:
        report.errors.append(f"The files add up to {total / 1e6:.0f} MB, over the {limits.max_total_mb:g} MB limit: "
                             "upload fewer or smaller files.")
        return report
    names = [n for n, _ in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        report.errors.append(f"Two uploads are named {', '.join(repeated[:5])}: rename one (captions are keyed by file name).")
    report.images = [inspect_image(name, path, int(limits.max_file_mb * 1e6)) for name, path in files]
    report.errors += [i.problem for i in report.images if i.problem]
    usable = report.usable
    if not usable and files:
        report.errors.append("None of the files is a usable photo.")
    seen: dict[str, str] = {}
    for image in usable:
        if image.digest in seen:
            report.warnings.append(f"{image.name} is the same picture as {seen[image.digest]}: remove one.")
        else:
            seen[image.digest] = image.name
    small = [f"{i.name} ({i.size[0]}x{i.size[1]})" for i in usable if min(i.size) < resolution]
    if small:
        report.warnings.append(f"Smaller than the training resolution {resolution} px (they will be blurry): "
                               f"{', '.join(small[:8])}{' ...' if len(small) > 8 else ''}.")
    if 0 < len(usable) < RECOMMENDED_MIN_IMAGES:
        report.warnings.append(f"Only {len(usable)} usable photo(s): 3-30 varied photos of the subject train much better.")
    return report


def _stored_name(index: int, check: ImageCheck) -> str:
    stem = _SAFE_STEM.sub("_", Path(check.name).stem).strip("_")[:40] or "image"
    return f"{index:03d}_{stem}{ALLOWED_FORMATS[check.format]}"


def store_images(report: SetReport, dest: Path, captions: dict[str, str], default_caption: str) -> list[dict]:
    """Copy the usable images into ``dest`` under app-made names, with a caption file where the
    caption differs from the instance prompt; returns what was stored (for job.json)."""
    names = {i.name for i in report.images}
    stray = sorted(k for k in captions if k not in names)
    if stray:
        raise AppError(f"settings['captions'] names file(s) that were not uploaded: {', '.join(repr(s[:80]) for s in stray[:5])}. "
                       "Use the uploaded files' names as keys.")
    dest.mkdir(parents=True, exist_ok=True)
    stored = []
    for index, check in enumerate(report.usable, start=1):
        target = dest / _stored_name(index, check)
        shutil.copyfile(check.path, target)
        caption = captions.get(check.name, "").strip()
        if caption and caption != default_caption:
            atomic_write_text(target.with_suffix(".txt"), caption)
        stored.append({"name": check.name, "file": target.name, "caption": caption or default_caption,
                       "size": list(check.size)})
    return stored
