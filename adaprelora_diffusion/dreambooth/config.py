"""The DreamBooth LoRA training configuration: one dataclass, the CLI flags derived from it.

Field names are the command-line flags (diffusers' DreamBooth LoRA script's names wherever it
has the same option), so the script, the web app and the tests share one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..optim import OPTIMIZERS
from ..optim.settings import ADAPRELORA_SETTINGS, dataclass_fields, lr_problem, normalized, settings_problems

__all__ = ["TrainConfig", "build_parser", "parse_config", "command_line", "LORA_TARGET_PRESETS", "REAL_DEFAULTS"]

#: --image_interpolation_mode names (PIL's resampling filters).
INTERPOLATION_MODES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")

#: named sets of UNet LoRA targets; a comma list of module names also works.
LORA_TARGET_PRESETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "attention+conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
    "all": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

#: the defaults of a real run, for fields whose default depends on the model (a model folder's
#: adaprelora_model.json can recommend others: see engine/model_descriptor.py).
REAL_DEFAULTS = {
    "learning_rate": 1e-4,
    "lora_target_modules": "attention",
    "resolution": 512,
    "max_train_steps": 500,
    "checkpointing_steps": 500,
    "validation_steps": 100,
    "num_validation_images": 4,
    "num_validation_inference_steps": 25,
    "num_class_images": 100,
}


def _help(text: str, nargs: str | None = None, **kw):
    return field(metadata={"help": text, "nargs": nargs}, **kw)


def _with_adaprelora_settings(after: str):
    """Add AdaPreLoRA's settings (``optim.settings``, their one definition) as ``adaprelora_*`` fields
    right after field ``after``, so ``--help`` lists them with the other optimizer flags."""
    def add(cls):
        generated = dataclass_fields(help_prefix="AdaPreLoRA: ")
        annotations, ordered = cls.__dict__["__annotations__"], {}
        for name, annotation in annotations.items():
            ordered[name] = annotation
            if name == after:
                ordered.update({flag: kind for flag, kind, _ in generated})
        cls.__annotations__ = ordered
        for flag, _, spec in generated:
            setattr(cls, flag, spec)
        return cls
    return add


@dataclass
@_with_adaprelora_settings(after="adam_epsilon")
class TrainConfig:
    # model
    pretrained_model_name_or_path: str | None = _help(
        "diffusers folder, hub id, or single-file .safetensors/.ckpt; omitted: the tiny demo model pretrained on shapes, shipped in the package",
        default=None,
    )
    revision: str | None = _help("model revision (hub)", default=None)
    variant: str | None = _help("weights variant, e.g. fp16", default=None)
    pretrained_vae_model_name_or_path: str | None = _help("a VAE to use instead of the model's (e.g. SDXL's fp16-safe VAE)", default=None)
    # data
    instance_data_dir: str | None = _help("folder of subject images (default with the tiny model: the demo subject)", default=None)
    instance_prompt: str | None = _help("prompt with the identifier, e.g. 'a photo of sks dog'", default=None)
    class_data_dir: str | None = _help("class images for prior preservation (generated if too few)", default=None)
    class_prompt: str | None = _help("prompt of the class, e.g. 'a photo of a dog'", default=None)
    with_prior_preservation: bool = _help("add the prior-preservation loss", default=False)
    prior_loss_weight: float = _help("weight of the prior-preservation loss", default=1.0)
    num_class_images: int | None = _help("class images to use (generated when missing)", default=None)
    sample_batch_size: int = _help("batch size when generating class images", default=4)
    resolution: int | None = _help("training resolution, divisible by 8 (default 512; 1024 for SDXL; 64 with the tiny model)", default=None)
    center_crop: bool = _help("center crop instead of random crop", default=False)
    random_flip: bool = _help("random horizontal flips", default=False)
    repeats: int = _help("times each instance image is used per epoch", default=1)
    dataloader_num_workers: int = _help("DataLoader worker processes", default=0)
    # LoRA
    rank: int = _help("LoRA rank", default=4)
    lora_alpha: float | None = _help("LoRA alpha (default: rank)", default=None)
    lora_dropout: float = _help("LoRA dropout", default=0.0)
    lora_target_modules: str | None = _help(f"UNet targets: a preset ({', '.join(LORA_TARGET_PRESETS)}) or a comma list "
                                            "(default attention; all with the tiny pretrained model)", default=None)
    use_rslora: bool = _help("scale by alpha / sqrt(rank)", default=False)
    train_text_encoder: bool = _help("also train LoRA on the text encoder", default=False)
    # optimization
    optimizer: str = _help(f"one of: {', '.join(OPTIMIZERS)}", default="adaprelora")
    learning_rate: float | None = _help("learning rate (AdaPreLoRA: on W, as Adam's on a full weight; default 1e-4, or "
                                        "the recommended lr of a model that names one, as the embedded demo model does)", default=None)
    text_encoder_lr: float | None = _help("learning rate of the text encoder LoRA (default: learning_rate)", default=None)
    scale_lr: bool = _help("multiply lr by accumulation x batch size x processes", default=False)
    adam_beta1: float = _help("Adam's first-moment decay (AdamW; AdaPreLoRA: of its AdamW group)", default=0.9)
    adam_beta2: float = _help("Adam's second-moment decay (AdamW; AdaPreLoRA: of its AdamW group)", default=0.999)
    adam_weight_decay: float = _help("decoupled weight decay", default=1e-2)
    adam_epsilon: float = _help("AdamW epsilon (AdaPreLoRA: of its AdamW group)", default=1e-8)
    loraplus_lr_ratio: float = _help("LoRA+: B's lr / A's lr", default=16.0)
    scaled_adamw_reg: float = _help("scaled AdamW (Riemannian) damping", default=1e-2)
    lorapro_damping: float = _help("LoRA-Pro relative damping", default=0.1)
    lr_scheduler: str = _help("constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial", default="constant")
    lr_warmup_steps: int = _help("warmup steps", default=0)
    lr_num_cycles: int = _help("cycles of cosine_with_restarts", default=1)
    lr_power: float = _help("power of the polynomial scheduler", default=1.0)
    max_grad_norm: float | None = _help("gradient clipping norm (<= 0: off)", default=1.0)
    train_batch_size: int = _help("batch size per device", default=1)
    max_train_steps: int | None = _help("optimizer steps (default 500; 60 with the tiny model); overrides --num_train_epochs", default=None)
    num_train_epochs: int | None = _help("train this many epochs (passes over the instance images x repeats) instead of --max_train_steps", default=None)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    gradient_checkpointing: bool = _help("trade compute for memory", default=False)
    mixed_precision: str = _help("no, fp16 or bf16 (LoRA weights stay float32)", default="no")
    snr_gamma: float | None = _help("min-SNR weighting gamma (5.0 is common)", default=None)
    noise_offset: float = _help("noise offset", default=0.0)
    cache_latents: bool = _help("encode the images once (fixes their augmentation)", default=False)
    seed: int = _help("seed: same seed, same run", default=0)
    max_consecutive_nonfinite: int = _help("stop after this many non-finite losses in a row", default=5)
    cpu: bool = _help("train on CPU even if a GPU is present (Accelerator(cpu=True))", default=False)
    allow_tf32: bool = _help("allow TF32 matmuls on Ampere+ GPUs (faster; no effect without CUDA, which is logged)", default=False)
    enable_xformers_memory_efficient_attention: bool = _help("use xformers attention (needs the xformers package; "
                                                             "PyTorch's own SDPA attention is used otherwise)", default=False)
    use_8bit_adam: bool = _help("bitsandbytes' 8-bit AdamW for --optimizer adamw (needs bitsandbytes and a CUDA GPU)", default=False)
    class_labels_conditioning: str | None = _help("pass 'timesteps' as the UNet's class labels (only for UNets with a class embedding)", default=None)
    image_interpolation_mode: str = _help(f"resampling when resizing images: {', '.join(INTERPOLATION_MODES)} (diffusers' "
                                          "default is lanczos)", default="bicubic")
    tokenizer_name: str | None = _help("load the tokenizer from this folder or hub id instead of the model's", default=None)
    tokenizer_max_length: int | None = _help("tokens per prompt (default: the tokenizer's model_max_length)", default=None)
    text_encoder_use_attention_mask: bool = _help("pass the padding mask to the text encoder (SD 1.x/2.x)", default=False)
    pre_compute_text_embeddings: bool = _help("encode each prompt once (always done with a frozen text encoder; "
                                              "incompatible with --train_text_encoder)", default=False)
    prior_generation_precision: str | None = _help("precision of class-image generation: fp32, fp16 or bf16 "
                                                   "(default: the training precision)", default=None)
    local_rank: int = _help("set by launchers; the process rank comes from the environment (LOCAL_RANK)", default=-1)
    debug: bool = _help("print the full traceback of an error (otherwise one line names the cause and the fix)", default=False)
    # validation and logging
    validation_prompt: str | None = _help("prompt for sample images (default: the instance prompt)", default=None)
    num_validation_images: int | None = _help("sample images per validation", default=None)
    validation_steps: int | None = _help("validate every N steps (0: only at start and end)", default=None)
    validation_epochs: int | None = _help("validate every N epochs instead of --validation_steps", default=None)
    skip_initial_validation: bool = _help("no samples before the first step (the base model's, validation/step-000000): "
                                          "one validation less, minutes on a CPU", default=False)
    validation_images: str | None = _help("input images for image-conditioned validation (upscalers, variations): "
                                          "not applicable to text-to-image SD/SDXL, refused", default=None, nargs="+")
    num_validation_inference_steps: int | None = _help("sampler steps for sample images", default=None)
    report_to: str = _help("tensorboard or none", default="tensorboard")
    logging_dir: str = _help("log folder, inside output_dir", default="logs")
    # output and checkpoints
    output_dir: str = _help("where the LoRA, samples and checkpoints go", default="dreambooth-lora")
    overwrite_output_dir: bool = _help("allow an output folder that holds another run", default=False)
    checkpointing_steps: int | None = _help("save a resumable checkpoint every N steps", default=None)
    checkpoints_total_limit: int | None = _help("keep at most N checkpoints", default=None)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint folder", default=None)
    output_kohya_format: bool = _help("also write a kohya-format .safetensors", default=False)
    push_to_hub: bool = _help("upload the output folder (LoRA, card, samples; not checkpoints) to the Hub at the end", default=False)
    hub_model_id: str | None = _help("Hub repo for --push_to_hub (default: the output folder's name)", default=None)
    hub_token: str | None = _help("Hub token for --push_to_hub (default: the logged-in token)", default=None)

    # -- derived -------------------------------------------------------------------------
    def resolved(self, model_defaults: Mapping[str, Any] | None = None) -> TrainConfig:
        """Fill the model-dependent defaults that are still unset: the model's recommended ones
        (``model_loading.model_defaults``), else those of a real run. A model's default subject
        (``instance_data_dir`` with its ``instance_prompt``) is used only when no folder was given."""
        recommended = dict(model_defaults or {})
        unknown = set(recommended) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"The model recommends unknown training settings {sorted(unknown)}: its adaprelora_model.json "
                             "was written for another version of this trainer.")
        if self.instance_data_dir is not None:
            recommended.pop("instance_data_dir", None)
            recommended.pop("instance_prompt", None)
        defaults = {**REAL_DEFAULTS, **recommended}
        if self.num_train_epochs is not None:
            defaults.pop("max_train_steps")  # the trainer derives it from the epochs once the data is known
        if self.validation_epochs is not None:
            defaults.pop("validation_steps")
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def optimizer_settings(self) -> dict[str, Any]:
        """The settings `optim.optimizer_kwargs` maps to each optimizer's arguments."""
        settings = normalized({f.name: getattr(self, f.name) for f in fields(self)})
        settings.update(betas=(self.adam_beta1, self.adam_beta2), weight_decay=self.adam_weight_decay)
        return settings

    def unet_targets(self) -> tuple[str, ...]:
        if self.lora_target_modules is None:
            raise ValueError("lora_target_modules is unset: call resolved() first")
        if self.lora_target_modules in LORA_TARGET_PRESETS:
            return LORA_TARGET_PRESETS[self.lora_target_modules]
        return tuple(t.strip() for t in self.lora_target_modules.split(",") if t.strip())

    def validate(self) -> None:
        """Reject bad settings before anything is loaded, each with the fix."""
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
        need(self.resolution is None or (self.resolution > 0 and self.resolution % 8 == 0),
             f"--resolution {self.resolution} must be a positive multiple of 8 (the VAE downsamples by 8), e.g. 512.")
        need(self.rank >= 1, f"--rank must be >= 1, got {self.rank}.")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        need(0.0 <= self.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        need(self.lora_target_modules is None or bool(self.unet_targets()), "--lora_target_modules is empty; use a preset such as 'attention'.")
        for flag in ("learning_rate", "text_encoder_lr"):
            if getattr(self, flag) is not None and lr_problem(getattr(self, flag)):
                problems.append(lr_problem(getattr(self, flag), f"--{flag}"))
        need(self.train_batch_size >= 1, f"--train_batch_size must be >= 1, got {self.train_batch_size}.")
        need(self.gradient_accumulation_steps >= 1, f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")
        need(self.max_train_steps is None or self.max_train_steps >= 1, f"--max_train_steps must be >= 1, got {self.max_train_steps}.")
        need(self.mixed_precision in ("no", "fp16", "bf16"), f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        need(self.report_to in ("tensorboard", "none"), f"--report_to must be tensorboard or none, got {self.report_to!r}.")
        problems += settings_problems({f.name: getattr(self, f.name) for f in fields(self)})
        need(self.checkpointing_steps is None or self.checkpointing_steps >= 1, f"--checkpointing_steps must be >= 1, got {self.checkpointing_steps}.")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             f"--checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}.")
        need(self.max_consecutive_nonfinite >= 1, f"--max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}.")
        need(self.snr_gamma is None or self.snr_gamma > 0, f"--snr_gamma must be > 0, got {self.snr_gamma}.")
        need(self.prior_loss_weight >= 0, f"--prior_loss_weight must be >= 0, got {self.prior_loss_weight}.")
        need(self.image_interpolation_mode in INTERPOLATION_MODES,
             f"--image_interpolation_mode must be one of {', '.join(INTERPOLATION_MODES)}, got {self.image_interpolation_mode!r}.")
        need(self.num_train_epochs is None or self.num_train_epochs >= 1, f"--num_train_epochs must be >= 1, got {self.num_train_epochs}.")
        need(self.validation_epochs is None or self.validation_epochs >= 1, f"--validation_epochs must be >= 1, got {self.validation_epochs}.")
        need(self.validation_epochs is None or self.validation_steps is None,
             "--validation_epochs and --validation_steps both set the validation interval: keep one.")
        need(not self.validation_images, "--validation_images feeds image-conditioned pipelines (upscalers, image variation); "
             "SD 1.x/2.x and SDXL validation here is text-to-image from --validation_prompt: drop --validation_images.")
        need(not (self.pre_compute_text_embeddings and self.train_text_encoder),
             "--pre_compute_text_embeddings cannot be used with --train_text_encoder (the embeddings change as it trains).")
        need(self.class_labels_conditioning in (None, "timesteps"),
             f"--class_labels_conditioning supports only 'timesteps', got {self.class_labels_conditioning!r}.")
        need(self.prior_generation_precision in (None, "no", "fp32", "fp16", "bf16"),
             f"--prior_generation_precision must be fp32, fp16 or bf16, got {self.prior_generation_precision!r}.")
        need(self.tokenizer_max_length is None or self.tokenizer_max_length >= 1,
             f"--tokenizer_max_length must be >= 1, got {self.tokenizer_max_length}.")
        need(not self.use_8bit_adam or self.optimizer == "adamw",
             f"--use_8bit_adam replaces AdamW; it does not apply to --optimizer {self.optimizer}: add --optimizer adamw or drop it.")
        need(not self.use_8bit_adam or importlib.util.find_spec("bitsandbytes") is not None,
             "--use_8bit_adam needs bitsandbytes (CUDA GPUs): pip install bitsandbytes, or drop the flag.")
        need(not self.enable_xformers_memory_efficient_attention or importlib.util.find_spec("xformers") is not None,
             "--enable_xformers_memory_efficient_attention needs xformers (pip install xformers, CUDA GPUs); without it PyTorch's "
             "scaled-dot-product attention is used, which is as memory efficient: drop the flag.")
        need(not self.push_to_hub or os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"),
             "--push_to_hub with HF_HUB_OFFLINE set cannot upload: unset HF_HUB_OFFLINE or drop --push_to_hub (the LoRA is saved locally either way).")
        if self.with_prior_preservation:
            need(bool(self.class_prompt), "--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog').")
            need(bool(self.class_data_dir), "--with_prior_preservation needs --class_data_dir (a folder; missing images are generated).")
        else:
            need(self.class_data_dir is None and self.class_prompt is None,
                 "--class_data_dir/--class_prompt are only used with --with_prior_preservation: add that flag or drop them.")
        if problems:
            raise ValueError("Invalid training settings:\n  - " + "\n  - ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DreamBooth LoRA for Stable Diffusion, optimized by AdaPreLoRA. With no arguments: a demo run "
        "on the tiny pretrained demo model (shipped in the package) and the demo subject.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        if f.metadata.get("nargs"):
            parser.add_argument(flag, type=kind, default=f.default, help=help_text, nargs=f.metadata["nargs"])
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = normalized(vars(args))  # AdaPreLoRA's "off" spellings (--adaprelora_clip_threshold 0) -> None
    if values["max_grad_norm"] is not None and values["max_grad_norm"] <= 0:
        values["max_grad_norm"] = None
    return TrainConfig(**values)


#: flags whose "off" (None) is spelled as 0 on the command line (parse_config turns <= 0 into None)
_OFF_AS_ZERO = ("max_grad_norm", *(s.flag for s in ADAPRELORA_SETTINGS if s.off is not None))


def command_line(config: TrainConfig | Mapping[str, Any]) -> list[str]:
    """The flags that make ``parse_config`` build this config again: every value that differs from
    the default (the web app shows each job's command this way, to repeat it on another machine)."""
    values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config)
    args: list[str] = []
    for f in fields(TrainConfig):
        value = values.get(f.name, f.default)
        if value == f.default:
            continue
        if value is None:
            if f.name in _OFF_AS_ZERO:
                args += [f"--{f.name}", "0"]
            continue
        if isinstance(value, bool):
            args += [f"--{f.name}"] if value else []
        elif isinstance(value, (list, tuple)):
            args += [f"--{f.name}", *map(str, value)]
        else:
            args += [f"--{f.name}", repr(value) if isinstance(value, float) else str(value)]
    return args
