"""The DreamBooth LoRA training loop, callable as a library function.

`train(config, progress=..., should_stop=...)` is what the command line and the web app call. It
reports progress through a callback and stops cooperatively (saving a checkpoint) when
`should_stop()` turns true, so a caller can drive it in-process or in a subprocess.

It reads top to bottom as its phases: `_set_up` (accelerator, models with LoRA, data, optimizer,
resume), `_train_steps` (micro-batches, one optimizer step, what follows a step), `_finish`
(weights, samples, model card). The phases share one context object, `Run`.

Reproducibility is by construction rather than by saving random states: each micro-step
reseeds torch from (seed, step, micro-step, rank), each sample's noise and timestep come from
a generator keyed by (seed, step, micro-step, its position in the global batch), and data
order and augmentation depend only on (seed, epoch, index). A resumed run therefore continues
bit-identically, and N processes with batch b draw the same noise as one process with batch N*b.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..engine.accelerator import check_ranks_in_sync, fresh_accelerator_state, let_collectives_settle
from ..engine.checkpoints import (LoopState, list_checkpoints, load_checkpoint, read_run_config,
                                  remove_stale_temporaries, resolve_checkpoint, save_checkpoint)
from ..engine.divergence import DivergenceCheck
from ..engine.errors import TrainingError
from ..engine.lock import OutputLock
from ..engine.nonfinite import NonFiniteGuard
from ..engine.progress import ProgressEvent
from ..engine.randomness import mix
from ..optim import make_optimizer, optimizer_kwargs
from ..optim.settings import normalized, setting_flags
from .config import TrainConfig
from .data import DreamBoothDataset, EpochShuffleSampler, collate_fn, scan_image_folder
from .diffusion_loss import encode_prompts, micro_batch_loss
from .latent_cache import LatentCache, collate_latents
from .lora_files import LORA_WEIGHT_NAME, save_kohya_lora, save_lora_weights
from .lora_setup import LORA_ROLES, adapters_disabled, attach_lora, trainable_parameters, trained_params_by_name
from .model_loading import SDComponents, load_pipeline_components, model_defaults, resolve_model_source, source_is_sdxl

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "ProgressEvent", "TrainingError", "RUN_CONFIG_NAME", "KOHYA_WEIGHT_NAME"]

RUN_CONFIG_NAME = "training_config.json"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
_RESEED = 2  # keyed stream of the per-micro-step torch reseed (dropout and the like)


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path | None
    kohya_path: Path | None
    global_step: int
    stopped_early: bool
    skipped_steps: int
    seconds: float
    final_loss: float | None
    validation_images: list[Path] = field(default_factory=list)


@dataclass
class Run:
    """What the phases of one training run share."""

    config: TrainConfig
    output_dir: Path
    accelerator: Accelerator
    models: SDComponents
    weight_dtype: torch.dtype
    emit: Callable[[ProgressEvent], None]
    stop: Callable[[], bool]
    on_step: Callable[[int, dict[str, Any], torch.optim.Optimizer], None] | None
    started: float
    dataset: DreamBoothDataset | None = None
    dataloader: Any = None
    sampler: EpochShuffleSampler | None = None
    prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: Any = None
    lr_scheduler: Any = None
    trained: list[Any] = field(default_factory=list)  # the prepared modules that carry LoRA
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable tensors by saved name
    state: LoopState = field(default_factory=LoopState)
    recent_losses: list[float] = field(default_factory=list)
    validation_paths: list[Path] = field(default_factory=list)
    stopped: bool = False
    guard: NonFiniteGuard | None = None
    divergence: DivergenceCheck | None = None
    lock: OutputLock | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def train(
    config: TrainConfig,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, dict[str, Any], torch.optim.Optimizer], None] | None = None,
) -> TrainResult:
    """Train a DreamBooth LoRA as `config` says; see the module docstring.

    ``on_step(step, models, optimizer)``, if given, runs on the main process after every optimizer
    step (and with step 0 before the first step of a run that is not resumed), with the unwrapped
    ``unet``, ``text_encoder``, ``vae``, ``tokenizer`` and ``noise_scheduler`` in ``models``: the
    quality benchmark measures held-out metrics through it without a second copy of this loop.
    It must not change them.
    """
    run = _set_up(config, progress, should_stop, on_step)
    try:
        _train_steps(run)
        return _finish(run)
    finally:
        if run.lock is not None:
            run.lock.release()


# -- set-up ---------------------------------------------------------------------------------
def _set_up(config, progress, should_stop, on_step) -> Run:
    started = time.perf_counter()
    config, output_dir, resume_path, sdxl = _resolve(config)
    fresh_accelerator_state()
    # SDXL conditions on the first text encoder's penultimate layer: its last layer's LoRA gets no
    # gradient, which DDP must be told about (diffusers' SDXL scripts do the same).
    unused = config.train_text_encoder and sdxl
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
        cpu=config.cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    lock = OutputLock(output_dir).acquire() if accelerator.is_main_process else None  # before anything is written
    try:
        if lock is not None:
            stale = remove_stale_temporaries(output_dir)
            if stale:
                logger.info("Removed partial files a killed run left in %s: %s", output_dir, ", ".join(stale))
        run = Run(config=config, output_dir=output_dir, accelerator=accelerator,
                  models=load_pipeline_components(config.pretrained_model_name_or_path, revision=config.revision,
                                                  variant=config.variant, vae=config.pretrained_vae_model_name_or_path,
                                                  tokenizer=config.tokenizer_name),
                  weight_dtype=weight_dtype, emit=progress or (lambda event: None), stop=should_stop or (lambda: False),
                  on_step=on_step, started=started, lock=lock)
        _attach_lora(run)
        _build_data(run)
        _build_optimizer(run)
        _resume(run, resume_path)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if run.is_main:  # the run's settings, as applied (a resumed run's changed lr included)
        (output_dir / RUN_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    if run.is_main and config.report_to != "none":
        hparams = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dreambooth-lora", config=hparams)
    return run


def _resolve(config: TrainConfig) -> tuple[TrainConfig, Path, Path | None, bool]:
    """Validate, fill the model-dependent defaults, check the output folder and the resume path."""
    config.validate()
    _, source = resolve_model_source(config.pretrained_model_name_or_path)
    sdxl = source_is_sdxl(config.pretrained_model_name_or_path, config.revision)
    config = config.resolved(model_defaults(source, sdxl=sdxl))
    config.validate()
    output_dir = Path(config.output_dir).resolve()  # relative paths are resolved once, here
    check_output_dir(output_dir, config)
    scan_image_folder(config.instance_data_dir, role="instance")  # bad data fails before the model loads
    resume_path = None
    if config.resume_from_checkpoint:  # before loading anything: a wrong path fails fast
        resume_path = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
        if resume_path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run.", output_dir)
    return config, output_dir, resume_path, sdxl


def check_output_dir(output_dir: Path, config: TrainConfig) -> None:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file; choose a folder.")
    previous = [p.name for p in output_dir.iterdir() if p.name in (LORA_WEIGHT_NAME, RUN_CONFIG_NAME) or p.name.startswith("checkpoint-")]
    if previous and not (config.resume_from_checkpoint or config.overwrite_output_dir):
        raise TrainingError(
            f"--output_dir {output_dir} holds another run ({', '.join(sorted(previous)[:4])}). Continue it with "
            "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or pick another --output_dir."
        )


def _attach_lora(run: Run) -> None:
    """LoRA on the UNet (and text encoder); frozen weights in the compute dtype, LoRA in float32."""
    config, m = run.config, run.models
    if config.allow_tf32:
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            logger.warning("--allow_tf32 has no effect: there is no CUDA device.")
    if config.class_labels_conditioning and getattr(m.unet.config, "class_embed_type", None) is None:
        raise TrainingError("--class_labels_conditioning needs a UNet with a class embedding (class_embed_type is None for "
                            f"{m.source}): drop the flag.")
    if config.enable_xformers_memory_efficient_attention:
        m.unet.enable_xformers_memory_efficient_attention()
    if config.pretrained_model_name_or_path is None:
        logger.warning("No --pretrained_model_name_or_path: training the default model %s with its defaults.", m.source)
    m.vae.requires_grad_(False)
    set_seed(config.seed)  # the LoRA init (Gaussian A) draws from the global generators
    attach_lora(m.unet, m.text_encoders, config)
    for module in (m.unet, m.vae, *m.text_encoders):
        module.to(run.device) if run.weight_dtype == torch.float32 else module.to(run.device, dtype=run.weight_dtype)
    if m.is_sdxl and config.mixed_precision == "fp16" and config.pretrained_vae_model_name_or_path is None:
        m.vae.to(dtype=torch.float32)  # SDXL's original VAE overflows in fp16 (diffusers' SDXL script does the same)
    for p in trainable_parameters(m.unet, *m.text_encoders):
        p.data = p.data.float()
    if config.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for text_encoder in m.text_encoders:
                text_encoder.gradient_checkpointing_enable()


def _build_data(run: Run) -> None:
    """Class images (prior preservation), the dataset, the sampler and loader, the prompt cache."""
    config, m = run.config, run.models
    class_dir = _ensure_class_images(run) if config.with_prior_preservation else None
    dataset = DreamBoothDataset(
        config.instance_data_dir, config.instance_prompt, resolution=config.resolution, center_crop=config.center_crop,
        random_flip=config.random_flip, repeats=config.repeats, class_data_root=class_dir,
        class_prompt=config.class_prompt if class_dir else None,
        max_class_images=config.num_class_images if class_dir else None, seed=config.seed,
        interpolation=config.image_interpolation_mode,
    )
    train_set, collate = dataset, collate_fn
    if config.cache_latents:
        train_set = LatentCache(dataset, m.vae, config.seed, run.device, run.weight_dtype,
                                augmenting=config.random_flip or not config.center_crop)
        collate = collate_latents
    run.dataset = dataset
    run.sampler = EpochShuffleSampler(train_set, seed=config.seed,
                                      pad_to_multiple=config.train_batch_size * run.accelerator.num_processes)
    run.dataloader = torch.utils.data.DataLoader(train_set, batch_size=config.train_batch_size, sampler=run.sampler,
                                                 collate_fn=collate, num_workers=config.dataloader_num_workers)
    _steps_from_epochs(run)
    _warn_long_prompts(dataset, m.tokenizer)
    if not config.train_text_encoder:  # frozen text encoder: each distinct prompt is encoded once
        prompts = {dataset.instance_prompt_for(r) for r in dataset.instance_images}
        if dataset.class_prompt:
            prompts.add(dataset.class_prompt)
        with torch.no_grad():
            for prompt in sorted(prompts):
                hidden, pooled = encode_prompts(m, [prompt], run.device, config.tokenizer_max_length,
                                                config.text_encoder_use_attention_mask)
                run.prompt_cache[prompt] = (hidden[0], pooled[0] if pooled is not None else None)


def _steps_from_epochs(run: Run) -> None:
    """--num_train_epochs / --validation_epochs in optimizer steps, now that the data is known."""
    config = run.config
    if config.num_train_epochs is None and config.validation_epochs is None:
        return
    batches = math.ceil(len(run.dataloader) / run.accelerator.num_processes)  # per process, as accelerate splits it
    steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
    changes = {}
    if config.max_train_steps is None:
        changes["max_train_steps"] = config.num_train_epochs * steps_per_epoch
    if config.validation_epochs is not None:
        changes["validation_steps"] = config.validation_epochs * steps_per_epoch
    run.config = dataclasses.replace(config, **changes)
    logger.info("%d optimizer steps per epoch: %s.", steps_per_epoch, ", ".join(f"--{k} {v}" for k, v in changes.items()))


def _warn_long_prompts(dataset: DreamBoothDataset, tokenizer) -> None:
    """Name the captions the text encoder will cut (CLIP reads 77 tokens)."""
    limit = tokenizer.model_max_length
    long = [r.path.name for r in dataset.instance_images
            if len(tokenizer(dataset.instance_prompt_for(r), truncation=False).input_ids) > limit]
    if dataset.class_prompt and len(tokenizer(dataset.class_prompt, truncation=False).input_ids) > limit:
        long.append("the class prompt")
    if long:
        logger.warning("%d prompt(s) are longer than the text encoder's %d tokens and will be cut: %s. Shorten them "
                       "(the end of a caption is lost).", len(long), limit, ", ".join(long[:10]))


def _ensure_class_images(run: Run) -> str:
    from .prior import ensure_class_images

    config, m = run.config, run.models

    def base_pipeline():
        from .validation import build_pipeline

        return build_pipeline(unet=m.unet, text_encoder=m.text_encoder, vae=m.vae, tokenizer=m.tokenizer,
                              scheduler=m.noise_scheduler, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2)

    precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.prior_generation_precision or "")
    autocast = torch.autocast(run.device.type, dtype=precision) if precision is not None else contextlib.nullcontext()
    if run.is_main:
        with adapters_disabled(m.unet, *m.text_encoders), autocast:
            ensure_class_images(config.class_data_dir, config.class_prompt, config.num_class_images,
                                pipeline_factory=base_pipeline, seed=config.seed, resolution=config.resolution,
                                batch_size=config.sample_batch_size)
    run.accelerator.wait_for_everyone()
    return config.class_data_dir


def _build_optimizer(run: Run) -> None:
    """The optimizer over the LoRA weights, the lr schedule, and accelerate's wrapping."""
    from diffusers.optimization import get_scheduler

    config, m, accelerator = run.config, run.models, run.accelerator
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    models: list[Any] = [m.unet]
    if config.train_text_encoder:
        models += [{"model": te, "lr": config.text_encoder_lr or lr} for te in m.text_encoders]
    name = "adamw8bit" if config.use_8bit_adam else config.optimizer
    optimizer = make_optimizer(name, models, lr=lr, **optimizer_kwargs(name, config.optimizer_settings()))
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    roles = ["unet"] + (["text_encoder", "text_encoder_2"][: len(m.text_encoders)] if config.train_text_encoder else [])
    prepared = accelerator.prepare(*[getattr(m, r) for r in roles], optimizer, run.dataloader, lr_scheduler)
    for role, module in zip(roles, prepared):
        setattr(m, role, module)
    optimizer, run.dataloader, lr_scheduler = prepared[len(roles):]
    run.trained = [getattr(m, r) for r in roles]
    run.optimizer, run.lr_scheduler = optimizer, lr_scheduler
    run.params = trained_params_by_name({role: accelerator.unwrap_model(getattr(m, role)) for role in LORA_ROLES
                                         if getattr(m, role) is not None})


