"""The LoRA output folder's README.md, a Hugging Face model card like diffusers' DreamBooth LoRA examples write.

The YAML front matter is produced by ``huggingface_hub.ModelCardData`` (the Hub's own schema and
YAML dumper), so the folder can be uploaded as is. ``base_model`` goes into the metadata only when
it is a Hub id: the Hub refuses cards whose ``base_model`` is not a model id (a local path, say),
and a local path would also publish the trainer's file layout. The body names the base model
either way, in the loading snippet.
"""

from __future__ import annotations

from typing import Any

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..engine.atomic import atomic_write_text
from .lora_files import LORA_WEIGHT_NAME
from ..engine.model_descriptor import model_descriptor
from ..engine.model_source import looks_like_hub_id
from .model_loading import SINGLE_FILE_SUFFIXES, default_model

CARD_NAME = "README.md"
LICENSE = "creativeml-openrail-m"
TAGS = ("text-to-image", "diffusers", "lora", "stable-diffusion", "adaprelora")
TINY_NOTICE = (
    "> **Smoke-test model.** This LoRA was trained on adaprelora-diffusion's tiny random-weight "
    "Stable Diffusion pipeline, not a real checkpoint: it exists to check that training runs end to end, "
    "and its images are noise."
)
DEMO_NOTICE = (
    "> **Demo model.** This LoRA was trained on adaprelora-diffusion's tiny Stable Diffusion pipeline "
    "pretrained on procedural coloured shapes (64 px, a few MB), not a real checkpoint: it shows "
    "personalization working on a CPU and does not fit real Stable Diffusion models."
)


# --------------------------------------------------------------------------------------------
# Classifying and linking
# --------------------------------------------------------------------------------------------


def base_model_kind(base_model: str | os.PathLike | None) -> str:
    """``"tiny_pretrained"`` (the default model, also for ``None``), ``"tiny"`` (random weights),
    ``"hub"``, ``"single_file"`` or ``"folder"``: decides the metadata and the loading snippet.
    The demo's tiny pipelines say which they are in their descriptor (``adaprelora_model.json``)."""
    raw = str(base_model) if base_model is not None else default_model()
    path = Path(raw).expanduser()
    if path.is_dir() and model_descriptor(path).get("kind") in ("tiny", "tiny_pretrained"):
        return model_descriptor(path)["kind"]
    if raw.lower().endswith(SINGLE_FILE_SUFFIXES):
        return "single_file"
    if not path.exists() and looks_like_hub_id(raw):
        return "hub"
    return "folder"


def _relative_link(path: str | os.PathLike, output_dir: Path, what: str) -> str:
    """``path`` as a POSIX path relative to ``output_dir``, so links survive moving or uploading the folder."""
    path = Path(path)
    full = path if path.is_absolute() else output_dir / path
    if not full.is_file():
        raise ValueError(f"The {what} {path} does not exist (looked for {full}): write it before the model card.")
    try:
        return full.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(
            f"The {what} {full} is outside the output folder {output_dir}: the card's links would break once the "
            f"folder is moved or uploaded. Save it inside {output_dir} first."
        ) from None


