"""The DreamBooth LoRA training loop, callable as a library function.

`train(config, progress=..., should_stop=...)` is what `train_dreambooth.py` and the web app
call. It reports progress through a callback and stops cooperatively (saving a checkpoint) when
`should_stop()` turns true, so a caller can drive it in-process or in a subprocess.

Reproducibility is by construction rather than by saving random states: each micro-step
reseeds torch from (seed, step, micro-step, rank), each sample's noise and timestep come from
a generator keyed by (seed, step, micro-step, its position in the global batch), and data
order and augmentation depend only on (seed, epoch, index). A resumed run therefore continues
bit-identically, and N processes with batch b draw the same noise as one process with batch N*b.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from tqdm.auto import tqdm

from ..engine.checkpoints import CheckpointError, LoopState, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import DreamBoothDataset, EpochShuffleSampler, collate_fn
from .lora_files import LORA_WEIGHT_NAME, save_kohya_lora, save_lora_weights
from .lora_setup import attach_lora, trainable_parameters
from .model_loading import load_pipeline_components, resolve_model_source
from ..demo.pretrained_tiny import is_complete_pretrained_pipeline
from ..optim import make_optimizer

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "ProgressEvent", "TrainingError", "RUN_CONFIG_NAME"]

RUN_CONFIG_NAME = "training_config.json"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


@dataclass
class ProgressEvent:
    kind: str  # "start", "step", "validation", "checkpoint", "done", "stopped"
    step: int
    max_steps: int
    loss: float | None = None
    lr: float | None = None
    images: list[Image.Image] = field(default_factory=list)
    message: str = ""


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


# -- set-up helpers -------------------------------------------------------------------------
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic across processes and Python runs)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


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


def _optimizer_kwargs(config: TrainConfig) -> dict[str, Any]:
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adaprelora":
        return dict(betas=betas, weight_decay=config.adam_weight_decay, adamw_eps=config.adam_epsilon,
                    stats=config.adaprelora_stats, damping=config.adaprelora_damping, balance=config.adaprelora_balance,
                    clip_threshold=config.adaprelora_clip_threshold, momentum=config.adaprelora_momentum, seed=config.seed)
    if config.optimizer in ("adamw", "loraplus", "scaled_adamw"):
        kw = dict(betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        if config.optimizer == "loraplus":
            kw["loraplus_lr_ratio"] = config.loraplus_lr_ratio
        if config.optimizer == "scaled_adamw":
            kw["reg"] = config.scaled_adamw_reg
        return kw
    if config.optimizer == "lorapro":
        return dict(damping=config.lorapro_damping, weight_decay=config.adam_weight_decay, betas=betas, adamw_eps=config.adam_epsilon)
    if config.optimizer == "soap":
        return dict(betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    return dict(weight_decay=config.adam_weight_decay)  # adafactor keeps its own second-moment schedule


def _encode_prompts(text_encoder, tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def _sample_noise(latents: torch.Tensor, config: TrainConfig, step: int, micro: int, positions: list[int], num_timesteps: int):
    """Noise and timesteps per sample, keyed by its position in the global batch."""
    noises, timesteps = [], []
    for pos in positions:
        gen = torch.Generator().manual_seed(_mix(config.seed, 1, step, micro, pos))
        noise = torch.randn(latents.shape[1:], generator=gen)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn(latents.shape[1], 1, 1, generator=gen)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=gen))
    return torch.stack(noises).to(latents.device, latents.dtype), torch.cat(timesteps).to(latents.device)


def _lr_scheduler(config: TrainConfig, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def _loss(model_pred, target, timesteps, noise_scheduler, config: TrainConfig, num_instance: int) -> torch.Tensor:
    """Instance loss (min-SNR weighted if asked) plus the weighted prior-preservation loss."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    instance = per_sample[:num_instance]
    if config.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps[:num_instance])
        clipped = torch.minimum(snr, torch.full_like(snr, config.snr_gamma))
        weights = clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr
        instance = instance * weights
    loss = instance.mean()
    if num_instance < per_sample.shape[0]:
        loss = loss + config.prior_loss_weight * per_sample[num_instance:].mean()
    return loss