#: Settings a resumed run must share with its checkpoint: changing them makes a different run.
#: The optimizer's own hyper-parameters are among them: its state dict restores the checkpoint's.
#: Everything else (learning rates, schedule, step budget, loss weights, precision, clipping,
#: validation and checkpoint intervals) is read afresh, so a change applies from the resumed step.
FIXED_ON_RESUME = ("pretrained_model_name_or_path", "revision", "variant", "instance_data_dir", "instance_prompt",
                   "class_data_dir", "class_prompt", "with_prior_preservation", "num_class_images", "resolution",
                   "center_crop", "random_flip", "repeats", "rank", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "use_rslora", "train_text_encoder", "optimizer", "train_batch_size", "gradient_accumulation_steps",
                   "cache_latents", "seed", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                   "loraplus_lr_ratio", "scaled_adamw_reg", "lorapro_damping",
                   *setting_flags(lambda setting: setting.fixed_on_resume))
_NOT_SETTINGS = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "logging_dir", "debug")


def _resume(run: Run, resume_path: Path | None) -> None:
    """Restore the checkpoint. Settings that define the run must match it; a new learning rate or
    step budget is applied from the resumed step on (and the run's config records it)."""
    if resume_path is None:
        return
    saved = read_run_config(resume_path) or {}
    changed = [f"--{k} {saved[k]!r} -> {getattr(run.config, k)!r}" for k in FIXED_ON_RESUME
               if k in saved and saved[k] != getattr(run.config, k)]
    if changed:
        raise TrainingError(f"Cannot resume {resume_path} with different settings ({'; '.join(changed)}): resume with the "
                            "checkpoint's values, or start a new run in another --output_dir.")
    applied = [f"--{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(run.config).items()
               if k in saved and k not in _NOT_SETTINGS and saved[k] != v]
    if applied:
        logger.warning("Resuming %s with changed settings, applied from its step on: %s.", resume_path, "; ".join(applied))
    scheduler = getattr(run.lr_scheduler, "scheduler", run.lr_scheduler)
    requested = list(scheduler.base_lrs)  # from this run's --learning_rate / --text_encoder_lr
    run.state = load_checkpoint(resume_path, params=run.params, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                                scaler=run.accelerator.scaler)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    for i, (group, new, old) in enumerate(zip(optimizer.param_groups, requested, list(scheduler.base_lrs))):
        if new != old:  # a LambdaLR-style schedule: lr = base_lr * factor(step), so rescaling is exact
            scheduler.base_lrs[i] = new
            group["initial_lr"] = new
            group["lr"] = group["lr"] * new / old if old else new
            logger.warning("Resuming with learning rate %g for param group %d (the checkpoint had %g), from step %d on.",
                           new, i, old, run.state.global_step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    logger.info("Resumed from %s at step %d.", resume_path, run.state.global_step)


# -- the steps ------------------------------------------------------------------------------
def _train_steps(run: Run) -> None:
    """Micro-batches until max_train_steps optimizer steps are done or the caller asks to stop."""
    config, accelerator, state = run.config, run.accelerator, run.state
    steps_per_epoch = max(1, len(run.dataloader) // config.gradient_accumulation_steps)
    run.emit(ProgressEvent("start", state.global_step, config.max_train_steps,
                           message=f"{len(run.dataset)} examples, {steps_per_epoch} steps/epoch"))
    if state.global_step == 0:
        if not config.skip_initial_validation:
            _validate(run, 0)
        _observe(run, 0)
    run.guard = guard = NonFiniteGuard(
        config.max_consecutive_nonfinite,
        advice="Lower --learning_rate, set --max_grad_norm, or use --mixed_precision no; then resume from the last "
               "checkpoint (--resume_from_checkpoint latest --learning_rate <lower>).")
    run.divergence = DivergenceCheck(lr=config.learning_rate)
    bar = tqdm(total=config.max_train_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_local_main_process)
    micro, step_losses, step_finite = 0, [], True
    try:
        while state.global_step < config.max_train_steps and not run.stopped:
            loader = run.dataloader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(run.dataloader, state.batches_in_epoch)
            # accelerate's loader sets its sampler's epoch from its own counter when iterated
            loader.set_epoch(state.epoch) if hasattr(loader, "set_epoch") else run.sampler.set_epoch(state.epoch)
            batches_seen = state.batches_in_epoch
            for batch in loader:
                batches_seen += 1
                with accelerator.accumulate(*run.trained):
                    loss = _micro_step(run, batch, micro)
                    if micro == 0 and run.divergence.due(state.global_step + 1):
                        _check_divergence(run, batch, loss)
                    micro += 1
                    if loss is None:
                        step_finite = False
                    else:
                        step_losses.append(loss)
                    if accelerator.sync_gradients:
                        applied = _optimizer_step(run, step_finite)
                if not accelerator.sync_gradients:
                    continue
                state.batches_in_epoch = batches_seen
                state.global_step += 1
                if applied:
                    run.recent_losses = (run.recent_losses + [torch.stack(step_losses).mean().item()])[-20:]
                else:
                    state.skipped_steps += 1
                guard.record(applied, state.global_step)
                micro, step_losses, step_finite = 0, [], True
                if _after_step(run, bar):
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    finally:  # also on a second Ctrl-C (the CLI turns the first into a cooperative stop)
        bar.close()


def _positions(run: Run, batch) -> list[int]:
    """Each instance row's position in the global batch (the key of its noise and timestep)."""
    return [run.accelerator.process_index * run.config.train_batch_size + i for i in range(batch["num_instance"])]


def _micro_step(run: Run, batch, micro: int) -> torch.Tensor | None:
    """Forward and backward of one micro-batch; None (and no backward) if its loss is not finite on some rank."""
    accelerator = run.accelerator
    for module in run.trained:
        module.train()
    positions = _positions(run, batch)
    torch.manual_seed(mix(run.config.seed, _RESEED, run.state.global_step, micro, accelerator.process_index))
    loss = micro_batch_loss(run, batch, positions, run.state.global_step, micro)
    finite = bool(accelerator.reduce(torch.tensor(float(torch.isfinite(loss)), device=run.device), "min") > 0)
    if not finite:
        return None
    accelerator.backward(loss)
    return loss.detach().float()


def _check_divergence(run: Run, batch, loss: torch.Tensor | None) -> None:
    """The divergence check (engine/divergence.py): this micro-batch's loss against the base model's on the
    same latents, noise and timesteps (the keyed draws repeat), averaged over ranks; stops a diverged run
    before its step is applied."""
    m, step = run.models, run.state.global_step
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), adapters_disabled(m.unet, *m.text_encoders):
        base = micro_batch_loss(run, batch, _positions(run, batch), step, 0).detach().float()
    trained = loss if loss is not None else torch.tensor(float("inf"), device=run.device)
    pair = run.accelerator.reduce(torch.stack([trained.to(run.device), base.to(run.device)]), "mean")
    trained, base = pair.tolist()
    logger.debug("Divergence check at step %d: loss %.4g, base model %.4g.", step + 1, trained, base)
    if run.divergence.record(step + 1, trained, base):
        raise run.divergence.error(run.output_dir if run.is_main else None)


def _optimizer_step(run: Run, grads_finite: bool) -> bool:
    """Clip, step and zero the gradients; returns whether the step was applied (all finite)."""
    config = run.config
    applied = grads_finite
    if applied and config.max_grad_norm:
        norm = run.accelerator.clip_grad_norm_(trainable_parameters(*run.trained), config.max_grad_norm)
        applied = bool(torch.isfinite(torch.as_tensor(norm)))
    if applied:
        run.optimizer.step()
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return applied


def _after_step(run: Run, bar) -> bool:
    """Report, validate and checkpoint after optimizer step; True when the loop should end."""
    config, state = run.config, run.state
    current_lr = run.lr_scheduler.get_last_lr()[0]
    loss = run.recent_losses[-1] if run.recent_losses else None
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "nan", lr=f"{current_lr:.2e}")
    if run.is_main and config.report_to != "none" and loss is not None:
        run.accelerator.log({"loss": loss, "lr": current_lr}, step=state.global_step)
    run.emit(ProgressEvent("step", state.global_step, config.max_train_steps, loss=loss, lr=current_lr))
    _observe(run, state.global_step)
    done = state.global_step >= config.max_train_steps
    if config.validation_steps and state.global_step % config.validation_steps == 0 and not done:
        _validate(run, state.global_step)
    run.stopped = run.stop() and not done
    if config.checkpointing_steps and (state.global_step % config.checkpointing_steps == 0 or run.stopped):
        _checkpoint(run)
    return done or run.stopped