def _code(text: str) -> str:
    """Inline markdown code that survives backticks in ``text``."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(value) -> str:
    """One markdown table cell: ``|`` escaped, newlines flattened, floats without float noise."""
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def settings_table(settings: Mapping) -> str:
    rows = ["| Setting | Value |", "|---|---|"]
    rows += [f"| {_cell(key)} | {_cell(value)} |" for key, value in settings.items()]
    return "\n".join(rows)


def _base_model_label(base_model, kind: str) -> str:
    if kind == "tiny":
        return "the tiny random-weight Stable Diffusion pipeline"
    if kind == "tiny_pretrained":
        return "the tiny Stable Diffusion pipeline pretrained on procedural shapes"
    if kind == "hub":
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return _code(str(base_model))


def _py(text: str) -> str:
    """A Python string literal (JSON's escapes are all valid Python) in the snippet's double-quote style."""
    return json.dumps(str(text), ensure_ascii=False)


def _usage_snippet(base_model, kind: str, lora_folder: str, prompt: str, sdxl: bool = False) -> str:
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    if kind == "tiny":
        load = (
            "from adaprelora_diffusion.demo.tiny_pipeline import ensure_tiny_pipeline\n\n"
            "pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_pipeline())  # CPU, float32"
        )
        run = f"image = pipe({_py(prompt)}, num_inference_steps=2, height=64, width=64).images[0]"
    elif kind == "tiny_pretrained":
        load = (
            "from adaprelora_diffusion.demo.pretrained_tiny import default_pretrained_pipeline\n\n"
            "pipe = StableDiffusionPipeline.from_pretrained(default_pretrained_pipeline())  # CPU, float32"
        )
        run = f"image = pipe({_py(prompt)}, num_inference_steps=25, height=64, width=64).images[0]"
    else:
        loader = "from_single_file" if kind == "single_file" else "from_pretrained"
        load = f'pipe = {pipeline}.{loader}({_py(base_model)}, torch_dtype=torch.float16).to("cuda")'
        run = f"image = pipe({_py(prompt)}, num_inference_steps=25).images[0]"
    return (
        "```python\n"
        "import torch\n"
        f"from diffusers import {pipeline}\n\n"
        f"{load}\n"
        f"# this folder, or the Hub repo you upload it to\n"
        f"pipe.load_lora_weights({_py(lora_folder)}, weight_name={_py(LORA_WEIGHT_NAME)})\n"
        f"{run}\n"
        "```"
    )


#: what each LoRA file is for, as measured with AUTOMATIC1111's and ComfyUI's own loader code (issue 21)
DIFFUSERS_FILE_USE = ("diffusers (`load_lora_weights`) and peft. Not for AUTOMATIC1111 (none of its keys match there) "
                      "nor ComfyUI (it loses every UNet attention projection there: their alpha is only in the file's "
                      "metadata, which ComfyUI ignores)")
KOHYA_FILE_USE = "AUTOMATIC1111, ComfyUI and kohya's scripts (every key applies, with its alpha); diffusers reads it too"


def which_file_section(kohya_link: str | None) -> str:
    """The card's "Which file for which tool" table (the app's download zip carries the card as its README)."""
    rows = [f"| {_code(LORA_WEIGHT_NAME)} | {DIFFUSERS_FILE_USE} |"]
    if kohya_link is not None:
        rows.append(f"| {_code(kohya_link)} | {KOHYA_FILE_USE} |")
    else:
        rows.append("| (no kohya file) | for AUTOMATIC1111 and ComfyUI, train with `--output_kohya_format`, "
                    "which writes one |")
    return "## Which file for which tool\n\n| file | use it with |\n|---|---|\n" + "\n".join(rows)


def _body(*, base_model, kind, lora_folder, instance_prompt, validation_prompt, optimizer, settings, sdxl=False,
          image_links, train_text_encoder, kohya_link) -> str:
    parts = ["# DreamBooth LoRA for Stable Diffusion"]
    if kind == "tiny":
        parts.append(TINY_NOTICE)
    elif kind == "tiny_pretrained":
        parts.append(DEMO_NOTICE)
    trained = "the UNet and the text encoder" if train_text_encoder else "the UNet (text encoder frozen)"
    by = f" with the {_code(str(optimizer))} optimizer" if optimizer else ""
    parts.append(
        f"LoRA weights for {_base_model_label(base_model, kind)}, trained DreamBooth-style with "
        f"adaprelora-diffusion on {trained}{by}."
    )
    parts.append(f"## Trigger prompt\n\nUse {_code(instance_prompt)} in your prompt to bring in the trained subject.")
    parts.append("## Use with diffusers\n\n" + _usage_snippet(base_model, kind, lora_folder, validation_prompt or instance_prompt, sdxl))
    if kohya_link is not None:
        parts.append(
            f"## kohya / AUTOMATIC1111 / ComfyUI\n\n[{_code(kohya_link)}]({kohya_link}) holds the same LoRA in kohya's "
            f"layout, which AUTOMATIC1111, ComfyUI and kohya's scripts read. diffusers loads it too: "
            f"{_code(f'pipe.load_lora_weights({_py(lora_folder)}, weight_name={_py(kohya_link)})')}."
        )
    parts.append(which_file_section(kohya_link))
    if settings:
        parts.append("## Training settings\n\n" + settings_table(settings))
    if image_links:
        shown = validation_prompt or instance_prompt
        images = "\n".join(f"![sample {i}]({link})" for i, link in enumerate(image_links))
        parts.append(f"## Sample images\n\nPrompt: {_code(shown)}\n\n{images}")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_args(output_dir, instance_prompt, settings) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file: pass the LoRA output folder to write {CARD_NAME} into.")
    if not isinstance(instance_prompt, str) or not instance_prompt.strip():
        raise ValueError(f"instance_prompt must be a non-empty string (the trigger prompt, e.g. 'a photo of sks dog'); got {instance_prompt!r}.")
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a dict of training settings (name -> value); got {type(settings).__name__}.")
    return output_dir


def build_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None,
    instance_prompt: str,
    validation_prompt: str | None = None,
    optimizer: str | None = None,
    settings: Mapping,
    sample_images: Sequence[str | os.PathLike] = (),
    train_text_encoder: bool = False,
    kohya_file: str | os.PathLike | None = None,
    sdxl: bool = False,
):
    """The ``huggingface_hub.ModelCard`` that :func:`write_model_card` saves (see there)."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = _check_args(output_dir, instance_prompt, settings)
    kind = base_model_kind(base_model)
    image_links = [_relative_link(p, output_dir, "sample image") for p in sample_images]
    kohya_link = _relative_link(kohya_file, output_dir, "kohya LoRA file") if kohya_file is not None else None
    shown_prompt = validation_prompt or instance_prompt
    settings = dict(settings)
    if optimizer and "optimizer" not in settings:
        settings = {"optimizer": optimizer, **settings}

    data = ModelCardData(
        base_model=str(base_model) if kind == "hub" else None,
        library_name="diffusers",
        license=LICENSE,
        tags=list(TAGS) + (["stable-diffusion-xl"] if sdxl else []),
        instance_prompt=instance_prompt,
        widget=[{"text": shown_prompt, "output": {"url": link}} for link in image_links] or None,
    )
    body = _body(sdxl=sdxl,
        base_model=base_model, kind=kind, lora_folder=output_dir.resolve().name, instance_prompt=instance_prompt,
        validation_prompt=validation_prompt, optimizer=optimizer, settings=settings, image_links=image_links,
        train_text_encoder=train_text_encoder, kohya_link=kohya_link,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(output_dir: str | os.PathLike, **card: Any) -> Path:
    """Write ``output_dir/README.md`` atomically and return its path; ``card`` are the keyword
    arguments of :func:`build_model_card`.

    ``base_model`` is what training loaded (Hub id, folder, single file, or ``None`` for the
    default tiny pretrained pipeline). ``sample_images`` and ``kohya_file`` must lie inside ``output_dir`` (absolute, or
    relative to it); the card links them relatively. Every ``settings`` entry becomes a table row.
    """
    text = str(build_model_card(output_dir, **card))
    target = Path(output_dir) / CARD_NAME
    return atomic_write_text(target, text)
