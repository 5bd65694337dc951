"""A tiny Stable Diffusion pipeline *pretrained* on procedural scenes, so it really draws.

The random tiny pipeline (:mod:`tiny_pipeline`) only proves the code runs; its images are noise,
so personalization quality cannot be judged on it. This module trains the same component classes
(CLIP tokenizer + CLIPTextModel, AutoencoderKL, UNet2DConditionModel) on the captioned shapes of
:mod:`scenes` on the CPU in minutes: first the VAE (reconstruction + a small KL term), then the
UNet with the DDPM epsilon loss on the frozen VAE's latents (the text encoder optionally jointly).
The result is saved as an ordinary diffusers folder, loadable with
``StableDiffusionPipeline.from_pretrained``. Same seed, same weights (one CPU thread). A copy
ships in ``demo/assets/tiny-sd-scenes`` (package data) as the trainer's default model (:func:`default_pretrained_pipeline`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.atomic import staged_dir
from ..engine.quiet_imports import quiet_image_processor_fallback
from . import scenes
from .descriptor import ensure_descriptor, write_descriptor
from .tiny_pipeline import SD1_SCHEDULER_CONFIG, build_tiny_models, default_cache_dir, write_tokenizer_files

logger = logging.getLogger(__name__)

#: Bump whenever the architecture, data or training recipe below change (stale caches rebuild).
PRETRAINED_VERSION = "1"
PRETRAINED_SUBDIR = "tiny-sd-scenes"
#: The pipeline shipped with the repository: the trainer's default model when it is current.
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / PRETRAINED_SUBDIR
MARKER = ".adaprelora_pretrained_complete"
REPORT_NAME = "pretraining_report.json"
#: Captions are at most ~25 word tokens with the scene tokenizer; 32 keeps attention cheap.
MAX_TEXT_LENGTH = 32
TEXT_HIDDEN_SIZE = 32
DEFAULT_VAE_STEPS = 1200
DEFAULT_UNET_STEPS = 3000


@dataclass
class PretrainReport:
    """What a pretraining run did: loss curves (one mean per ``log_every`` steps) and timings."""

    seed: int
    vae_steps: int
    unet_steps: int
    train_text_encoder: bool
    vae_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)
    vae_seconds: float = 0.0
    unet_seconds: float = 0.0
    total_seconds: float = 0.0
    scaling_factor: float = 1.0
    weight_bytes: int = 0
    #: Every setting the weights depend on (see :func:`recipe`), so a shipped copy can be checked.
    recipe: dict = field(default_factory=dict)


#: Arguments of :func:`pretrain_tiny_pipeline` that do not change the weights.
_NOT_RECIPE = ("output_dir", "log_every", "overwrite", "progress")


def recipe(**overrides) -> dict:
    """The settings a pretraining run with ``overrides`` uses: version, architecture constants and
    :func:`pretrain_tiny_pipeline`'s arguments (its defaults unless overridden)."""
    unknown = set(overrides) - set(_RECIPE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pretraining settings: {sorted(unknown)}")
    settings = {**_RECIPE_DEFAULTS, **overrides}
    return {"version": PRETRAINED_VERSION, "text_hidden_size": TEXT_HIDDEN_SIZE, "max_text_length": MAX_TEXT_LENGTH,
            **settings}


def scene_tokenizer_merges(words: list[str] | None = None) -> list[str]:
    """BPE merges that make every caption word a single token.

    Byte-level CLIP BPE without merges spends one token per character; whole-word tokens keep
    captions short (cheap attention) and make each word one embedding to learn. Merges are added
    word by word, each joining what the earlier merges leave of that word, left to right: lower
    ranks win in BPE, so a later word's merges never change how an earlier word tokenizes.
    """
    words = scenes.caption_words() if words is None else words
    ranks: dict[tuple[str, str], int] = {}
    merges: list[str] = []
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(f"{pair[0]} {pair[1]}")
            parts = _bpe(word, ranks)
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one word as CLIP's BPE does (``</w>`` on its last symbol)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        known = [p for p in pairs if p[0] is not None]
        if not known:
            break
        _, i = min(known)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _build_models(seed: int, tokenizer_dir: Path):
    """The untrained components; same seed, same initial weights.

    One VAE norm group: with 8 groups on 8 channels GroupNorm is per-channel instance norm,
    which erases each channel's image mean (the background colour; 400-step MSE 0.13 -> 0.06).
    The UNet gets 8 groups (4+ channels each) for the same reason.
    """
    from transformers import CLIPTokenizer

    write_tokenizer_files(tokenizer_dir, merges=scene_tokenizer_merges())
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=MAX_TEXT_LENGTH)
    text_encoder, vae, unet = build_tiny_models(tokenizer, seed, vae_norm_groups=1, unet_norm_groups=8,
                                                max_text_length=MAX_TEXT_LENGTH)
    return tokenizer, text_encoder, vae, unet


def _scheduler_config() -> dict:
    return dict(SD1_SCHEDULER_CONFIG)  # as the random tiny pipeline, so the trainer's defaults fit