def _observe(run: Run, step: int) -> None:
    if run.on_step is not None and run.is_main:
        m, unwrap = run.models, run.accelerator.unwrap_model
        models = dict(unet=unwrap(m.unet), text_encoder=unwrap(m.text_encoder), vae=m.vae, tokenizer=m.tokenizer,
                      noise_scheduler=m.noise_scheduler)
        if m.is_sdxl:
            models.update(text_encoder_2=unwrap(m.text_encoder_2), tokenizer_2=m.tokenizer_2)
        run.on_step(step, models, getattr(run.optimizer, "optimizer", run.optimizer))


def _checkpoint(run: Run) -> None:
    """A checkpoint from every rank's point of view: barrier, the main process writes, barrier."""
    run.accelerator.wait_for_everyone()
    if run.is_main:
        _write_checkpoint(run)
    run.accelerator.wait_for_everyone()


def _write_checkpoint(run: Run) -> Path | None:
    """Save a checkpoint (main process), unless the state may be diverged (the last step was skipped,
    or a weight is not finite): then the previous checkpoint stays the newest, so `latest` never
    points at garbage."""
    if run.guard is not None and run.guard.consecutive:
        logger.warning("Step %d was skipped (non-finite loss or gradient): no checkpoint is written from it.",
                       run.state.global_step)
        return None
    if not all(torch.isfinite(p).all() for p in run.params.values()):
        logger.warning("The LoRA weights are not finite at step %d: no checkpoint is written.", run.state.global_step)
        return None
    path = save_checkpoint(run.output_dir, run.state, params=run.params, optimizer=run.optimizer,
                           lr_scheduler=run.lr_scheduler, scaler=run.accelerator.scaler,
                           total_limit=run.config.checkpoints_total_limit, run_config=dataclasses.asdict(run.config))
    run.emit(ProgressEvent("checkpoint", run.state.global_step, run.config.max_train_steps, message=str(path)))
    return path


