"""T3: DreamBooth personalization of a tiny *pretrained* text-to-image model, through our trainer.

Base model: the tiny Stable Diffusion pipeline pretrained on captioned shape scenes
(:mod:`..pretrained_tiny`); it draws shapes, colours and backgrounds, and has never seen the
subject. Subject: the demo robot of :mod:`..demo_subject` (the five shipped views, the README's
run-command data). Each run is a real call of :func:`..training.train` (the same code path as
``train_dreambooth.py``): cosine or constant lr, its gradient clipping, weight decay, cached
latents, optional prior preservation, measured through its ``on_step`` hook.

Metrics (the first ranks lrs, lower is better; ``fidelity`` is better higher, the drifts lower):

* ``heldout_loss``: epsilon-prediction MSE with the instance prompt on *held-out* views of the
  robot (new poses, sizes, backgrounds from `demo_subject.random_scene`), at fixed timesteps and
  noise: how well the LoRA learned the subject rather than the five training images.
* ``fidelity``: how much generated images of the instance prompt look like the subject, in [0, 1]
  (see `subject_score`). Defined without a learned image encoder (none can be downloaded): the
  robot is the only thing in this world with its orange body and teal head (the pretraining
  palette has neither: the nearest scene colours are 84+ RGB units away), so coverage of those two
  colours, in the proportion the real views have, plus the head being above the body, is
  evidence of the learned subject that the base model cannot produce by chance. The reference
  gives the score of real held-out views, of their VAE reconstructions (the ceiling for any
  LoRA on the UNet: images pass through the frozen decoder) and of the base model (the floor).
* ``class_drift``: mean squared difference between the tuned and the base model's noise
  predictions for the class prompt, on the base model's own class samples (fixed noise and
  timesteps). 0 means the class prompt still behaves as before: this is what prior preservation
  is meant to protect.
* ``class_leak``: `subject_score` of class-prompt samples after tuning minus before (same seeds):
  the visible form of drift, the subject bleeding into its class.
* ``scene_drift``: as ``class_drift`` but on real held-out scenes with their own captions: does
  the model still draw the world it was pretrained on.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaprelora_diffusion.optim.settings import ADAPRELORA_SETTINGS
from adaprelora_diffusion.demo import demo_subject, scenes
from adaprelora_diffusion.demo.descriptor import DEMO_INSTANCE_PROMPT, DEMO_SUBJECT_DIR
from adaprelora_diffusion.dreambooth.config import TrainConfig
from .harness import Config, RunResult, state_bytes

__all__ = ["Personalization", "SIGNATURE_COLORS", "signature_coverage", "subject_score"]

#: The subject's identifying colours and how close (RGB distance) a pixel must be to count.
SIGNATURE_COLORS = {"orange": demo_subject.ORANGE, "teal": demo_subject.TEAL}
COLOR_RADIUS = 45.0
#: A colour counts as fully present at this fraction of the real views' mean coverage: the robot
#: is drawn at many sizes, and the smallest of 40 random views covers ~40% of the mean.
PRESENT_SHARE = 0.35
CLASS_PROMPT = "a photo of a robot"

#: harness Config.kwargs -> TrainConfig fields (the trainer's flags), for the AdaPreLoRA variants: every
#: AdaPreLoRA argument its one settings table maps from a flag (betas, two flags, is handled apart).
_KWARG_FIELDS = {s.keyword: s.flag for s in ADAPRELORA_SETTINGS if s.index is None}


def signature_coverage(image) -> dict[str, tuple[float, float]]:
    """Per signature colour: (fraction of pixels within `COLOR_RADIUS`, mean row of those pixels
    as a fraction of the height, NaN if none)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows = np.arange(pixels.shape[0], dtype=np.float32)[:, None] / pixels.shape[0]
    out = {}
    for name, rgb in SIGNATURE_COLORS.items():
        mask = np.linalg.norm(pixels - np.asarray(rgb, dtype=np.float32), axis=-1) < COLOR_RADIUS
        share = float(mask.mean())
        row = float((mask * rows).sum() / mask.sum()) if mask.any() else math.nan
        out[name] = (share, row)
    return out