def _fresh_accelerator_state() -> None:
    """Let one process run `train` several times with different settings (the web app does).

    accelerate keeps its state in process-wide singletons that refuse a second Accelerator with,
    say, another mixed precision. There is no public reset; its own test-suite uses these. The
    process-level state (device, process group) is kept when a process group exists.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    GradientState._reset_state()


# -- the loop -----------------------------------------------------------------------------
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
    started = time.perf_counter()
    config.validate()
    kind, source = resolve_model_source(config.pretrained_model_name_or_path)
    config = config.resolved(tiny=kind == "tiny", pretrained=kind == "tiny" and is_complete_pretrained_pipeline(source))
    config.validate()
    output_dir = Path(config.output_dir).resolve()  # relative paths are resolved once, here
    check_output_dir(output_dir, config)
    resume_path = None
    if config.resume_from_checkpoint:  # before loading anything: a wrong path fails fast
        try:
            resume_path = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
        except CheckpointError as err:
            raise TrainingError(str(err)) from err
        if resume_path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run.", output_dir)
    emit = progress or (lambda event: None)
    stop = should_stop or (lambda: False)

    _fresh_accelerator_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
        cpu=config.cpu,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    components = load_pipeline_components(config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant)
    if components.is_tiny and config.pretrained_model_name_or_path is None:
        logger.warning("No --pretrained_model_name_or_path: training a LoRA on the TINY PRETRAINED demo model (64 px "
                       "coloured shapes) with the demo subject. It shows personalization working on a CPU; it is not a "
                       "useful LoRA for real images.")
    tokenizer, text_encoder, vae, unet, noise_scheduler = (components.tokenizer, components.text_encoder, components.vae,
                                                            components.unet, components.noise_scheduler)
    vae.requires_grad_(False)
    set_seed(config.seed)  # the LoRA init (Gaussian A) draws from the global generators
    attach_lora(unet, text_encoder, config)
    device = accelerator.device
    for module in (unet, vae, text_encoder):  # frozen weights in the compute dtype
        module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    for p in trainable_parameters(unet, text_encoder):  # LoRA weights stay float32 under mixed precision
        p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    class_dir = None
    if config.with_prior_preservation:
        from .prior import ensure_class_images

        def base_pipeline():
            from diffusers import StableDiffusionPipeline

            return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=noise_scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)

        if accelerator.is_main_process:
            with _adapters_disabled(unet, text_encoder):
                ensure_class_images(config.class_data_dir, config.class_prompt, config.num_class_images,
                                    pipeline_factory=base_pipeline, seed=config.seed, resolution=config.resolution,
                                    batch_size=config.sample_batch_size)
        accelerator.wait_for_everyone()
        class_dir = config.class_data_dir

    dataset = DreamBoothDataset(
        config.instance_data_dir, config.instance_prompt, resolution=config.resolution, center_crop=config.center_crop,
        random_flip=config.random_flip, repeats=config.repeats, class_data_root=class_dir,
        class_prompt=config.class_prompt if class_dir else None,
        max_class_images=config.num_class_images if class_dir else None, seed=config.seed,
    )
    train_set, collate = dataset, collate_fn
    if config.cache_latents:
        train_set, collate = _LatentCache(dataset, vae, config, device, weight_dtype), _collate_latents
    sampler = EpochShuffleSampler(train_set, seed=config.seed, pad_to_multiple=config.train_batch_size * accelerator.num_processes)
    dataloader = torch.utils.data.DataLoader(train_set, batch_size=config.train_batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=config.dataloader_num_workers)

    # Frozen text encoder: encode each distinct prompt once instead of every step.
    prompt_cache: dict[str, torch.Tensor] = {}
    if not config.train_text_encoder:
        prompts = {dataset.instance_prompt_for(r) for r in dataset.instance_images}
        if dataset.class_prompt:
            prompts.add(dataset.class_prompt)
        with torch.no_grad():
            for prompt in sorted(prompts):
                prompt_cache[prompt] = _encode_prompts(text_encoder, tokenizer, [prompt], device)[0]

    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    models: list[Any] = [unet]
    if config.train_text_encoder:
        models.append({"model": text_encoder, "lr": config.text_encoder_lr or lr})
    optimizer = make_optimizer(config.optimizer, models, lr=lr, **_optimizer_kwargs(config))
    lr_scheduler = _lr_scheduler(config, optimizer, accelerator.num_processes)

    if config.train_text_encoder:
        unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, dataloader, lr_scheduler)
    else:
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    trained = [unet, text_encoder] if config.train_text_encoder else [unet]
    params = {f"{tag}.{n}": p for tag, m in (("unet", unet), ("text_encoder", text_encoder))
              for n, p in accelerator.unwrap_model(m).named_parameters() if p.requires_grad}

    state = LoopState()
    if resume_path is not None:
        try:
            state = load_checkpoint(resume_path, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                    scaler=accelerator.scaler)
        except CheckpointError as err:
            raise TrainingError(str(err)) from err
        logger.info("Resumed from %s at step %d.", resume_path, state.global_step)

    if accelerator.is_main_process and config.report_to != "none":
        hparams = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dreambooth-lora", config=hparams)

    batches_per_epoch = len(dataloader)
    steps_per_epoch = max(1, batches_per_epoch // config.gradient_accumulation_steps)
    validation_paths: list[Path] = []
    emit(ProgressEvent("start", state.global_step, config.max_train_steps, message=f"{len(dataset)} examples, {steps_per_epoch} steps/epoch"))
    if state.global_step == 0:
        validation_paths += _validate(config, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, weight_dtype, 0, emit)

    def observe(step: int) -> None:
        if on_step is not None and accelerator.is_main_process:
            models = dict(unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoder), vae=vae,
                          tokenizer=tokenizer, noise_scheduler=noise_scheduler)
            on_step(step, models, getattr(optimizer, "optimizer", optimizer))

    if state.global_step == 0:
        observe(0)

    bar = tqdm(total=config.max_train_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_local_main_process)
    recent: list[float] = []
    consecutive_nonfinite = 0
    stopped = False
    micro = 0
    step_losses: list[torch.Tensor] = []
    step_finite = True
    local_bs = config.train_batch_size
    try:
        while state.global_step < config.max_train_steps and not stopped:
            loader = dataloader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
            # accelerate's loader sets its sampler's epoch from its own counter when iterated
            loader.set_epoch(state.epoch) if hasattr(loader, "set_epoch") else sampler.set_epoch(state.epoch)
            batches_seen = state.batches_in_epoch
            for batch in loader:
                batches_seen += 1
                for m in trained:
                    m.train()
                with accelerator.accumulate(*trained):
                    positions = [accelerator.process_index * local_bs + i for i in range(batch["num_instance"])]
                    torch.manual_seed(_mix(config.seed, 2, state.global_step, micro, accelerator.process_index))
                    loss = _micro_step(config, batch, positions, state.global_step, micro, unet, text_encoder, vae, tokenizer,
                                       noise_scheduler, prompt_cache, weight_dtype, device, accelerator)
                    finite = bool(accelerator.reduce(torch.tensor(float(torch.isfinite(loss)), device=device), "min") > 0)
                    if finite:
                        accelerator.backward(loss)
                        step_losses.append(loss.detach().float())
                    else:
                        step_finite = False
                    micro += 1
                    if accelerator.sync_gradients:
                        grad_ok = step_finite
                        if grad_ok and config.max_grad_norm:
                            norm = accelerator.clip_grad_norm_(trainable_parameters(*trained), config.max_grad_norm)
                            grad_ok = bool(torch.isfinite(torch.as_tensor(norm)))
                        if grad_ok:
                            optimizer.step()
                            lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                # one optimizer step done (or skipped)
                state.batches_in_epoch = batches_seen
                state.global_step += 1
                micro = 0
                if grad_ok:
                    consecutive_nonfinite = 0
                    step_loss = torch.stack(step_losses).mean().item() if step_losses else float("nan")
                    recent = (recent + [step_loss])[-20:]
                else:
                    consecutive_nonfinite += 1
                    state.skipped_steps += 1
                    logger.warning("Step %d skipped: non-finite loss or gradient (%d in a row).", state.global_step, consecutive_nonfinite)
                    if consecutive_nonfinite >= config.max_consecutive_nonfinite:
                        raise TrainingError(
                            f"{consecutive_nonfinite} steps in a row had a non-finite loss or gradient (last at step "
                            f"{state.global_step}); stopping without saving those weights. Lower --learning_rate, set "
                            "--max_grad_norm, or use --mixed_precision no; then resume from the last checkpoint."
                        )
                step_losses, step_finite = [], True
                current_lr = lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{recent[-1]:.4f}" if recent else "nan", lr=f"{current_lr:.2e}")
                if accelerator.is_main_process and config.report_to != "none" and recent:
                    accelerator.log({"loss": recent[-1], "lr": current_lr}, step=state.global_step)
                emit(ProgressEvent("step", state.global_step, config.max_train_steps, loss=recent[-1] if recent else None, lr=current_lr))
                observe(state.global_step)

                done = state.global_step >= config.max_train_steps
                if config.validation_steps and state.global_step % config.validation_steps == 0 and not done:
                    validation_paths += _validate(config, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler,
                                                  weight_dtype, state.global_step, emit)
                stopped = stop() and not done
                if config.checkpointing_steps and (state.global_step % config.checkpointing_steps == 0 or stopped):
                    _checkpoint(config, accelerator, output_dir, state, params, optimizer, lr_scheduler, emit)
                if done or stopped:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    finally:  # also on a second Ctrl-C (the CLI turns the first into a cooperative stop)
        bar.close()

    accelerator.wait_for_everyone()
    _check_ranks_in_sync(accelerator, params)
    _let_collectives_settle(accelerator)
    result_lora = kohya = None
    if accelerator.is_main_process:
        raw_unet = accelerator.unwrap_model(unet)
        raw_te = accelerator.unwrap_model(text_encoder) if config.train_text_encoder else None
        if not all(torch.isfinite(p).all() for p in params.values()):
            raise TrainingError("The LoRA weights are not finite; nothing was saved. Resume from the last checkpoint with a lower --learning_rate.")
        if stopped and not config.checkpointing_steps:
            _checkpoint(config, accelerator, output_dir, state, params, optimizer, lr_scheduler, emit)
        result_lora = save_lora_weights(output_dir, raw_unet, raw_te)
        if config.output_kohya_format:
            kohya = save_kohya_lora(output_dir / KOHYA_WEIGHT_NAME, raw_unet, raw_te, output_name=output_dir.name,
                                    base_model_version="sd_v1" if components.is_tiny else None)
    if not stopped:
        validation_paths += _validate(config, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, weight_dtype,
                                      state.global_step, emit, final=True)
    if accelerator.is_main_process:
        _write_card(config, components, output_dir, validation_paths, kohya)
    accelerator.end_training()
    seconds = time.perf_counter() - started
    result = TrainResult(output_dir=output_dir, lora_path=result_lora, kohya_path=kohya, global_step=state.global_step,
                         stopped_early=stopped, skipped_steps=state.skipped_steps, seconds=seconds,
                         final_loss=sum(recent) / len(recent) if recent else None, validation_images=validation_paths)
    emit(ProgressEvent("stopped" if stopped else "done", state.global_step, config.max_train_steps,
                       loss=result.final_loss, message=str(result_lora)))
    if hasattr(optimizer, "optimizer") and hasattr(optimizer.optimizer, "close"):
        optimizer.optimizer.close()
    return result


def _check_ranks_in_sync(accelerator, params: dict[str, torch.Tensor]) -> None:
    """Data-parallel ranks must hold identical LoRA weights; saving rank 0's would hide a bug."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params.values()]).sum().reshape(1).to(accelerator.device)
    gathered = accelerator.gather(checksum)
    if not torch.all(gathered == gathered[0]):
        raise TrainingError(f"Data-parallel ranks hold different LoRA weights (checksums {gathered.tolist()}); this is a bug, please report it.")


