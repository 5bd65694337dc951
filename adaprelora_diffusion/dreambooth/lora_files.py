"""Save (and load back) LoRA weights trained with peft on an SD 1.x/2.x UNet and text encoder.

Two file layouts are written, both readable by ``pipe.load_lora_weights``:

* diffusers layout (``pytorch_lora_weights.safetensors``): peft tensors under ``unet.`` /
  ``text_encoder.`` plus each adapter's ``LoraConfig`` as metadata, so ranks, ``lora_alpha``
  (alpha != rank), rank/alpha patterns and rsLoRA all survive a reload;
* kohya layout (``lora_unet_*`` / ``lora_te_*`` with ``lora_down`` / ``lora_up`` / ``alpha`` and
  ``ss_*`` metadata), the format AUTOMATIC1111, ComfyUI and kohya's own tools read.

Every write is atomic (``engine.atomic``), so an interrupted save never leaves a truncated weights
file behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..engine.atomic import atomic_write

logger = logging.getLogger(__name__)

#: diffusers' default LoRA file name (``LORA_WEIGHT_NAME_SAFE``); ``load_lora_weights(dir)`` finds it.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NETWORK_MODULE = "networks.lora"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _lora_config(model: torch.nn.Module, adapter_name: str, role: str):
    from peft import LoraConfig

    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        have = ", ".join(sorted(configs)) or "none"
        raise ValueError(
            f"The {role} has no LoRA adapter named {adapter_name!r} (adapters present: {have}). Add one with "
            f"{role}.add_adapter(LoraConfig(...)) before saving, or pass the right adapter_name."
        )
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"The {role} adapter {adapter_name!r} is a {type(config).__name__}, not a LoRA adapter: only LoRA can be saved here.")
    return config


def _peft_state_dict(model: torch.nn.Module, adapter_name: str, role: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    _lora_config(model, adapter_name, role)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not state:
        raise ValueError(f"The {role} adapter {adapter_name!r} has no LoRA weights (no target module matched?).")
    return {k: v.detach().contiguous() for k, v in state.items()}


def _text_encoder_prefix(text_encoder: torch.nn.Module) -> str:
    """Prefix that gives text-encoder module paths their canonical CLIP checkpoint spelling.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model`` child), so its module paths read
    ``encoder.layers.0...``. SD checkpoints, kohya/A1111 files and older transformers all spell
    them ``text_model.encoder.layers.0...``; writing that spelling keeps files portable, and
    diffusers >= 0.4x strips it again when loading into a flattened model.
    """
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def _metadata_without_local_paths(config) -> dict:
    meta = config.to_dict()
    # The LoraConfig records the local folder the base model was loaded from; do not publish it.
    meta["base_model_name_or_path"] = None
    return meta


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) for k, v in state.items()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors file (empty dict if none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return dict(fh.metadata() or {})


# --------------------------------------------------------------------------------------------
# diffusers layout
# --------------------------------------------------------------------------------------------


def save_lora_weights(
    output_dir: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
    dtype: torch.dtype | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> Path:
    """Write the UNet (+ text encoders) LoRA as ``output_dir/weight_name`` in diffusers layout:
    ``unet.``, ``text_encoder.`` and, for SDXL, ``text_encoder_2.`` keys with each adapter's config,
    which ``StableDiffusion(XL)Pipeline.load_lora_weights`` loads.

    Tensors keep peft's own key names (``...to_q.lora_A.weight``), as diffusers' model-level
    ``save_lora_adapter`` writes them. ``convert_state_dict_to_diffusers`` is deliberately NOT
    applied: in diffusers 0.42 it renames only attention projections, and a file mixing renamed
    and peft keys (e.g. LoRA on to_q *and* conv1, or q_proj *and* fc1) loads back without its
    attention LoRA (tests/dreambooth/test_lora_files.py::test_diffusers_roundtrip_with_conv_and_mlp_targets).
    """
    # The pipeline's LoRA mixin, not the pipeline: importing StableDiffusionPipeline pulls in image
    # processors (and transformers' torchvision notices) that saving never uses.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"LoRA output path {output_dir} is a file: pass a folder to save {weight_name} into.")
    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end with .safetensors; got {weight_name!r}.")

    unet_layers = _cast(_peft_state_dict(unet, adapter_name, "unet"), dtype)
    unet_meta = _metadata_without_local_paths(_lora_config(unet, adapter_name, "unet"))
    text_parts = {}
    for role, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            prefix = _text_encoder_prefix(model)
            text_parts[f"{role}_lora_layers"] = {prefix + k: v for k, v in _cast(_peft_state_dict(model, adapter_name, role), dtype).items()}
            text_parts[f"{role}_lora_adapter_metadata"] = _metadata_without_local_paths(_lora_config(model, adapter_name, role))
    sdxl = text_encoder_2 is not None or is_sdxl_unet(unet)
    mixin = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / weight_name

    def write(tmp: Path) -> None:
        # diffusers writes the file (and packs the metadata) into a private temp folder beside the
        # target; we then move just the file.
        staging = Path(tempfile.mkdtemp(prefix=".tmp-lora-", dir=output_dir))
        try:
            mixin.save_lora_weights(
                save_directory=str(staging),
                unet_lora_layers=unet_layers,
                weight_name=weight_name,
                safe_serialization=True,
                unet_lora_adapter_metadata=unet_meta,
                **text_parts,
            )
            os.replace(staging / weight_name, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return atomic_write(target, write)


# --------------------------------------------------------------------------------------------
# kohya layout
# --------------------------------------------------------------------------------------------


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    """SDXL's UNet takes pooled text embeddings and size/crop conditioning ("text_time")."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


