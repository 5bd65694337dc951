"""The denoising loss of one micro-batch: latents, keyed noise and timesteps, the UNet, the loss.

Every random draw is keyed by (seed, stream, step, micro-step, the row's position in the global
batch) (`engine.randomness`), so a resumed run, or N processes with batch b, draw what one
uninterrupted process with batch N*b draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.randomness import keyed_generator, keyed_randn
from .config import TrainConfig

__all__ = ["sample_noise", "denoising_loss", "micro_batch_loss", "CLASS_ROW_OFFSET"]

#: Key offset of prior-preservation rows, so they never share a key with instance rows.
CLASS_ROW_OFFSET = 1_000_000
# Keyed streams (the second key element).
_NOISE, _POSTERIOR = 1, 3


def sample_noise(latents: torch.Tensor, config: TrainConfig, step: int, micro: int, positions: list[int], num_timesteps: int):
    """Noise and timesteps per row, keyed by its position in the global batch."""
    noises, timesteps = [], []
    for pos in positions:
        gen = keyed_generator(config.seed, _NOISE, step, micro, pos)
        noise = torch.randn(latents.shape[1:], generator=gen)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn(latents.shape[1], 1, 1, generator=gen)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=gen))
    return torch.stack(noises).to(latents.device, latents.dtype), torch.cat(timesteps).to(latents.device)


def denoising_loss(model_pred, target, timesteps, noise_scheduler, config: TrainConfig, num_instance: int) -> torch.Tensor:
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


def encode_prompts(models, prompts: list[str], device, max_length: int | None = None,
                   use_attention_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text conditioning: (hidden states, pooled embedding or None).

    SD 1.x/2.x: the text encoder's last hidden states. SDXL (as diffusers' SDXL scripts): both
    encoders' penultimate hidden states side by side, and the second encoder's projected pooled
    embedding.
    """
    def ids(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    if not models.is_sdxl:
        if use_attention_mask:  # --text_encoder_use_attention_mask
            tokens = models.tokenizer(prompts, padding="max_length", max_length=max_length or models.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt")
            return models.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0], None
        return models.text_encoder(ids(models.tokenizer))[0], None
    hidden = []
    for tokenizer, text_encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        out = text_encoder(ids(tokenizer), output_hidden_states=True, return_dict=False)
        hidden.append(out[-1][-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled.view(len(prompts), -1)


def time_ids(batch, resolution: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning per row: original (height, width), crop (top, left), target size."""
    rows = [list(size) + list(crop) + [resolution, resolution]
            for size, crop in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)


def _row_keys(positions: list[int], batch) -> list[int]:
    """Keys of every row: the instance rows' global positions, then the class rows' (offset)."""
    if batch["num_instance"] == len(batch["prompts"]):
        return positions
    return positions + [p + CLASS_ROW_OFFSET for p in positions]


def micro_batch_loss(run, batch, positions: list[int], step: int, micro: int) -> torch.Tensor:
    """The loss of one micro-batch; ``run`` is the trainer's context (models, config, accelerator)."""
    config, m = run.config, run.models
    rows = _row_keys(positions, batch)
    if "latents" in batch:  # --cache_latents
        latents = batch["latents"].to(run.device, dtype=run.weight_dtype)
    else:
        pixels = batch["pixel_values"].to(run.device, dtype=run.weight_dtype)
        with torch.no_grad():
            dist = m.vae.encode(pixels).latent_dist
            # the posterior sample, with noise keyed per row like the diffusion noise
            eps = torch.stack([keyed_randn(dist.mean.shape[1:], config.seed, _POSTERIOR, step, micro, r) for r in rows])
            latents = (dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)) * m.vae.config.scaling_factor
    noise, timesteps = sample_noise(latents, config, step, micro, rows, m.noise_scheduler.config.num_train_timesteps)
    noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
    if config.train_text_encoder:
        encoder_hidden_states, pooled = encode_prompts(m, batch["prompts"], run.device, config.tokenizer_max_length,
                                                       config.text_encoder_use_attention_mask)
    else:
        encoder_hidden_states = torch.stack([run.prompt_cache[p][0] for p in batch["prompts"]])
        pooled = torch.stack([run.prompt_cache[p][1] for p in batch["prompts"]]) if m.is_sdxl else None
    added = None
    if m.is_sdxl:
        added = {"text_embeds": pooled, "time_ids": time_ids(batch, config.resolution, run.device, encoder_hidden_states.dtype)}
    with run.accelerator.autocast():
        class_labels = timesteps if config.class_labels_conditioning == "timesteps" else None
        model_pred = m.unet(noisy, timesteps, encoder_hidden_states, class_labels=class_labels, added_cond_kwargs=added,
                            return_dict=False)[0]
    if m.noise_scheduler.config.prediction_type == "v_prediction":
        target = m.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return denoising_loss(model_pred, target, timesteps, m.noise_scheduler, config, batch["num_instance"])