def _let_collectives_settle(accelerator) -> None:
    """Avoid a teardown deadlock of torch's gloo backend after the run's last collective.

    Seen with torch 2.13 on CPU (2 processes): when `train` returns, the DDP Reducer is freed
    with the GIL held and its ProcessGroupGloo destructor joins gloo's worker thread, while that
    thread is still destroying the last collective's work object and waits for the GIL to drop
    a tensor's Python reference. A barrier, then a short sleep (which releases the GIL), lets
    the worker finish first. No collective follows this point.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)


def _micro_step(config, batch, positions, step, micro, unet, text_encoder, vae, tokenizer, noise_scheduler, prompt_cache,
                weight_dtype, device, accelerator) -> torch.Tensor:
    rows = _all_positions(positions, batch)
    if "latents" in batch:  # --cache_latents
        latents = batch["latents"].to(device, dtype=weight_dtype)
    else:
        pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            # the posterior sample, with noise keyed per row like the diffusion noise
            latents = (dist.mean + dist.std * _keyed_randn(config, 3, step, micro, rows, dist.mean)) * vae.config.scaling_factor
    noise, timesteps = _sample_noise(latents, config, step, micro, rows, noise_scheduler.config.num_train_timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if config.train_text_encoder:
        ids = tokenizer(batch["prompts"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        encoder_hidden_states = text_encoder(ids)[0]
    else:
        encoder_hidden_states = torch.stack([prompt_cache[p] for p in batch["prompts"]])
    with accelerator.autocast():
        model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return _loss(model_pred, target, timesteps, noise_scheduler, config, batch["num_instance"])


def _all_positions(positions: list[int], batch) -> list[int]:
    """Keys of every row: the instance rows' global positions, then the class rows' (offset)."""
    if batch["num_instance"] == len(batch["prompts"]):
        return positions
    return positions + [p + 1_000_000 for p in positions]


def _keyed_randn(config, stream: int, step: int, micro: int, rows: list[int], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like one row of `like`, drawn per row from its own key."""
    draws = [torch.randn(like.shape[1:], generator=torch.Generator().manual_seed(_mix(config.seed, stream, step, micro, r)))
             for r in rows]
    return torch.stack(draws).to(like.device, like.dtype)


