"""DreamBooth data: instance (subject) images with prompts, optional class images for prior preservation.

Users hand over folders of photos straight from phones and the web, so loading is forgiving
where it is safe (EXIF rotation, odd colour modes, stray non-image files) and loud where silence
would hurt the result (unreadable files, images smaller than the training resolution).

Augmentation is reproducible: the random crop and flip of item ``i`` in epoch ``e`` come from a
generator seeded by ``(seed, e, i)``, and :class:`EpochShuffleSampler` derives each epoch's order
from ``(seed, e)``. A resumed run that sets the same epoch therefore sees the same batches and the
same augmentations, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CAPTION_EXTENSION = ".txt"
_RNG_STREAM_INSTANCE = 0
_RNG_STREAM_CLASS = 1
_RNG_STREAM_ORDER = 2


class DataWarning(UserWarning):
    """Something in the training images deserves the user's attention but is not fatal."""


# --------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white.

    Plain ``image.convert("RGB")`` would turn transparent pixels black (their hidden colour) and
    clip 16-bit grayscale to white, so those cases are handled explicitly.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # Palette images may carry transparency in the palette; go through RGBA so it is honoured.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # Pillow's I;16 -> L conversion clips at 255 instead of rescaling; rescale 16-bit to 8-bit.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, F: Pillow's own conversions are correct for these.
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as upright 8-bit RGB (EXIF orientation applied)."""
    with Image.open(path) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
    return to_rgb(upright)


def _probe(path: Path) -> tuple[int, int]:
    """Fully decode ``path`` once (catches truncated files) and return its upright (w, h)."""
    with Image.open(path) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
        return upright.size


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # upright (width, height)
    caption: str | None  # from ``<stem>.txt`` beside the image, if present


def scan_image_folder(folder: str | os.PathLike, role: str = "instance") -> list[ImageRecord]:
    """List the readable images in ``folder`` (not recursive), sorted by file name.

    Hidden files and caption ``.txt`` files are ignored. Every other file is opened with PIL
    (whatever its extension); those that fail are skipped and named in one warning.
    ``role`` only words the error messages ("instance" / "class").
    """
    if folder is None or str(folder) == "":
        raise ValueError(f"No {role} image folder given: pass the path of the folder holding the {role} images.")
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(
            f"The {role} image folder {folder} does not exist (looked for {folder.absolute()}): check the path."
        )
    if not folder.is_dir():
        raise ValueError(f"The {role} image path {folder} is a file, not a folder: pass the folder that contains the {role} images.")
    candidates = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != CAPTION_EXTENSION
    )
    if not candidates:
        raise ValueError(
            f"The {role} image folder {folder} contains no image files: put the {role} images "
            f"(.jpg, .png, .webp, ...) directly in it (sub-folders are not searched)."
        )

    records, skipped = [], []
    for path in candidates:
        try:
            size = _probe(path)
        except Image.DecompressionBombError as exc:  # a header claiming more pixels than Pillow allows
            skipped.append(f"{path.name} (too many pixels, a possible decompression bomb: {exc})")
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            skipped.append(f"{path.name} ({type(exc).__name__}: {exc})")
            continue
        caption_file = path.with_suffix(CAPTION_EXTENSION)
        caption = None
        if caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as exc:
                raise ValueError(f"Caption file {caption_file} is not UTF-8 text ({exc}): re-save it as UTF-8.") from exc
        records.append(ImageRecord(path=path, size=size, caption=caption))

    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} file(s) in {folder} that are not readable images: " + "; ".join(skipped),
            DataWarning,
            stacklevel=2,
        )
    if not records:
        raise ValueError(
            f"None of the {len(candidates)} file(s) in the {role} image folder {folder} is a readable image "
            f"(see the warning above): add valid image files (.jpg, .png, .webp, ...)."
        )
    return records


# --------------------------------------------------------------------------------------------
# Transforms (PIL + torch; torchvision is deliberately not used)
# --------------------------------------------------------------------------------------------


def check_resolution(resolution: int) -> int:
    """Return ``resolution`` if it is a positive int divisible by 8 (the VAE's downsampling factor)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ValueError(f"resolution must be a positive multiple of 8 given as an int (e.g. 512); got {resolution!r}.")
    if resolution <= 0 or resolution % 8:
        lower = max(8, (resolution // 8) * 8)
        raise ValueError(
            f"resolution must be a positive multiple of 8 (the VAE downsamples images by 8); got {resolution}. "
            f"Use e.g. {lower} or {lower + 8}."
        )
    return resolution


def augment_generator(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    """A torch.Generator for one (seed, epoch, index, stream); independent of call order."""
    # SeedSequence mixes the tuple into a well-spread 64-bit seed (a plain sum would collide).
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 CHW tensor in [-1, 1] (what the SD VAE expects)."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def transform_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, maybe flip; return a [-1, 1] tensor."""
    return transform_image_with_crop(image, resolution, center_crop, random_flip, generator)[0]


def transform_image_with_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`transform_image`, plus the crop's top-left corner ``(top, left)`` in the resized image as
    the model sees it (mirrored when flipped): SDXL's crop micro-conditioning."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=resample)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = new_w - resolution - left  # the same crop, seen in the mirrored image
    return image_to_tensor(image), (int(top), int(left))


# --------------------------------------------------------------------------------------------
# Dataset, sampler, collate
# --------------------------------------------------------------------------------------------


def _resolve_seed(seed: int | torch.Generator | None) -> int:
    if isinstance(seed, torch.Generator):
        return int(seed.initial_seed())
    if seed is None:
        # Drawn from torch's global RNG so torch.manual_seed(...) upstream still makes runs repeatable.
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a torch.Generator; got {seed!r}.")
    return seed


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (+ optional class images) as ``[-1, 1]`` CHW tensors with their prompts.

    Each item is a dict with ``instance_pixel_values``, ``instance_prompt``, ``instance_path`` and,
    when a class folder is given, ``class_pixel_values``, ``class_prompt``, ``class_path``.
    Item ``i`` pairs instance image ``i % n_instance`` with class image ``i % n_class``; the length is
    ``max(n_instance * repeats, n_class)`` so every class image is seen once per epoch.
    """

    def __init__(
        self,
        instance_data_root: str | os.PathLike,
        instance_prompt: str | None,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        repeats: int = 1,
        class_data_root: str | os.PathLike | None = None,
        class_prompt: str | None = None,
        max_class_images: int | None = None,
        seed: int | torch.Generator | None = 0,
        interpolation: str = "bicubic",
    ):
        self.resolution = check_resolution(resolution)
        self.resample = Image.Resampling[interpolation.upper()]
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1 (times each instance image is used per epoch); got {repeats!r}.")
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.repeats = repeats
        self.seed = _resolve_seed(seed)
        self.epoch = 0
        self._decoded: dict[Path, Image.Image] = {}  # see _image

        self.instance_images = scan_image_folder(instance_data_root, role="instance")
        self.instance_prompt = (instance_prompt or "").strip() or None
        if self.instance_prompt is None:
            uncaptioned = [r.path.name for r in self.instance_images if not r.caption]
            if uncaptioned:
                raise ValueError(
                    f"No instance prompt given and {len(uncaptioned)} instance image(s) have no caption file: "
                    f"{', '.join(uncaptioned)}. Pass an instance prompt (e.g. 'a photo of sks dog') or add a "
                    f"'<name>{CAPTION_EXTENSION}' caption beside each image."
                )
        empty = [r.path.with_suffix(CAPTION_EXTENSION).name for r in self.instance_images
                 if r.caption is not None and not r.caption]
        if empty:
            warnings.warn(f"Empty caption file(s), using the instance prompt instead: {', '.join(empty)}", DataWarning, stacklevel=2)

        self.class_images: list[ImageRecord] = []
        self.class_prompt = None
        if class_data_root is not None:
            self.class_prompt = (class_prompt or "").strip() or None
            if self.class_prompt is None:
                raise ValueError(
                    "A class image folder was given without a class prompt: pass a class prompt "
                    "(e.g. 'a photo of a dog') for prior preservation, or drop the class folder."
                )
            self.class_images = scan_image_folder(class_data_root, role="class")
            if max_class_images is not None:
                if max_class_images < 1:
                    raise ValueError(f"max_class_images must be >= 1 or None; got {max_class_images!r}.")
                self.class_images = self.class_images[:max_class_images]
        elif class_prompt:
            raise ValueError(
                "A class prompt was given without a class image folder: pass the folder of class images "
                "for prior preservation (generate them first), or drop the class prompt."
            )

        small = [f"{r.path.name} ({r.size[0]}x{r.size[1]})" for r in self.instance_images + self.class_images
                 if min(r.size) < self.resolution]
        if small:
            warnings.warn(
                f"{len(small)} image(s) are smaller than the training resolution {self.resolution} and will be "
                f"upscaled (blurry training targets): {', '.join(small)}. Use larger images or a lower resolution.",
                DataWarning,
                stacklevel=2,
            )

        self.num_instance_images = len(self.instance_images)
        self._length = max(self.num_instance_images * self.repeats, len(self.class_images))

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_images)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def instance_prompt_for(self, record: ImageRecord) -> str:
        return record.caption or self.instance_prompt

    def _image(self, record: ImageRecord) -> Image.Image:
        """The record's image, decoded once and kept at the size training crops from.

        A large photo is decoded at its first use only and then held with its short side at the
        resolution (what `transform_image` would resize it to anyway, so the pixels are the same),
        not re-decoded at every step.
        """
        image = self._decoded.get(record.path)
        if image is None:
            image = load_image(record.path)
            w, h = image.size
            scale = self.resolution / min(w, h)
            size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
            if size != (w, h):
                image = image.resize(size, resample=self.resample)
            self._decoded[record.path] = image
        return image

    def _example(self, record: ImageRecord, index: int, stream: int) -> torch.Tensor:
        gen = augment_generator(self.seed, self.epoch, index, stream)
        return transform_image_with_crop(self._image(record), self.resolution, self.center_crop, self.random_flip, gen,
                                         self.resample)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a dataset of {self._length} items")
        record = self.instance_images[index % self.num_instance_images]
        pixels, crop = self._example(record, index, _RNG_STREAM_INSTANCE)
        example = {
            "instance_pixel_values": pixels,
            "instance_prompt": self.instance_prompt_for(record),
            "instance_path": str(record.path),
            # SDXL's micro-conditioning: the image's real size (height, width) and where it was cropped
            "instance_original_size": (record.size[1], record.size[0]),
            "instance_crop_top_left": crop,
        }
        if self.class_images:
            crecord = self.class_images[index % len(self.class_images)]
            pixels, crop = self._example(crecord, index, _RNG_STREAM_CLASS)
            example.update(class_pixel_values=pixels, class_prompt=self.class_prompt, class_path=str(crecord.path),
                           class_original_size=(crecord.size[1], crecord.size[0]), class_crop_top_left=crop)
        return example


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices whose order depends only on (seed, epoch), for exact resumption.

    ``set_epoch`` also forwards the epoch to the dataset (if it has ``set_epoch``), so calling it on
    the sampler (as ``accelerate``'s prepared DataLoader does each epoch) keeps order and
    augmentation in step. With ``persistent_workers=True`` the workers keep a stale dataset copy;
    leave that option off.

    ``pad_to_multiple`` (the global batch: per-device batch x processes) repeats the start of the
    epoch's permutation so its length is a multiple of it: every step then has a full global
    batch, and N data-parallel processes see exactly the samples one process would (otherwise
    the ragged last batch is filled differently by accelerate's even-batches padding).
    """

    def __init__(self, data_source: Sequence, seed: int | torch.Generator | None = 0, shuffle: bool = True,
                 pad_to_multiple: int = 1):
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1; got {pad_to_multiple!r}.")
        self.data_source = data_source
        self.seed = _resolve_seed(seed)
        self.shuffle = shuffle
        self.pad_to_multiple = pad_to_multiple
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.data_source, "set_epoch"):
            self.data_source.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.data_source)
        return -(-n // self.pad_to_multiple) * self.pad_to_multiple

    def __iter__(self):
        n = len(self.data_source)
        if self.shuffle:
            gen = augment_generator(self.seed, self.epoch, 0, _RNG_STREAM_ORDER)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        pad = len(self) - n
        return iter(order + (order * (pad // n + 1))[:pad])


def collate_fn(examples: list[dict], tokenizer=None) -> dict:
    """Batch examples; with prior preservation, class examples follow the instance ones.

    Returns ``pixel_values`` (B, 3, H, W), ``prompts`` (list of str), ``num_instance`` (how many
    leading rows are instance rows: the loss is split there), and ``input_ids`` when a tokenizer
    is given (padded to its ``model_max_length``).
    """
    if not examples:
        raise ValueError("collate_fn got an empty batch.")
    has_class = ["class_pixel_values" in ex for ex in examples]
    if any(has_class) and not all(has_class):
        raise ValueError("collate_fn got a batch mixing examples with and without class images.")
    roles = ["instance", "class"] if all(has_class) else ["instance"]
    pixels = [ex[f"{role}_pixel_values"] for role in roles for ex in examples]
    batch = {
        "pixel_values": torch.stack(pixels).contiguous(memory_format=torch.contiguous_format).float(),
        "prompts": [ex[f"{role}_prompt"] for role in roles for ex in examples],
        "num_instance": len(examples),
        "original_sizes": [ex[f"{role}_original_size"] for role in roles for ex in examples],
        "crop_top_lefts": [ex[f"{role}_crop_top_left"] for role in roles for ex in examples],
    }
    if tokenizer is not None:
        batch["input_ids"] = tokenizer(
            batch["prompts"],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
    return batch