#: diffusers ResNet block layers -> the original (SGM) names
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def _sgm_name(path: str, layers: int, up_has_attention: list[bool]) -> str:
    """The original Stability (SGM) module path of a diffusers UNet module path.

    Down block b's layer j is ``input_blocks[1 + b*(layers+1) + j]`` (``.0`` resnet, ``.1``
    attention; the downsampler is the block's last entry, ``.0.op``); the middle block is
    resnet, attention, resnet; up block b's layer j is ``output_blocks[b*(layers+1) + j]``
    with the upsampler after the attention. The inverse of diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers``.
    """
    for top, sgm in _SGM_TOP.items():
        if path == top or path.startswith(top + "."):
            return sgm + path[len(top):]
    parts = path.split(".")

    def inner(rest: list[str], kind: str) -> list[str]:
        if kind == "resnets" and rest and rest[0] in _SGM_RESNET:
            return _SGM_RESNET[rest[0]].split(".") + rest[1:]
        return rest

    if parts[0] == "down_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join(["input_blocks", str(1 + b * (layers + 1) + layers), "0", "op"] + rest[1:])
        return ".".join(["input_blocks", str(1 + b * (layers + 1) + j), "0" if kind == "resnets" else "1"] + inner(rest, kind))
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        return ".".join(["middle_block", str(index)] + inner(rest, kind))
    if parts[0] == "up_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            return ".".join(["output_blocks", str(b * (layers + 1) + layers), "2" if up_has_attention[b] else "1"] + rest)
        return ".".join(["output_blocks", str(b * (layers + 1) + j), "0" if kind == "resnets" else "1"] + inner(rest, kind))
    return path


def sgm_module_names(unet: torch.nn.Module, names) -> dict[str, str]:
    """diffusers module path -> SGM module path, for the given modules of an SDXL-style UNet."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("kohya SDXL names need one layers_per_block for every block; this UNet has several.")
    up_has_attention = [getattr(block, "attentions", None) is not None for block in unet.up_blocks]
    return {name: _sgm_name(name, layers, up_has_attention) for name in names}


def _lora_modules(model: torch.nn.Module, adapter_name: str):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            yield name, module


def kohya_alphas(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Per-module alpha in kohya's convention (update scale = alpha / rank).

    Taken from each layer's effective ``scaling`` so rank/alpha patterns and rsLoRA
    (scale = alpha / sqrt(rank)) are exported exactly: kohya alpha = scaling * rank.
    """
    return {name: float(m.scaling[adapter_name]) * int(m.r[adapter_name]) for name, m in _lora_modules(model, adapter_name)}


