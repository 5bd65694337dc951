"""Load the pieces of a Stable Diffusion 1.x/2.x model that DreamBooth LoRA training needs.

One entry point covers the ways users name a base model: a local diffusers folder, a Hub id, a
single ``.safetensors``/``.ckpt`` checkpoint (as shared on model sites), or nothing at all, which
means the demo's tiny pipeline pretrained on procedural shapes, for offline demos. A folder may
carry ``adaprelora_model.json`` with the training defaults its maker recommends (the embedded
tiny pipelines ask for 64 px and the demo subject this way). Wrong paths fail early with
a message that names the path and what was expected, instead of a deep library traceback.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.model_descriptor import model_descriptor
from ..engine.model_source import looks_like_hub_id
from ..engine.quiet_imports import quiet_image_processor_fallback

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: Sub-folders of a diffusers SD pipeline and the file that marks each one as present.
REQUIRED_COMPONENTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,  # tokenizer.json, or vocab.json + merges.txt (checked separately)
    "scheduler": "scheduler_config.json",
}
_PIPELINE_LAYOUT = "model_index.json plus unet/, vae/, text_encoder/, tokenizer/ and scheduler/ sub-folders"


@dataclass
class SDComponents:
    """What the trainer needs from a base model (the noise scheduler is always DDPM)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str  # the folder, Hub id or checkpoint file that was loaded
    kind: str  # "folder", "hub" or "single_file"
    base_model_version: str | None = None  # kohya's ss_base_model_version, when the descriptor says
    tokenizer_2: Any = None  # SDXL's second tokenizer and text encoder (CLIPTextModelWithProjection)
    text_encoder_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]


def default_model() -> str:
    """The model trained when none is given: the demo's tiny pretrained pipeline (64 px, shipped).

    The one place product code reaches into the demo package.
    """
    from ..demo.pretrained_tiny import default_pretrained_pipeline

    return str(default_pretrained_pipeline())


#: Where an SDXL model's defaults differ from SD 1.x/2.x's (config.REAL_DEFAULTS): its native size.
SDXL_DEFAULTS = {"resolution": 1024}


def model_defaults(source: str | os.PathLike, sdxl: bool | None = None) -> dict[str, Any]:
    """The training defaults that suit ``source``: SDXL's where it is SDXL (``sdxl=None``: read from a
    local folder's index or a local file, never from the network), then what its descriptor
    recommends, paths made absolute."""
    if sdxl is None:
        sdxl = _local_is_sdxl(source)
    defaults = dict(SDXL_DEFAULTS) if sdxl else {}
    recommended = dict(model_descriptor(source).get("training_defaults") or {})
    if recommended.get("instance_data_dir"):
        recommended["instance_data_dir"] = str((Path(source) / recommended["instance_data_dir"]).resolve())
    return {**defaults, **recommended}


def _local_is_sdxl(source: str | os.PathLike) -> bool:
    path = Path(source)
    try:
        if (path / "model_index.json").is_file():
            return is_sdxl_index(json.loads((path / "model_index.json").read_text(encoding="utf-8")))
        return path.is_file() and single_file_is_sdxl(str(path))
    except (OSError, ValueError):
        return False  # unreadable: loading will say why