class _LatentCache(torch.utils.data.Dataset):
    """Every example encoded once by the VAE (--cache_latents): no VAE forward per step.

    The crop and flip of each example are those of epoch 0, fixed for the whole run, and the
    posterior sample is drawn once per example (keyed by its index).
    """

    def __init__(self, dataset: DreamBoothDataset, vae, config: TrainConfig, device, dtype):
        if config.random_flip or not config.center_crop:
            logger.warning("--cache_latents fixes each image's random crop/flip to the first epoch's draw.")
        self.items = []
        dataset.set_epoch(0)
        with torch.no_grad():
            for index in range(len(dataset)):
                example = dataset[index]
                item = {"instance_prompt": example["instance_prompt"],
                        "instance_latents": self._encode(vae, example["instance_pixel_values"], config, index, 0, device, dtype)}
                if "class_pixel_values" in example:
                    item["class_prompt"] = example["class_prompt"]
                    item["class_latents"] = self._encode(vae, example["class_pixel_values"], config, index, 1, device, dtype)
                self.items.append(item)

    @staticmethod
    def _encode(vae, pixels, config, index, role, device, dtype) -> torch.Tensor:
        dist = vae.encode(pixels[None].to(device, dtype=dtype)).latent_dist
        gen = torch.Generator().manual_seed(_mix(config.seed, 4, index, role))
        noise = torch.randn(dist.mean.shape[1:], generator=gen).to(device, dist.mean.dtype)
        return ((dist.mean[0] + dist.std[0] * noise) * vae.config.scaling_factor).cpu()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _collate_latents(examples: list[dict]) -> dict:
    latents = [ex["instance_latents"] for ex in examples]
    prompts = [ex["instance_prompt"] for ex in examples]
    if "class_latents" in examples[0]:
        latents += [ex["class_latents"] for ex in examples]
        prompts += [ex["class_prompt"] for ex in examples]
    return {"latents": torch.stack(latents), "prompts": prompts, "num_instance": len(examples)}