def _validate(run: Run, step: int, final: bool = False) -> None:
    """Sample images with the current LoRA (a no-op when there is nothing to sample)."""
    config, m, accelerator = run.config, run.models, run.accelerator
    if not run.is_main or not config.num_validation_images:
        return
    from .validation import generate_images, log_images, save_validation_images

    prompt = config.validation_prompt or config.instance_prompt
    images = generate_images(
        unet=accelerator.unwrap_model(m.unet), text_encoder=accelerator.unwrap_model(m.text_encoder), vae=m.vae,
        text_encoder_2=accelerator.unwrap_model(m.text_encoder_2) if m.is_sdxl else None, tokenizer_2=m.tokenizer_2,
        tokenizer=m.tokenizer, scheduler_config=m.noise_scheduler.config, prompt=prompt,
        num_images=config.num_validation_images, seed=config.seed, resolution=config.resolution,
        num_inference_steps=config.num_validation_inference_steps, device=accelerator.device,
        autocast_dtype=run.weight_dtype if run.weight_dtype != torch.float32 else None,
    )
    run.validation_paths += save_validation_images(images, run.output_dir, step, prompt)
    if config.report_to != "none":
        log_images(accelerator.trackers, images, step, tag="validation_final" if final else "validation")
    run.emit(ProgressEvent("validation", step, config.max_train_steps, images=images, message=prompt))