def subject_score(image, reference: dict[str, float]) -> float:
    """Subject fidelity of one image in [0, 1]: the mean of, per signature colour, its coverage
    relative to `PRESENT_SHARE` of the real views' mean coverage ``reference[name]`` (capped at 1),
    and whether the teal head sits above the orange body (1 or 0). Colour alone could be a blob;
    the layout term asks for the robot's structure too."""
    cov = signature_coverage(image)
    parts = [min(cov[name][0] / (PRESENT_SHARE * reference[name]), 1.0) for name in SIGNATURE_COLORS]
    teal_row, orange_row = cov["teal"][1], cov["orange"][1]
    parts.append(float(not (math.isnan(teal_row) or math.isnan(orange_row)) and teal_row < orange_row))
    return float(np.mean(parts))


def _timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """``count`` timesteps evenly over the schedule (midpoints of equal bins)."""
    return ((torch.arange(count) + 0.5) * num_train_timesteps / count).long()


class _DenoiseSet:
    """Fixed noisy latents (every image at every timestep, fixed noise) and a prompt per image."""

    def __init__(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor, noise_scheduler, seed: int):
        n, t = latents.shape[0], len(timesteps)
        g = torch.Generator().manual_seed(seed)
        self.x0 = latents.repeat_interleave(t, 0)
        self.t = timesteps.repeat(n)
        self.noise = torch.randn(self.x0.shape, generator=g)
        self.xt = noise_scheduler.add_noise(self.x0, self.noise, self.t)
        self.prompts = [p for p in prompts for _ in range(t)]

    @torch.no_grad()
    def predict(self, unet, text_encoder, tokenizer, chunk: int = 64) -> torch.Tensor:
        unique = sorted(set(self.prompts))
        ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        table = text_encoder(ids)[0]
        hidden = table[torch.tensor([unique.index(p) for p in self.prompts])]
        return torch.cat([unet(self.xt[i : i + chunk], self.t[i : i + chunk], hidden[i : i + chunk]).sample
                          for i in range(0, len(self.xt), chunk)])


