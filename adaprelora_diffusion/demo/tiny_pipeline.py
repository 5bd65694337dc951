"""A tiny, random-weight Stable Diffusion pipeline for offline smoke runs and tests.

Real checkpoints cannot be downloaded in CI or on air-gapped machines, yet the trainer must be
exercised end to end through the *same* loading path real checkpoints use
(``StableDiffusionPipeline.from_pretrained(folder)``). So this module builds a structurally
faithful SD 1.x pipeline (CLIP tokenizer + CLIP text encoder + VAE + cross-attention UNet) with a
few hundred thousand random parameters, deterministically from a fixed seed, and saves it as an
ordinary diffusers pipeline folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..engine.atomic import staged_dir
from ..engine.quiet_imports import quiet_image_processor_fallback
from .descriptor import ensure_descriptor, write_descriptor

logger = logging.getLogger(__name__)

#: Bump whenever the architecture or weights below change, so stale caches are rebuilt.
TINY_PIPELINE_VERSION = "1"
DEFAULT_SEED = 0
TINY_SUBDIR = "tiny-sd"
_MARKER = ".adaprelora_tiny_complete"

# Files whose presence means a cached folder is a complete tiny pipeline.
_REQUIRED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
)

# A handful of BPE merges so the tokenizer exercises real merging (not only single bytes).
_MERGES = ("t h", "th e</w>", "o f</w>", "a n", "an d</w>", "i n", "in g</w>", "p h", "o t", "ph ot")

TEXT_HIDDEN_SIZE = 32
MAX_TEXT_LENGTH = 77


#: SD 1.x's noise schedule, shared by the tiny pipelines so the trainer's defaults fit both.
SD1_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def default_cache_dir() -> Path:
    """Root cache folder: ``$ADAPRELORA_CACHE`` if set, else ``~/.cache/adaprelora_diffusion``."""
    env = os.environ.get("ADAPRELORA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/adaprelora_diffusion").expanduser()


def write_tokenizer_files(folder: str | os.PathLike, merges: tuple[str, ...] | list[str] = _MERGES) -> Path:
    """Write a CLIP-style byte-level BPE ``vocab.json`` + ``merges.txt`` into ``folder``.

    The vocabulary holds every byte-level unicode character and its ``</w>`` (end-of-word)
    variant, so any text at all tokenizes without unknown tokens, plus the merges' results and
    CLIP's two special tokens (last, as in CLIP's own vocabulary). ``merges`` are BPE merges in
    rank order; each side must be a byte character or an earlier merge's result.
    """
    # The 256-character byte-to-unicode alphabet is taken from the tokenizers library rather than
    # re-derived here; sorting it fixes the id order.
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    for merge in merges:
        left, right = merge.split(" ")
        if left not in vocab or right not in vocab:
            raise AssertionError(f"merge {merge!r} uses a token missing from the vocab")
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_tiny_models(tokenizer, seed: int = DEFAULT_SEED, *, vae_norm_groups: int = 8, unet_norm_groups: int = 32,
                      max_text_length: int = MAX_TEXT_LENGTH):
    """The tiny text encoder, VAE and UNet (random init, same seed -> same weights).

    Shared by the random smoke-run pipeline and the pretrained one (`pretrained_tiny.py`), which
    differ only in their normalisation groups. The caller's global RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # fork_rng: seeding must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN_SIZE,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=max_text_length,
                projection_dim=TEXT_HIDDEN_SIZE,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        # Four VAE blocks -> three downsamplings -> the real SD factor of 8 (64 px -> 8x8 latents).
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=vae_norm_groups,
            sample_size=64,
        )
        unet = UNet2DConditionModel(
            sample_size=8,  # latent size: default pipeline resolution = 8 * vae factor 8 = 64 px
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
            norm_num_groups=unet_norm_groups,
        )
    return text_encoder, vae, unet