# -- finish ---------------------------------------------------------------------------------
def _finish(run: Run) -> TrainResult:
    """Save the LoRA (both formats), sample the final images, write the model card."""
    config, m, accelerator, state = run.config, run.models, run.accelerator, run.state
    accelerator.wait_for_everyone()
    check_ranks_in_sync(accelerator, run.params)
    let_collectives_settle(accelerator)
    lora_path = kohya_path = None
    if run.is_main:
        raw_unet = accelerator.unwrap_model(m.unet)
        raw_te = accelerator.unwrap_model(m.text_encoder) if config.train_text_encoder else None
        raw_te2 = accelerator.unwrap_model(m.text_encoder_2) if config.train_text_encoder and m.is_sdxl else None
        if not all(torch.isfinite(p).all() for p in run.params.values()):
            raise TrainingError("The LoRA weights are not finite; nothing was saved. Resume from the last checkpoint with a lower --learning_rate.")
        if run.stopped and not config.checkpointing_steps:
            _write_checkpoint(run)
        try:
            lora_path = save_lora_weights(run.output_dir, raw_unet, raw_te, text_encoder_2=raw_te2)
            if config.output_kohya_format:
                kohya_path = save_kohya_lora(run.output_dir / KOHYA_WEIGHT_NAME, raw_unet, raw_te, text_encoder_2=raw_te2,
                                             output_name=run.output_dir.name, base_model_version=m.base_model_version)
        except Exception as err:  # a full disk (OSError, or torch/safetensors' own error types)
            raise TrainingError(_final_save_failed(run, err)) from err
    if not run.stopped:
        _validate(run, state.global_step, final=True)
    if run.is_main:
        _write_card(run, kohya_path)
        if config.push_to_hub:
            _push_to_hub(run)
    accelerator.end_training()
    recent = run.recent_losses
    result = TrainResult(output_dir=run.output_dir, lora_path=lora_path, kohya_path=kohya_path, global_step=state.global_step,
                         stopped_early=run.stopped, skipped_steps=state.skipped_steps,
                         seconds=time.perf_counter() - run.started, final_loss=sum(recent) / len(recent) if recent else None,
                         validation_images=run.validation_paths)
    run.emit(ProgressEvent("stopped" if run.stopped else "done", state.global_step, config.max_train_steps,
                           loss=result.final_loss, message=str(lora_path)))
    if hasattr(run.optimizer, "optimizer") and hasattr(run.optimizer.optimizer, "close"):
        run.optimizer.optimizer.close()  # AdaPreLoRA's gradient hooks
    return result