def scene_batch(indices, seed: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes ``indices`` as a (B, 3, H, W) tensor in [-1, 1] plus their captions."""
    images, captions = [], []
    for i in indices:
        image, caption = scenes.scene(int(i), seed, resolution)
        images.append(np.asarray(image, dtype=np.float32))
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels.contiguous(), captions


def _train_vae(vae, *, steps, batch_size, lr, kl_weight, seed, resolution, log_every, report, progress):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, steps // 10), steps)
    generator = torch.Generator().manual_seed(seed)
    running = []
    for step in range(steps):
        # Fresh scenes every step (drawing is cheap): the VAE never sees a scene twice.
        pixels, _ = scene_batch(range(step * batch_size, (step + 1) * batch_size), seed, resolution)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, pixels) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if len(running) == log_every or step == steps - 1:
            report.vae_losses.append(float(np.mean(running)))
            running = []
            if progress is not None:
                progress("vae", step + 1, steps, report.vae_losses[-1])
    vae.eval()


@torch.no_grad()
def _encode_pool(vae, *, num_scenes, seed, resolution, offset):
    latents, captions = [], []
    for start in range(0, num_scenes, 64):
        pixels, caps = scene_batch(range(offset + start, offset + min(start + 64, num_scenes)), seed, resolution)
        latents.append(vae.encode(pixels).latent_dist.mean)
        captions.extend(caps)
    return torch.cat(latents), captions


def _train_unet(unet, text_encoder, tokenizer, latents, captions, *, steps, batch_size, lr, seed,
                train_text_encoder, caption_dropout, log_every, report, progress):
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    # As the trainer does: a DDPM scheduler from the pipeline's (DDIM) scheduler config.
    noise_scheduler = DDPMScheduler.from_config(DDIMScheduler(**_scheduler_config()).config)
    # Captions are tokenized once; dropped ones (for classifier-free guidance) become "".
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TEXT_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_TEXT_LENGTH, return_tensors="pt").input_ids
    params = list(unet.parameters())
    text_encoder.requires_grad_(train_text_encoder)
    if train_text_encoder:
        params += list(text_encoder.parameters())
        text_encoder.train()
    else:
        text_encoder.eval()
        with torch.no_grad():  # frozen: encode every caption once
            cached = torch.cat([text_encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
            cached_empty = text_encoder(empty_ids)[0]
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(latents), generator=generator)
    cursor = 0
    running = []
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(latents), generator=generator), 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        drop = torch.rand(len(batch), generator=generator) < caption_dropout
        if train_text_encoder:
            batch_ids = torch.where(drop[:, None], empty_ids, ids[batch])
            hidden = text_encoder(batch_ids)[0]
        else:
            hidden = torch.where(drop[:, None, None], cached_empty, cached[batch])
        x0 = latents[batch]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, hidden).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if len(running) == log_every or step == steps - 1:
            report.unet_losses.append(float(np.mean(running)))
            running = []
            if progress is not None:
                progress("unet", step + 1, steps, report.unet_losses[-1])
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)


def pretrain_tiny_pipeline(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vae_steps: int = DEFAULT_VAE_STEPS,
    unet_steps: int = DEFAULT_UNET_STEPS,
    vae_batch_size: int = 16,
    unet_batch_size: int = 32,
    vae_lr: float = 2e-3,
    unet_lr: float = 1e-3,
    kl_weight: float = 1e-6,
    num_latent_scenes: int = 6000,
    train_text_encoder: bool = True,
    caption_dropout: float = 0.1,
    resolution: int = 64,
    log_every: int = 50,
    overwrite: bool = False,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> PretrainReport:
    """Pretrain the tiny pipeline on scenes of data set ``seed`` and save it to ``output_dir``.

    The folder is written in a temporary sibling and renamed into place, so it is either absent
    or complete. An existing ``output_dir`` is an error unless ``overwrite``.
    ``progress(stage, step, steps, loss)`` is called every ``log_every`` steps.
    """
    quiet_image_processor_fallback()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("vae_batch_size", vae_batch_size), ("unet_batch_size", unet_batch_size),
                        ("num_latent_scenes", num_latent_scenes), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_latent_scenes < unet_batch_size:
        raise ValueError(f"num_latent_scenes ({num_latent_scenes}) must be >= unet_batch_size ({unet_batch_size})")
    if resolution % 8 or resolution < 16:
        raise ValueError(f"resolution must be a multiple of 8 and >= 16 (the VAE downsamples 8x), got {resolution}")
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    target = Path(output_dir).expanduser()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")

    report = PretrainReport(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, train_text_encoder=train_text_encoder,
                            recipe=recipe(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps,
                                          vae_batch_size=vae_batch_size, unet_batch_size=unet_batch_size, vae_lr=vae_lr,
                                          unet_lr=unet_lr, kl_weight=kl_weight, num_latent_scenes=num_latent_scenes,
                                          train_text_encoder=train_text_encoder, caption_dropout=caption_dropout,
                                          resolution=resolution))
    started = time.perf_counter()
    with staged_dir(target, accept_existing=is_complete_pretrained_pipeline) as staging:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout-free models, but keep any library RNG use seeded
            tokenizer, text_encoder, vae, unet = _build_models(seed, staging / "tokenizer")
            _train_vae(vae, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, kl_weight=kl_weight, seed=seed,
                       resolution=resolution, log_every=log_every, report=report, progress=progress)
            report.vae_seconds = time.perf_counter() - started
            latents, captions = _encode_pool(vae, num_scenes=num_latent_scenes, seed=seed, resolution=resolution,
                                             offset=0)
            # SD's convention: latents times scaling_factor have unit variance for the UNet.
            report.scaling_factor = float(1.0 / latents.std())
            vae.register_to_config(scaling_factor=report.scaling_factor)
            latents = latents * report.scaling_factor
            unet_started = time.perf_counter()
            _train_unet(unet, text_encoder, tokenizer, latents, captions, steps=unet_steps, batch_size=unet_batch_size,
                        lr=unet_lr, seed=seed, train_text_encoder=train_text_encoder, caption_dropout=caption_dropout,
                        log_every=log_every, report=report, progress=progress)
            report.unet_seconds = time.perf_counter() - unet_started
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**_scheduler_config()),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(staging)
        report.weight_bytes = sum(f.stat().st_size for f in staging.rglob("*.safetensors"))
        report.total_seconds = time.perf_counter() - started
        (staging / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
        write_descriptor(staging, "tiny_pretrained")
        (staging / MARKER).write_text(json.dumps({"version": PRETRAINED_VERSION, "seed": seed}), encoding="utf-8")
    logger.info("Pretrained tiny pipeline saved to %s in %.0f s", target, report.total_seconds)
    return report


# Taken once, here: tests monkeypatch pretrain_tiny_pipeline, which must not change the recipe.
_RECIPE_DEFAULTS = {name: p.default for name, p in inspect.signature(pretrain_tiny_pipeline).parameters.items()
                    if p.default is not inspect.Parameter.empty and name not in _NOT_RECIPE}


#: What a finished pipeline folder holds besides the marker (weights are checked per model).
REQUIRED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "vae/config.json",
    "unet/config.json",
    REPORT_NAME,
)


def pretrained_version(path: str | os.PathLike) -> str | None:
    """The recipe version written in ``path``'s marker, or None if it has no readable marker."""
    try:
        info = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("version") if isinstance(info, dict) else None


def is_complete_pretrained_pipeline(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a finished pretrained tiny pipeline of the current version."""
    path = Path(path)
    if pretrained_version(path) != PRETRAINED_VERSION:
        return False
    if not all((path / rel).is_file() for rel in REQUIRED_FILES):
        return False
    return all(any((path / sub).glob("*.safetensors")) for sub in ("text_encoder", "vae", "unet"))


def ensure_pretrained_tiny_pipeline(cache_dir: str | os.PathLike | None = None, seed: int = 0, **kwargs) -> Path:
    """Return the cached pretrained pipeline folder, pretraining it once (minutes) if needed.

    The folder is ``<cache_dir>/tiny-sd-scenes`` (``-seed<N>`` appended for other seeds);
    ``cache_dir`` defaults to :func:`default_cache_dir`. ``kwargs`` go to
    :func:`pretrain_tiny_pipeline` and only matter when the folder is built.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / (PRETRAINED_SUBDIR if seed == 0 else f"{PRETRAINED_SUBDIR}-seed{seed}")
    if not is_complete_pretrained_pipeline(target):
        pretrain_tiny_pipeline(target, seed=seed, overwrite=True, **kwargs)
    ensure_descriptor(target, "tiny_pretrained")
    return target


def default_pretrained_pipeline(cache_dir: str | os.PathLike | None = None) -> Path:
    """The trainer's default model: the shipped pipeline, or a deterministic rebuild of it.

    ``demo/assets/tiny-sd-scenes`` is used when it is complete and of the current
    :data:`PRETRAINED_VERSION`. Otherwise (an install without the assets, or a recipe changed
    without re-shipping) the same recipe is pretrained once into the cache, which takes minutes
    on a CPU, and that folder is returned; with one CPU thread it has the same weights.
    """
    if is_complete_pretrained_pipeline(SHIPPED_DIR):
        return SHIPPED_DIR
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = root / PRETRAINED_SUBDIR
    if not is_complete_pretrained_pipeline(cached):
        found = pretrained_version(SHIPPED_DIR)
        why = "is missing" if found is None else f"is version {found}, not {PRETRAINED_VERSION}, or incomplete"
        logger.warning(
            "The shipped pretrained tiny pipeline %s %s: pretraining it into %s instead "
            "(once, about 7 minutes on one CPU thread; later runs reuse it).", SHIPPED_DIR, why, cached,
        )
    return ensure_pretrained_tiny_pipeline(root)