def build_tiny_pipeline(seed: int = DEFAULT_SEED, tokenizer_dir: str | os.PathLike | None = None):
    """Build the tiny pipeline in memory; same ``seed`` gives bit-identical weights.

    ``tokenizer_dir`` is where the generated vocab.json/merges.txt are written (a temporary
    folder if omitted). The caller's global torch RNG state is left untouched.
    """
    quiet_image_processor_fallback()
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tok_dir = write_tokenizer_files(tokenizer_dir if tokenizer_dir is not None else scratch)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_TEXT_LENGTH)

    text_encoder, vae, unet = build_tiny_models(tokenizer, seed)
    # SD 1.x's noise schedule; DDIM samples sensibly in very few steps. Training code builds a
    # DDPMScheduler from this same config.
    scheduler = DDIMScheduler(**SD1_SCHEDULER_CONFIG)
    for module in (text_encoder, vae, unet):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = DEFAULT_SEED, tokenizer_dir: str | os.PathLike | None = None):
    """A tiny SDXL pipeline (random weights) built from configs: two CLIP text encoders (the second
    with a projection, giving the pooled embedding), a UNet with SDXL's text-time micro-conditioning
    and SDXL's block layout (a plain first down block, two layers per block), so SDXL code paths and
    file layouts are exercised in seconds. Same ``seed`` gives bit-identical weights."""
    quiet_image_processor_fallback()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tok_dir = write_tokenizer_files(tokenizer_dir if tokenizer_dir is not None else scratch)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_TEXT_LENGTH)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_TEXT_LENGTH)

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=MAX_TEXT_LENGTH, projection_dim=hidden,
                              hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    time_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(TEXT_HIDDEN_SIZE))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_HIDDEN_SIZE))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.13025)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            cross_attention_dim=2 * TEXT_HIDDEN_SIZE, norm_num_groups=32,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN_SIZE,
        )
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD1_SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")})
    for module in (text_encoder, text_encoder_2, vae, unet):
        module.eval()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)


def is_complete_tiny_pipeline(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a finished tiny pipeline of the current version."""
    path = Path(path)
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("version") != TINY_PIPELINE_VERSION:
        return False
    if not all((path / rel).is_file() for rel in _REQUIRED_FILES):
        return False
    # Weights may be .safetensors or .bin; require at least one weight file per model folder.
    for sub in ("text_encoder", "unet", "vae"):
        if not any(f.suffix in (".safetensors", ".bin") for f in (path / sub).iterdir()):
            return False
    return True


def ensure_tiny_pipeline(cache_dir: str | os.PathLike | None = None, seed: int = DEFAULT_SEED, family: str = "sd") -> Path:
    """Return the folder of the tiny pipeline, building and saving it once if needed.

    The folder is ``<cache_dir>/tiny-sd`` (``cache_dir`` defaults to :func:`default_cache_dir`).
    It is built in a temporary sibling folder and renamed into place, so a crash or a concurrent
    builder never leaves a half-written pipeline at the final path.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if family not in ("sd", "sdxl"):
        raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")
    subdir = TINY_SUBDIR if family == "sd" else f"{TINY_SUBDIR}xl"
    kind = "tiny" if family == "sd" else "tiny_sdxl"
    target = root / (subdir if seed == DEFAULT_SEED else f"{subdir}-seed{seed}")
    if is_complete_tiny_pipeline(target):
        ensure_descriptor(target, kind)
        return target

    with staged_dir(target, accept_existing=is_complete_tiny_pipeline) as staging:
        build = build_tiny_pipeline if family == "sd" else build_tiny_sdxl_pipeline
        pipe = build(seed=seed, tokenizer_dir=staging / "tokenizer")
        pipe.save_pretrained(staging)
        write_descriptor(staging, kind)
        (staging / _MARKER).write_text(json.dumps({"version": TINY_PIPELINE_VERSION, "seed": seed}), encoding="utf-8")
    logger.info("Saved the tiny random-weight Stable Diffusion pipeline to %s", target)
    return target