def check_pipeline_folder(path: str | os.PathLike) -> Path:
    """Raise a ValueError naming what is missing unless ``path`` is a diffusers SD 1.x/2.x folder."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        hint = ""
        if (path / "config.json").is_file():
            hint = " It holds a single model's config.json: pass the pipeline's root folder (the parent of unet/, vae/, ...)."
        elif any(path.glob("*.safetensors")) or any(path.glob("*.ckpt")):
            hint = " It holds .safetensors/.ckpt files: to load a single-file checkpoint, pass that file's path."
        raise ValueError(f"{path} is not a diffusers pipeline folder: it has no model_index.json (expected {_PIPELINE_LAYOUT}).{hint}")
    try:
        model_index = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{index} is not valid JSON ({exc}): re-save the pipeline with save_pretrained.") from exc
    check_model_index(model_index, str(path))
    components = dict(REQUIRED_COMPONENTS)
    if is_sdxl_index(model_index):
        components.update(text_encoder_2="config.json", tokenizer_2=None)
    missing = []
    for sub, marker in components.items():
        folder = path / sub
        if marker is None:  # a tokenizer
            if not (folder / "tokenizer.json").is_file() and not (
                (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            ):
                missing.append(f"{sub}/tokenizer.json (or {sub}/vocab.json + merges.txt)")
        elif not (folder / marker).is_file():
            missing.append(f"{sub}/{marker}")
    if missing:
        raise ValueError(f"{path} is an incomplete diffusers pipeline folder: missing {', '.join(missing)} (expected {_PIPELINE_LAYOUT}).")
    expected = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    for sub, arch in expected.items():
        if sub not in components:
            continue
        archs = json.loads((path / sub / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        if archs and archs[0] != arch:
            raise ValueError(f"{path}: {sub} is {archs[0]}, but LoRA training here expects a {arch}.")
    return path


def is_sdxl_index(model_index: dict) -> bool:
    """An SDXL base pipeline: two text encoders (the refiner has only the second)."""
    return bool(model_index.get("text_encoder_2")) and (model_index.get("text_encoder_2") or [None])[0] is not None


def check_model_index(model_index: dict, source: str) -> None:
    """Refuse pipelines this trainer cannot train, saying what it does train."""
    name = model_index.get("_class_name", "unknown")
    if "transformer" in model_index or "unet" not in model_index:
        raise ValueError(f"{source} is a {name} pipeline (no UNet); this trainer supports Stable Diffusion 1.x/2.x and SDXL.")
    if not (model_index.get("text_encoder") or [None])[0]:
        raise ValueError(f"{source} is a {name} pipeline without the first text encoder (an SDXL refiner?); this trainer "
                         "supports Stable Diffusion 1.x/2.x and the SDXL base model.")


def resolve_model_source(pretrained_model_name_or_path: str | os.PathLike | None) -> tuple[str, str]:
    """Classify the user's model argument as ("folder" | "hub" | "single_file", location); None is the default model."""
    if pretrained_model_name_or_path is None:
        return "folder", default_model()
    raw = str(pretrained_model_name_or_path)
    if not raw.strip():
        raise ValueError("Empty model path: pass a diffusers folder, a Hub id, a .safetensors/.ckpt file, or None for the tiny pretrained demo model.")
    if raw.startswith(("http://", "https://")):
        if not raw.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise ValueError(f"URL {raw} does not point at a .safetensors/.ckpt checkpoint: pass a Hub id (owner/name) for diffusers repos.")
        return "single_file", raw
    path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(
                f"{path} is a file but not a .safetensors or .ckpt checkpoint: pass a single-file SD checkpoint or a diffusers pipeline folder."
            )
        return "single_file", str(path)
    if path.is_dir():
        folder = str(check_pipeline_folder(path))
        return "folder", folder
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"Checkpoint file {path} does not exist (looked for {path.absolute()}): check the path.")
    if looks_like_hub_id(raw):
        return "hub", raw
    raise ValueError(
        f"Model path {raw} does not exist (looked for {path.absolute()}) and is not a Hub id of the form owner/name: "
        f"pass a diffusers pipeline folder ({_PIPELINE_LAYOUT}), a .safetensors/.ckpt file, or a Hub id."
    )


def check_tokenizer(tokenizer, text_encoder, source: str):
    """Catch a tokenizer that cannot drive this text encoder; cap an unset ``model_max_length``.

    transformers 5 does not fail when tokenizer files are missing: ``CLIPTokenizer.from_pretrained``
    then returns a default 2-token tokenizer, and training would silently see every prompt as
    unknown tokens. A tokenizer without tokenizer_config.json also reports a ~1e30 max length,
    which would make ``padding="max_length"`` explode.
    """
    te_vocab = text_encoder.config.vocab_size
    if len(tokenizer) <= 3:
        raise ValueError(
            f"The tokenizer of {source} has only {len(tokenizer)} tokens: its tokenizer files are missing "
            f"(expected tokenizer/tokenizer.json or tokenizer/vocab.json + merges.txt)."
        )
    if len(tokenizer) > te_vocab:
        raise ValueError(
            f"The tokenizer of {source} has {len(tokenizer)} tokens but the text encoder only {te_vocab} embeddings: "
            f"they come from different models."
        )
    max_positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    return tokenizer