class _adapters_disabled:
    """Context: the base model without LoRA (for class images)."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None and hasattr(m, "disable_adapters")]

    def __enter__(self):
        for m in self.models:
            try:
                m.disable_adapters()
            except ValueError:  # no adapter loaded on this model
                pass

    def __exit__(self, *exc):
        for m in self.models:
            try:
                m.enable_adapters()
            except ValueError:
                pass


def _checkpoint(config, accelerator, output_dir, state, params, optimizer, lr_scheduler, emit) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            path = save_checkpoint(output_dir, state, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                   scaler=accelerator.scaler, total_limit=config.checkpoints_total_limit)
        except CheckpointError as err:
            raise TrainingError(str(err)) from err
        emit(ProgressEvent("checkpoint", state.global_step, config.max_train_steps, message=str(path)))
    accelerator.wait_for_everyone()


def _validate(config, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, weight_dtype, step, emit, final=False) -> list[Path]:
    """Sample images with the current LoRA (a no-op when there is nothing to sample)."""
    if not accelerator.is_main_process or not config.num_validation_images:
        return []
    from .validation import generate_images, log_images, save_validation_images

    prompt = config.validation_prompt or config.instance_prompt
    images = generate_images(
        unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoder), vae=vae, tokenizer=tokenizer,
        scheduler_config=noise_scheduler.config, prompt=prompt, num_images=config.num_validation_images, seed=config.seed,
        resolution=config.resolution, num_inference_steps=config.num_validation_inference_steps, device=accelerator.device,
        autocast_dtype=weight_dtype if weight_dtype != torch.float32 else None,
    )
    paths = save_validation_images(images, Path(config.output_dir).resolve(), step, prompt)
    if config.report_to != "none":
        log_images(accelerator.trackers, images, step, tag="validation_final" if final else "validation")
    emit(ProgressEvent("validation", step, config.max_train_steps, images=images, message=prompt))
    return paths


def _write_card(config, components, output_dir, validation_paths, kohya) -> None:
    from .model_card import write_model_card

    settings = {k: getattr(config, k) for k in ("optimizer", "learning_rate", "rank", "lora_alpha", "lora_target_modules",
                                                 "train_text_encoder", "max_train_steps", "train_batch_size",
                                                 "gradient_accumulation_steps", "resolution", "mixed_precision", "seed",
                                                 "lr_scheduler", "with_prior_preservation")}
    if config.optimizer == "adaprelora":
        settings.update({k: getattr(config, k) for k in ("adaprelora_stats", "adaprelora_damping", "adaprelora_balance",
                                                         "adaprelora_clip_threshold")})
    samples = [p for p in validation_paths if p.suffix == ".png"][-4:]
    write_model_card(output_dir, base_model=components.source, instance_prompt=config.instance_prompt,
                     validation_prompt=config.validation_prompt or config.instance_prompt, optimizer=config.optimizer,
                     settings=settings, sample_images=samples, train_text_encoder=config.train_text_encoder,
                     kohya_file=kohya)
