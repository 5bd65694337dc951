"""--cache_latents: every example encoded once by the VAE, so no VAE forward runs per step."""

from __future__ import annotations

import logging

import torch

from ..engine.randomness import keyed_randn
from .data import DreamBoothDataset

__all__ = ["LatentCache", "collate_latents"]

logger = logging.getLogger(__name__)


class LatentCache(torch.utils.data.Dataset):
    """The dataset's examples as VAE latents.

    The crop and flip of each example are those of epoch 0, fixed for the whole run, and the
    posterior sample is drawn once per example (keyed by its index).
    """

    def __init__(self, dataset: DreamBoothDataset, vae, seed: int, device, dtype, augmenting: bool):
        if augmenting:
            logger.warning("--cache_latents fixes each image's random crop/flip to the first epoch's draw.")
        self.items = []
        dataset.set_epoch(0)
        with torch.no_grad():
            for index in range(len(dataset)):
                example = dataset[index]
                item = {k: v for k, v in example.items() if not k.endswith("_pixel_values")}
                item["instance_latents"] = self._encode(vae, example["instance_pixel_values"], seed, index, 0, device, dtype)
                if "class_pixel_values" in example:
                    item["class_latents"] = self._encode(vae, example["class_pixel_values"], seed, index, 1, device, dtype)
                self.items.append(item)

    @staticmethod
    def _encode(vae, pixels, seed, index, role, device, dtype) -> torch.Tensor:
        dist = vae.encode(pixels[None].to(device, dtype=dtype)).latent_dist
        noise = keyed_randn(dist.mean.shape[1:], seed, 4, index, role).to(device, dist.mean.dtype)
        return ((dist.mean[0] + dist.std[0] * noise) * vae.config.scaling_factor).cpu()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_latents(examples: list[dict]) -> dict:
    roles = ["instance", "class"] if "class_latents" in examples[0] else ["instance"]
    return {"latents": torch.stack([ex[f"{role}_latents"] for role in roles for ex in examples]),
            "prompts": [ex[f"{role}_prompt"] for role in roles for ex in examples],
            "num_instance": len(examples),
            "original_sizes": [ex[f"{role}_original_size"] for role in roles for ex in examples],
            "crop_top_lefts": [ex[f"{role}_crop_top_left"] for role in roles for ex in examples]}