def _load(component: str, source: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as exc:
        # Plain OSError/ValueError: some library exception types cannot be rebuilt from a message.
        raise (ValueError if isinstance(exc, ValueError) else OSError)(f"Could not load the {component} of {source}: {exc}") from exc
    except Exception as exc:  # safetensors' SafetensorError on a truncated file, a torch unpickling error, ...
        raise ValueError(f"Could not load the {component} of {source} ({type(exc).__name__}: {exc}): its weights file "
                         "is damaged or truncated; download or save the model again.") from exc


def check_single_file(path: str) -> None:
    """Catch a truncated or corrupt local checkpoint before diffusers blames something else."""
    if not Path(path).is_file():
        return  # a URL: diffusers downloads it
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as fh:  # checks the header against the file size
                fh.keys()
        else:
            import zipfile

            with open(path, "rb") as fh:
                is_zip = fh.read(4) == b"PK\x03\x04"  # torch's zip format (a legacy pickle cannot be checked cheaply)
            if is_zip:
                zipfile.ZipFile(path).close()  # a truncated zip has lost its central directory: BadZipFile
    except Exception as exc:
        raise ValueError(f"The checkpoint {path} is damaged or truncated ({type(exc).__name__}: {exc}): download it again.") from exc


def check_all_weights_loaded(component: str, source: str, loading_info: dict) -> None:
    """Raise a ValueError if ``from_pretrained(..., output_loading_info=True)`` left weights uninitialised.

    transformers and diffusers only warn when checkpoint keys are missing and give those weights
    random values, so a model that silently lost part of its weights would train and sample noise.
    That happens with a checkpoint whose key names another library version wrote (transformers 4.x
    reads a CLIP text encoder saved by transformers 5, which has no ``text_model.`` prefix, as
    random weights) and with a truncated or mismatched weights file.
    """
    missing = sorted(loading_info.get("missing_keys") or ())
    if not missing:
        return
    unexpected = sorted(loading_info.get("unexpected_keys") or ())
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    names_differ = (
        f" The file holds {len(unexpected)} weight(s) under names the model does not use (e.g. {', '.join(unexpected[:3])}): "
        f"the names differ, as in a checkpoint saved by another transformers/diffusers version."
        if unexpected else ""
    )
    raise ValueError(
        f"The {component} of {source} lacks {len(missing)} weight(s) the model needs ({shown}); they would be left "
        f"randomly initialised.{names_differ} Likely causes: a checkpoint saved by another version of "
        f"transformers/diffusers (install the tested set with `pip install -c constraints.txt -e .`, or re-save "
        f"the model with the versions that read it), or a truncated or mismatched weights file (download or copy it again)."
    )


def _load_weights(component: str, source: str, cls, **kwargs):
    """``cls.from_pretrained(source, subfolder=component)`` that refuses to leave weights uninitialised."""
    model, info = _load(component, source, cls.from_pretrained, source, subfolder=component, output_loading_info=True, **kwargs)
    check_all_weights_loaded(component, source, info)
    return model


def stable_diffusion_pipeline_class(sdxl: bool = False):
    """diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` with ``sdxl``), imported
    without transformers' torchvision fallback notices (``engine.quiet_imports``)."""
    quiet_image_processor_fallback()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def load_pipeline_components(
    pretrained_model_name_or_path: str | os.PathLike | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler for training.

    ``pretrained_model_name_or_path`` may be a diffusers folder or Hub id (loaded per sub-folder with
    ``from_pretrained``), a ``.safetensors``/``.ckpt`` file or URL (``StableDiffusionPipeline.from_single_file``;
    ``single_file_config`` names a local diffusers folder with matching configs so that this works
    offline), or ``None`` for the tiny pretrained pipeline. The noise scheduler is a
    ``DDPMScheduler`` built from the model's own scheduler config, so the beta schedule and
    ``prediction_type`` (epsilon / v_prediction) follow the model. A text encoder, VAE or UNet whose
    checkpoint lacks weights is an error (``check_all_weights_loaded``), not a warning.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kind, source = resolve_model_source(pretrained_model_name_or_path)
    about = model_descriptor(source) if kind == "folder" else {}
    if about.get("notice"):
        logger.warning("%s", about["notice"])

    if kind == "single_file":
        kwargs: dict[str, Any] = {}
        if single_file_config is not None:
            kwargs["config"] = str(single_file_config)
        if revision is not None:
            kwargs["revision"] = revision
        check_single_file(source)
        try:
            pipe = stable_diffusion_pipeline_class(sdxl=single_file_is_sdxl(source)).from_single_file(source, **kwargs)
        except Exception as exc:  # diffusers raises many types here (hub, conversion, safetensors errors)
            offline = "" if single_file_config else (
                " Loading a single file needs the matching diffusers configs: without network access pass "
                "single_file_config=<local diffusers SD folder of the same architecture>."
            )
            raise ValueError(f"Could not load the single-file checkpoint {source}: {type(exc).__name__}: {exc}.{offline}") from exc
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        return SDComponents(
            tokenizer=check_tokenizer(pipe.tokenizer, pipe.text_encoder, source),
            text_encoder=pipe.text_encoder,
            vae=_load_vae(vae, revision) if vae else pipe.vae,
            unet=pipe.unet,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            source=source,
            kind=kind,
            tokenizer_2=check_tokenizer(pipe.tokenizer_2, pipe.text_encoder_2, source) if sdxl else None,
            text_encoder_2=pipe.text_encoder_2 if sdxl else None,
        )

    common = {"revision": revision}
    weights = {"revision": revision, "variant": variant}
    index = _load("model_index", source, read_model_index, source, **common)
    check_model_index(index, source)
    sdxl = is_sdxl_index(index)
    tokenizer_source = tokenizer
    if tokenizer_source is not None:  # --tokenizer_name
        tokenizer = _load("tokenizer", str(tokenizer_source), CLIPTokenizer.from_pretrained, str(tokenizer_source), **common)
    else:
        tokenizer = _load("tokenizer", source, CLIPTokenizer.from_pretrained, source, subfolder="tokenizer", **common)
    text_encoder = _load_weights("text_encoder", source, CLIPTextModel, **weights)
    tokenizer_2 = text_encoder_2 = None
    if sdxl:
        tokenizer_2 = _load("tokenizer_2", source, CLIPTokenizer.from_pretrained, source, subfolder="tokenizer_2", **common)
        text_encoder_2 = _load_weights("text_encoder_2", source, CLIPTextModelWithProjection, **weights)
    return SDComponents(
        tokenizer=check_tokenizer(tokenizer, text_encoder, source),
        text_encoder=text_encoder,
        vae=_load_vae(vae, revision) if vae else _load_weights("vae", source, AutoencoderKL, **weights),
        unet=_load_weights("unet", source, UNet2DConditionModel, **weights),
        noise_scheduler=_load("scheduler", source, DDPMScheduler.from_pretrained, source, subfolder="scheduler", **common),
        source=source,
        kind=kind,
        base_model_version=about.get("base_model_version"),
        tokenizer_2=check_tokenizer(tokenizer_2, text_encoder_2, source) if sdxl else None,
        text_encoder_2=text_encoder_2,
    )


def read_model_index(source: str, revision: str | None = None) -> dict:
    """The pipeline's model_index.json, from a folder or the Hub (it says which model family this is)."""
    path = Path(source) / "model_index.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "model_index.json", revision=revision))
    return json.loads(path.read_text(encoding="utf-8"))


def _load_vae(vae: str | os.PathLike, revision: str | None):
    """--pretrained_vae_model_name_or_path: a VAE folder or hub id (e.g. SDXL's fp16-safe VAE)."""
    from diffusers import AutoencoderKL

    source = str(vae)
    model, info = _load("VAE", source, AutoencoderKL.from_pretrained, source, output_loading_info=True, revision=revision)
    check_all_weights_loaded("vae", source, info)
    return model


def source_is_sdxl(pretrained_model_name_or_path: str | os.PathLike | None, revision: str | None = None) -> bool:
    """Whether the model is SDXL, read from its index (or single-file keys) before loading it."""
    kind, source = resolve_model_source(pretrained_model_name_or_path)
    if kind == "single_file":
        return single_file_is_sdxl(source)
    return is_sdxl_index(_load("model_index", source, read_model_index, source, revision=revision))


def single_file_is_sdxl(path: str) -> bool:
    """An SDXL single-file checkpoint carries its second text encoder under conditioner.embedders.1."""
    if not (Path(path).is_file() and path.lower().endswith(".safetensors")):
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as fh:
        return any(k.startswith("conditioner.embedders.1.") for k in fh.keys())