def _final_save_failed(run: Run, err: Exception) -> str:
    """Keep the trained weights in a checkpoint when the LoRA file cannot be written; say how to export."""
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    newest = list_checkpoints(run.output_dir)
    kept = newest[-1] if newest and newest[-1].name == f"checkpoint-{run.state.global_step}" else None
    if kept is None:
        try:
            kept = _write_checkpoint(run)
        except TrainingError:
            kept = None
    if kept is not None:
        return (f"Could not write the LoRA weights to {run.output_dir} ({reason}). The trained state is kept in {kept}: "
                f"fix that (a full disk: free space), then export it with the same command plus --resume_from_checkpoint latest.")
    older = f" The newest checkpoint is {newest[-1]}." if newest else ""
    return (f"Could not write the LoRA weights to {run.output_dir} ({reason}), nor a checkpoint of step "
            f"{run.state.global_step}.{older} Free disk space, then resume with --resume_from_checkpoint latest.")


def _push_to_hub(run: Run) -> None:
    """Upload the output folder (LoRA files, card, samples, config) with huggingface_hub."""
    from huggingface_hub import create_repo, upload_folder

    config = run.config
    repo_id = config.hub_model_id or run.output_dir.name
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=config.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=run.output_dir, token=config.hub_token, commit_message="adaprelora-diffusion LoRA",
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*", "logs/**"])
    except Exception as err:  # offline, no token, no permission: the hub libraries raise many types
        raise TrainingError(f"Could not push {run.output_dir} to the Hub repo {repo_id} ({type(err).__name__}: {err}). The LoRA "
                            f"is saved locally; upload it later with `hf upload {repo_id} {run.output_dir}`.") from err
    logger.info("Pushed %s to https://huggingface.co/%s", run.output_dir, repo_id)


def _write_card(run: Run, kohya_path: Path | None) -> None:
    from .model_card import write_model_card

    config = run.config
    settings = {k: getattr(config, k) for k in ("optimizer", "learning_rate", "rank", "lora_alpha", "lora_target_modules",
                                                 "train_text_encoder", "max_train_steps", "train_batch_size",
                                                 "gradient_accumulation_steps", "resolution", "mixed_precision", "seed",
                                                 "lr_scheduler", "with_prior_preservation")}
    if config.optimizer == "adaprelora":
        settings.update(normalized({flag: getattr(config, flag) for flag in setting_flags()}))
    settings["steps_trained"] = run.state.global_step
    # step 0's images show the base model, not the LoRA: never present them as its samples
    samples = [p for p in run.validation_paths if p.suffix == ".png" and p.parent.name != "step-000000"][-4:]
    write_model_card(run.output_dir, base_model=run.models.source, instance_prompt=config.instance_prompt,
                     validation_prompt=config.validation_prompt or config.instance_prompt, optimizer=config.optimizer,
                     settings=settings, sample_images=samples, train_text_encoder=config.train_text_encoder,
                     kohya_file=kohya_path, sdxl=run.models.is_sdxl)