def _kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def save_kohya_lora(
    path: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    metadata: Mapping[str, str] | None = None,
    adapter_name: str = "default",
    output_name: str | None = None,
    training_comment: str | None = None,
    base_model_version: str | None = None,
    dtype: torch.dtype | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> Path:
    """Write the LoRA as one kohya-style ``.safetensors`` file at ``path``.

    SDXL (a UNet with text-time conditioning): UNet modules get the original SGM block names
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``middle_block``,
    ``output_blocks``) that kohya's SDXL trainer, A1111 and ComfyUI use, and the text encoders
    ``lora_te1_`` / ``lora_te2_``; SD 1.x/2.x files keep diffusers-like ``down_blocks`` names and
    ``lora_te_``, as kohya writes those.

    Keys are ``lora_unet_<module_path_with_underscores>.{lora_down.weight,lora_up.weight,alpha}``
    (``lora_te_text_model_...`` for the text encoder), conv LoRA stays 4-D, and ``ss_*`` metadata
    describes the network. ``metadata`` entries (str -> str) are added last and win.
    ``base_model_version`` defaults to ``sd_v2`` for a 1024-wide cross-attention UNet, else ``sd_v1``.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA path must end with .safetensors; got {path}.")
    if path.is_dir():
        raise ValueError(f"kohya LoRA path {path} is a folder: pass a file path ending with .safetensors.")
    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; convert these entries with str() or json.dumps(): {bad}.")

    sdxl = text_encoder_2 is not None or is_sdxl_unet(unet)
    parts = [("unet", unet, "", "lora_unet_")]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, _text_encoder_prefix(text_encoder), "lora_te1_" if sdxl else "lora_te_"))
    if text_encoder_2 is not None:
        parts.append(("text_encoder_2", text_encoder_2, _text_encoder_prefix(text_encoder_2), "lora_te2_"))
    to_sgm = sgm_module_names(unet, [n for n, _ in _lora_modules(unet, adapter_name)]) if sdxl else {}

    peft_state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    configs = {}
    for role, model, path_prefix, kohya_prefix in parts:
        config = _lora_config(model, adapter_name, role)
        if config.use_dora:
            raise ValueError(f"The {role} adapter uses DoRA, which the kohya LoRA layout cannot hold: save it with save_lora_weights instead.")
        if config.lora_bias:
            raise ValueError(f"The {role} adapter has lora_bias=True, which the kohya LoRA layout cannot hold: save it with save_lora_weights instead.")
        state = _peft_state_dict(model, adapter_name, role)
        extra = [k for k in state if ".lora_A." not in k and ".lora_B." not in k]
        if extra:
            raise ValueError(
                f"The {role} adapter holds non-LoRA tensors (modules_to_save / trainable tokens?) that the kohya "
                f"layout cannot hold: {extra[:3]}... Save it with save_lora_weights instead."
            )
        configs[role] = config
        peft_state.update({f"{role}.{path_prefix}{k}": v for k, v in state.items()})
        alphas.update({_kohya_name(kohya_prefix, to_sgm.get(name, name) if role == "unet" else path_prefix + name): a
                       for name, a in kohya_alphas(model, adapter_name).items()})

    # diffusers does the key renaming (lora_A/B -> lora_down/up, dots -> underscores) ...
    kohya = convert_state_dict_to_kohya(peft_state)
    tensors: dict[str, torch.Tensor] = {}
    sgm_keys = {_kohya_name("lora_unet_", d): _kohya_name("lora_unet_", s) for d, s in to_sgm.items()}
    for key, value in kohya.items():
        # ... but writes SDXL's "lora_te1_" for the text encoder, where SD 1.x/2.x tools expect
        # "lora_te_", keeps diffusers' UNet names where SDXL tools expect SGM ones, and sets every
        # alpha to the rank (scale 1), which would silently change the LoRA's strength whenever
        # lora_alpha != r. All three are corrected here.
        if key.startswith("lora_te1_") and not sdxl:
            key = "lora_te_" + key[len("lora_te1_"):]
        module, _, suffix = key.partition(".")
        if module in sgm_keys:
            key = f"{sgm_keys[module]}.{suffix}"
        if key.endswith(".alpha"):
            module = key[: -len(".alpha")]
            if module not in alphas:
                raise RuntimeError(f"Internal error: no LoRA layer found for kohya module {module}.")
            value = torch.tensor(alphas[module], dtype=torch.float32)
        tensors[key] = value.contiguous()
    missing = {m for m in alphas if f"{m}.alpha" not in tensors}
    if missing:
        raise RuntimeError(f"Internal error: LoRA layers without exported weights: {sorted(missing)[:3]}")
    tensors = _cast(tensors, dtype)

    ranks = Counter(int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    alpha_counts = Counter(alphas.values())
    conv_keys = [k for k, t in tensors.items() if k.endswith(".lora_down.weight") and t.ndim == 4 and t.shape[-1] > 1]
    if base_model_version is None:
        base_model_version = "sdxl_base_v1-0" if sdxl else "sd_v2" if getattr(unet.config, "cross_attention_dim", None) == 1024 else "sd_v1"
    meta = {
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": _fmt_number(alpha_counts.most_common(1)[0][0]),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version.startswith("sd_v2")),
        "ss_output_name": output_name if output_name is not None else path.stem,
        "ss_network_train_unet_only": str(text_encoder is None and text_encoder_2 is None),
        "ss_network_train_text_encoder_only": "False",
    }
    if conv_keys:
        # kohya's "LoRA-C3Lier": 3x3 convs carry their own dim/alpha in ss_network_args.
        conv_modules = [k[: -len(".lora_down.weight")] for k in conv_keys]
        meta["ss_network_args"] = json.dumps({
            "conv_dim": str(Counter(int(tensors[f"{m}.lora_down.weight"].shape[0]) for m in conv_modules).most_common(1)[0][0]),
            "conv_alpha": _fmt_number(Counter(alphas[m] for m in conv_modules).most_common(1)[0][0]),
        })
    if training_comment is not None:
        meta["ss_training_comment"] = training_comment
    if metadata:
        meta.update(metadata)

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_lora_into_pipeline(pipe, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Load a LoRA file (either layout) or a folder holding ``pytorch_lora_weights.safetensors`` into ``pipe``.

    diffusers loads the text-encoder part through transformers' ``load_adapter``. If transformers
    refuses the installed peft there, the error names both versions and the fix, and the UNet part
    that diffusers had already loaded is removed again.
    """
    path = Path(path)
    if path.is_dir():
        folder, weight_name = path, LORA_WEIGHT_NAME
        if not (folder / weight_name).is_file():
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            raise ValueError(
                f"No {weight_name} in {folder} (safetensors files there: {found or 'none'}). "
                f"Pass the LoRA file itself, or the folder save_lora_weights wrote."
            )
    elif path.is_file():
        folder, weight_name = path.parent, path.name
    else:
        raise ValueError(f"LoRA path {path} does not exist: pass a LoRA .safetensors file or the folder holding {LORA_WEIGHT_NAME}.")
    unet_adapters = set(getattr(getattr(pipe, "unet", None), "peft_config", None) or {})
    try:
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
    except ValueError as exc:
        min_peft = transformers_peft_refusal(exc)
        if min_peft is None:
            raise
        _drop_new_unet_adapters(pipe, unet_adapters)
        raise ValueError(incompatible_peft_message(f"load the text-encoder part of the LoRA {path}", exc, min_peft)) from exc


#: transformers' refusal of the installed peft (transformers/utils/peft_utils.py::check_peft_version,
#: called by PreTrainedModel's adapter methods; diffusers loads text-encoder LoRA through them).
#: diffusers' own check words it differently ("... a version that is at least X").
_TRANSFORMERS_PEFT_REFUSAL = re.compile(r"The version of PEFT you are using is not compatible, please use a version >= (\S+)")


def transformers_peft_refusal(exc: BaseException) -> str | None:
    """The minimum peft version named by transformers' "PEFT version not compatible" error, or None for other errors."""
    match = _TRANSFORMERS_PEFT_REFUSAL.search(str(exc)) if isinstance(exc, ValueError) else None
    return match.group(1) if match else None


def _installed(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def incompatible_peft_message(what: str, exc: BaseException, min_peft: str) -> str:
    """Why transformers refused the installed peft, and the two ways out."""
    return (
        f"Could not {what}: transformers {_installed('transformers')} refuses the installed peft {_installed('peft')} "
        f"for text-encoder adapters ({exc}). Install a matching pair: the tested set with "
        f"`pip install -c constraints.txt -e .` (transformers<5.24 with peft 0.21), or a newer peft with "
        f"`pip install \"peft>={min_peft}\"`."
    )


def _drop_new_unet_adapters(pipe, before: set[str]) -> None:
    """Undo the UNet half of a LoRA load that failed on the text encoder (diffusers loads the UNet first)."""
    unet = getattr(pipe, "unet", None)
    added = [name for name in (getattr(unet, "peft_config", None) or {}) if name not in before]
    if not added:
        return
    try:
        if before:
            unet.delete_adapters(added)
        else:
            unet.unload_lora()
    except Exception as err:  # best effort: the load error that follows is the one to report
        logger.warning("Could not remove the partly loaded LoRA adapter(s) %s from the UNet (%s): rebuild the pipeline.", added, err)