class Personalization:
    """T3 (see the module docstring). One instance prepares everything the runs share once: the
    base pipeline, the held-out sets and the base model's references and class images."""

    name = "T3"
    description = "DreamBooth personalization (tiny pretrained SD, our trainer)"
    metrics = ("heldout_loss", "fidelity", "class_drift", "class_leak", "scene_drift")
    higher_is_better = ("fidelity",)

    def __init__(self, *, steps: int = 200, eval_every: int = 20, rank: int = 4, prior_preservation: bool = False,
                 num_heldout_views: int = 8, num_scenes: int = 8, num_timesteps: int = 8, num_samples: int = 16,
                 sample_steps: int = 20, guidance_scale: float = 4.0, num_class_images: int = 8,
                 pipeline_dir: str | Path | None = None, work_dir: str | Path | None = None, log=lambda s: None):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from adaprelora_diffusion.demo.pretrained_tiny import default_pretrained_pipeline
        from adaprelora_diffusion.dreambooth.prior import ensure_class_images
        from adaprelora_diffusion.dreambooth.validation import generate_images

        if steps < 1 or eval_every < 1:
            raise ValueError(f"steps and eval_every must be >= 1, got {steps}, {eval_every}.")
        self.steps, self.eval_every, self.rank, self.prior = steps, eval_every, rank, prior_preservation
        if prior_preservation:
            self.name, self.description = "T3-prior", self.description + ", with prior preservation"
        self.sample_steps, self.guidance, self.num_samples = sample_steps, guidance_scale, num_samples
        self.pipeline_dir = Path(pipeline_dir) if pipeline_dir is not None else default_pretrained_pipeline()
        # Class images and run folders; a temporary one is removed with the task object.
        self._tmp = tempfile.TemporaryDirectory(prefix="adaprelora-t3-") if work_dir is None else None
        self.work = Path(work_dir) if work_dir is not None else Path(self._tmp.name)
        self.instance_prompt, self.class_prompt = DEMO_INSTANCE_PROMPT, CLASS_PROMPT
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(str(self.pipeline_dir), safety_checker=None, requires_safety_checker=False)
        self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        def sample(unet, text_encoder, prompt, seed):
            return generate_images(unet=unet, text_encoder=text_encoder, vae=pipe.vae, tokenizer=pipe.tokenizer,
                                   scheduler_config=pipe.scheduler.config, prompt=prompt, num_images=num_samples, seed=seed,
                                   resolution=self.resolution, num_inference_steps=sample_steps, guidance_scale=guidance_scale,
                                   batch_size=num_samples)

        self._sample = sample
        views = [demo_subject.render(demo_subject.random_scene(i, seed=0), self.resolution) for i in range(num_heldout_views)]
        coverage = [signature_coverage(v) for v in views]
        self.reference_coverage = {n: float(np.mean([c[n][0] for c in coverage])) for n in SIGNATURE_COLORS}
        # Held-out class samples use seeds the prior-preservation images (seed 0 upwards) never use.
        base_class = sample(pipe.unet, pipe.text_encoder, self.class_prompt, seed=10_000)
        base_instance = sample(pipe.unet, pipe.text_encoder, self.instance_prompt, seed=20_000)
        scene_pairs = [scenes.scene(1_000_000 + i, seed=0, resolution=self.resolution) for i in range(num_scenes)]
        ts = _timesteps(num_timesteps, noise_scheduler.config.num_train_timesteps)
        encode = lambda images: self._encode(pipe.vae, images)  # noqa: E731
        self.heldout = _DenoiseSet(encode(views), [self.instance_prompt] * len(views), ts, noise_scheduler, seed=1)
        self.class_set = _DenoiseSet(encode(base_class), [self.class_prompt] * len(base_class), ts, noise_scheduler, seed=2)
        self.scene_set = _DenoiseSet(encode([im for im, _ in scene_pairs]), [c for _, c in scene_pairs], ts, noise_scheduler, seed=3)
        self.base_class_eps = self.class_set.predict(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        self.base_scene_eps = self.scene_set.predict(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        self.base_class_score = float(np.mean([self._score(im) for im in base_class]))
        base_heldout = self.heldout.predict(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        with torch.no_grad():  # what the frozen VAE makes of real views (sampling can score higher)
            decoded = pipe.vae.decode(self.heldout.x0[:: len(ts)] / pipe.vae.config.scaling_factor).sample
        reconstructions = pipe.image_processor.postprocess(decoded, output_type="pil")
        self.reference = {
            "base_heldout_loss": F.mse_loss(base_heldout, self.heldout.noise).item(),
            "base_fidelity": float(np.mean([self._score(im) for im in base_instance])),
            "real_views_fidelity": float(np.mean([self._score(v) for v in views])),
            "vae_reconstruction_fidelity": float(np.mean([self._score(im) for im in reconstructions])),
            "base_class_score": self.base_class_score,
        }
        self.class_dir = None
        if prior_preservation:
            self.class_dir = self.work / "class_images"

            def base_pipeline():
                pipe.set_progress_bar_config(disable=True)
                return pipe

            ensure_class_images(self.class_dir, self.class_prompt, num_class_images, pipeline_factory=base_pipeline, seed=0,
                                resolution=self.resolution, batch_size=num_class_images, num_inference_steps=sample_steps)
        self.num_class_images = num_class_images
        log(f"T3 prepared in {time.perf_counter() - t0:.1f} s: {self.reference}")

    @staticmethod
    @torch.no_grad()
    def _encode(vae, images) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]))
        pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def _score(self, image) -> float:
        return subject_score(image, self.reference_coverage)

    def train_config(self, config: Config, lr: float, seed: int, schedule: str, output_dir: Path) -> TrainConfig:
        """The trainer's settings for one run: its defaults, plus the run's optimizer, lr and seed."""
        if config.average:
            raise ValueError("T3 runs the project's trainer, which has no weight averaging: drop the config's average.")
        fields = {}
        for key, value in config.kwargs.items():
            if key == "betas":
                prefix = "adaprelora" if config.optimizer == "adaprelora" else "adam"
                fields.update({f"{prefix}_beta1": value[0], f"{prefix}_beta2": value[1]})
            elif key in _KWARG_FIELDS:
                fields[_KWARG_FIELDS[key]] = value
            else:
                raise ValueError(f"T3 cannot pass optimizer option {key!r} to the trainer; known: betas, {', '.join(_KWARG_FIELDS)}.")
        return TrainConfig(
            pretrained_model_name_or_path=str(self.pipeline_dir), instance_data_dir=str(DEMO_SUBJECT_DIR),
            instance_prompt=self.instance_prompt, resolution=self.resolution, rank=self.rank,
            lora_target_modules="attention",  # a real model's default, not the demo run's "all"
            optimizer=config.optimizer, learning_rate=lr, lr_scheduler=schedule, lr_warmup_steps=0,
            max_train_steps=self.steps, seed=seed, cache_latents=True, cpu=True, report_to="none",
            checkpointing_steps=self.steps + 1, num_validation_images=0, validation_steps=0,
            with_prior_preservation=self.prior, class_prompt=self.class_prompt if self.prior else None,
            class_data_dir=str(self.class_dir) if self.prior else None,
            num_class_images=self.num_class_images if self.prior else None,
            output_dir=str(output_dir), **fields,
        )

    def evaluate(self, models) -> dict[str, float]:
        """The cheap held-out metrics (every ``eval_every`` steps)."""
        unet, text_encoder, tokenizer = models["unet"], models["text_encoder"], models["tokenizer"]
        was_training = unet.training, text_encoder.training
        unet.eval(), text_encoder.eval()
        try:
            heldout = F.mse_loss(self.heldout.predict(unet, text_encoder, tokenizer), self.heldout.noise).item()
            class_drift = F.mse_loss(self.class_set.predict(unet, text_encoder, tokenizer), self.base_class_eps).item()
            scene_drift = F.mse_loss(self.scene_set.predict(unet, text_encoder, tokenizer), self.base_scene_eps).item()
        finally:
            unet.train(was_training[0]), text_encoder.train(was_training[1])
        return {"heldout_loss": heldout, "class_drift": class_drift, "scene_drift": scene_drift}

    def evaluate_samples(self, models) -> dict[str, float]:
        """The sampled metrics (once, at the end): fidelity and class leak."""
        unet, text_encoder = models["unet"], models["text_encoder"]
        instance = self._sample(unet, text_encoder, self.instance_prompt, seed=20_000)
        klass = self._sample(unet, text_encoder, self.class_prompt, seed=10_000)
        self.last_samples = (instance, klass)
        return {"fidelity": float(np.mean([self._score(im) for im in instance])),
                "class_leak": float(np.mean([self._score(im) for im in klass])) - self.base_class_score}

    def run(self, config: Config, lr: float, seed: int, schedule: str = "cosine") -> RunResult:
        from adaprelora_diffusion.dreambooth.trainer import ProgressEvent, TrainingError, train

        eval_steps, curve, losses, final = [], [], [], {}
        peak = 0

        def on_step(step, models, optimizer):
            nonlocal peak, final
            if step == 0:
                return
            if step % self.eval_every == 0 or step == self.steps:
                peak = max(peak, state_bytes(optimizer))
                final = self.evaluate(models)
                eval_steps.append(step)
                curve.append(final["heldout_loss"])
            if step == self.steps:
                final.update(self.evaluate_samples(models))

        def progress(event: ProgressEvent):
            if event.kind == "step" and event.loss is not None:
                losses.append(event.loss)

        out = Path(tempfile.mkdtemp(prefix="run-", dir=self.work))
        diverged = False
        t0 = time.perf_counter()
        try:  # the trainer's progress bar and warnings would flood the sweep's log
            with contextlib.redirect_stderr(io.StringIO()):
                train(self.train_config(config, lr, seed, schedule, out), progress=progress, on_step=on_step)
        except TrainingError:
            diverged = True
        finally:
            shutil.rmtree(out, ignore_errors=True)
        wall = time.perf_counter() - t0
        if not diverged and not all(math.isfinite(v) for v in final.values()):
            diverged = True
        if diverged:
            final = {m: math.inf if m == self.metrics[0] else math.nan for m in self.metrics}
        return RunResult(lr, seed, eval_steps, curve, final, losses, wall, peak, diverged)
