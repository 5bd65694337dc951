"""The training loop end to end on the tiny pipeline: outputs, exact resume, bad input."""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

import adaprelora_diffusion.engine.checkpoints as checkpointing
import adaprelora_diffusion.demo.pretrained_tiny as pretrained_tiny
import adaprelora_diffusion.dreambooth.trainer as training
from adaprelora_diffusion.demo.descriptor import DEMO_SUBJECT_DIR
from adaprelora_diffusion.dreambooth import diffusion_loss
from adaprelora_diffusion.dreambooth.config import TrainConfig
from adaprelora_diffusion.dreambooth.trainer import TrainingError, train

from .runs import config, tiny_default  # noqa: F401 (a fixture)


SHIPPED_DEFAULT = pretrained_tiny.default_pretrained_pipeline


pytestmark = pytest.mark.usefixtures("tiny_default")


def lora(result) -> dict:
    return load_file(str(result.lora_path))


def test_smoke_run_writes_lora_samples_card_and_checkpoints(tmp_path):
    events = []
    result = train(config(tmp_path, num_validation_images=2, validation_steps=2, checkpointing_steps=2,
                          output_kohya_format=True), progress=events.append)
    out = result.output_dir
    assert result.global_step == 4 and not result.stopped_early and result.skipped_steps == 0
    weights = lora(result)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in weights.items())  # training moved B from 0
    assert result.kohya_path.is_file()
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "validation" / "step-000000").is_dir() and (out / "validation" / "step-000004").is_dir()
    assert (out / "README.md").is_file()
    saved = json.loads((out / training.RUN_CONFIG_NAME).read_text())
    assert saved["instance_data_dir"] == str(DEMO_SUBJECT_DIR) and saved["resolution"] == 64
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 4 and "checkpoint" in kinds
    assert any(e.images for e in events if e.kind == "validation")


def test_the_step_0_samples_can_be_skipped(tmp_path):
    result = train(config(tmp_path, max_train_steps=2, num_validation_images=1, validation_steps=1,
                          skip_initial_validation=True))
    assert sorted(p.name for p in (result.output_dir / "validation").iterdir()) == ["step-000001", "step-000002"]


def test_default_model_is_the_shipped_pretrained_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained_tiny, "default_pretrained_pipeline", SHIPPED_DEFAULT)
    result = train(config(tmp_path, max_train_steps=2))
    assert result.global_step == 2 and all(torch.isfinite(t).all() for t in lora(result).values())
    saved = json.loads((result.output_dir / training.RUN_CONFIG_NAME).read_text())
    assert saved["pretrained_model_name_or_path"] is None and saved["resolution"] == 64
    assert saved["instance_data_dir"] == str(DEMO_SUBJECT_DIR)
    assert "pretrained on procedural shapes" in (result.output_dir / "README.md").read_text()


@pytest.mark.parametrize("optimizer", ["adaprelora", "adamw"])
def test_resumed_run_is_bit_identical(tmp_path, optimizer, family_model):
    # 5 demo images, batch 2 -> 3 batches per epoch; accumulation 2 ends an epoch mid-window.
    family, model = family_model
    common = dict(optimizer=optimizer, train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=5,
                  random_flip=True, train_text_encoder=True, lora_dropout=0.1, lr_scheduler="cosine", lr_warmup_steps=1,
                  pretrained_model_name_or_path=str(model), snr_gamma=5.0, noise_offset=0.05)
    straight = train(config(tmp_path / "a", **common))

    stops = iter([False, False, True])  # stop cooperatively after step 3
    first = train(config(tmp_path / "b", checkpointing_steps=2, **common), should_stop=lambda: next(stops, False))
    assert first.stopped_early and first.global_step == 3
    assert (first.output_dir / "checkpoint-3").is_dir()
    resumed = train(config(tmp_path / "b", checkpointing_steps=2, resume_from_checkpoint="latest", **common))
    assert resumed.global_step == 5
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_text_encoder_is_trained_with_its_own_learning_rate(tmp_path):
    result = train(config(tmp_path, train_text_encoder=True, text_encoder_lr=1e-3, optimizer="adamw"))
    keys = lora(result).keys()
    assert any(k.startswith("text_encoder") for k in keys) and any(k.startswith("unet") for k in keys)


def test_mixed_precision_keeps_lora_weights_in_float32(tmp_path):
    result = train(config(tmp_path, mixed_precision="bf16", max_train_steps=2))
    assert all(t.dtype == torch.float32 for t in lora(result).values())


def test_prior_preservation_generates_and_reuses_class_images(tmp_path):
    class_dir = tmp_path / "class"
    cfg = config(tmp_path, with_prior_preservation=True, class_prompt="a photo of a robot toy", class_data_dir=str(class_dir),
                 num_class_images=3, max_train_steps=2)
    train(cfg)
    made = sorted(class_dir.glob("*.png"))
    assert len(made) == 3
    stamps = [p.stat().st_mtime_ns for p in made]
    train(config(tmp_path, with_prior_preservation=True, class_prompt="a photo of a robot toy", class_data_dir=str(class_dir),
                 num_class_images=3, max_train_steps=2, overwrite_output_dir=True))
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real_loss = diffusion_loss.denoising_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(diffusion_loss, "denoising_loss", sometimes_nan)
    result = train(config(tmp_path))
    assert result.skipped_steps == 1 and result.global_step == 4
    assert all(torch.isfinite(t).all() for t in lora(result).values())

    monkeypatch.setattr(diffusion_loss, "denoising_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match="non-finite"):
        train(config(tmp_path / "nan", max_consecutive_nonfinite=3))
    assert not (tmp_path / "nan" / "out" / "pytorch_lora_weights.safetensors").exists()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save = checkpointing.save_file
    calls = {"n": 0}

    def fill_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", fill_disk)
    with pytest.raises(TrainingError, match="No space left.*checkpoint-2 is intact"):
        train(config(tmp_path, checkpointing_steps=2))
    out = tmp_path / "out"
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no half-written folder left


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(resolution=100), "multiple of 8"),
        (dict(with_prior_preservation=True, class_data_dir="x"), "class_prompt"),
        (dict(class_prompt="a dog"), "with_prior_preservation"),
        (dict(optimizer="sgd"), "unknown"),
        (dict(rank=0), "rank"),
    ],
)
def test_bad_settings_are_rejected_before_loading(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train(config(tmp_path, **overrides))
    assert not (tmp_path / "out").exists()


def test_bad_data_and_model_paths_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        train(config(tmp_path, instance_data_dir=str(empty), instance_prompt="a photo of sks dog"))
    with pytest.raises((ValueError, FileNotFoundError), match="model_index.json|pipeline"):
        train(config(tmp_path, pretrained_model_name_or_path=str(empty), overwrite_output_dir=True))


def test_an_output_folder_with_another_run_is_protected(tmp_path):
    train(config(tmp_path, max_train_steps=1))
    with pytest.raises(TrainingError, match="holds another run"):
        train(config(tmp_path, max_train_steps=1))
    train(config(tmp_path, max_train_steps=1, overwrite_output_dir=True))


def test_saved_lora_reproduces_the_trained_models_images_in_diffusers(tmp_path, family_model):
    """The final validation images (made by the in-memory model) come back from the saved files,
    in both formats, through diffusers' own loader (SDXL: StableDiffusionXLPipeline, SGM kohya names)."""
    import numpy as np
    from PIL import Image

    from adaprelora_diffusion.dreambooth.model_loading import stable_diffusion_pipeline_class
    from adaprelora_diffusion.dreambooth.validation import generate_images

    family, base = family_model
    cfg = config(tmp_path, num_validation_images=2, validation_steps=0, output_kohya_format=True, train_text_encoder=True,
                 rank=4, lora_alpha=8, learning_rate=1e-2, optimizer="adamw", pretrained_model_name_or_path=str(base))
    result = train(cfg)
    final = sorted((result.output_dir / "validation" / f"step-{result.global_step:06d}").glob("*.png"))
    trained = [np.asarray(Image.open(p), dtype=np.int16) for p in final]
    pipeline_class = stable_diffusion_pipeline_class(sdxl=family == "sdxl")

    def sample(pipe):
        return generate_images(unet=pipe.unet, text_encoder=pipe.text_encoder, vae=pipe.vae, tokenizer=pipe.tokenizer,
                               scheduler_config=pipe.scheduler.config, prompt="a photo of sks robot toy", num_images=2,
                               seed=0, resolution=64, num_inference_steps=4, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                               tokenizer_2=getattr(pipe, "tokenizer_2", None))

    for weight_name in ("pytorch_lora_weights.safetensors", training.KOHYA_WEIGHT_NAME):
        pipe = pipeline_class.from_pretrained(base)
        before = sample(pipe)
        pipe.load_lora_weights(result.output_dir, weight_name=weight_name)
        after = sample(pipe)
        for img, ref, plain in zip(after, trained, before):
            got = np.asarray(img, dtype=np.int16)
            assert np.abs(got - ref).max() <= 2, weight_name  # PNG rounding of the same float image
            assert np.abs(np.asarray(plain, dtype=np.int16) - ref).max() > 2  # and the LoRA matters


def test_cached_latents_encode_each_example_once(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"n": 0}
    real = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    result = train(config(tmp_path, cache_latents=True, max_train_steps=8, center_crop=True))
    assert result.global_step == 8 and calls["n"] == len(list(DEMO_SUBJECT_DIR.glob("*.png")))


def test_gradient_checkpointing_gives_the_same_lora(tmp_path):
    plain = train(config(tmp_path / "a", max_train_steps=3))
    checkpointed = train(config(tmp_path / "b", max_train_steps=3, gradient_checkpointing=True))
    a, b = lora(plain), lora(checkpointed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_min_snr_weighting_and_noise_offset():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 990])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    expected = (per_sample * torch.minimum(snr, torch.full_like(snr, 5.0)) / snr).mean()
    got = diffusion_loss.denoising_loss(pred, target, t, scheduler, TrainConfig(snr_gamma=5.0), num_instance=3)
    torch.testing.assert_close(got, expected)
    with_prior = diffusion_loss.denoising_loss(pred, target, t, scheduler, TrainConfig(prior_loss_weight=0.5), num_instance=2)
    torch.testing.assert_close(with_prior, per_sample[:2].mean() + 0.5 * per_sample[2:].mean())

    latents = torch.zeros(2, 4, 8, 8)
    plain, _ = diffusion_loss.sample_noise(latents, TrainConfig(), 3, 0, [0, 1], 1000)
    offset, _ = diffusion_loss.sample_noise(latents, TrainConfig(noise_offset=0.1), 3, 0, [0, 1], 1000)
    shift = offset - plain
    assert shift.abs().max() > 0
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))  # one constant per sample and channel


def test_tensorboard_logs_loss_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(config(tmp_path, report_to="tensorboard", num_validation_images=1, validation_steps=2))
    events = list((result.output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert "validation" in acc.Tags()["images"]


@pytest.mark.parametrize("optimizer", ["adaprelora", "adamw", "loraplus", "scaled_adamw", "adafactor", "lorapro", "soap"])
def test_every_optimizer_trains_through_the_loop(tmp_path, optimizer, family_model):
    if optimizer == "soap":
        pytest.importorskip("pytorch_optimizer")
    family, model = family_model
    result = train(config(tmp_path, optimizer=optimizer, max_train_steps=2, train_text_encoder=True,
                          pretrained_model_name_or_path=str(model)))
    weights = lora(result)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in weights.items())
    roles = {k.split(".")[0] for k in weights}
    assert roles == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"unet", "text_encoder"})


def test_checkpoint_limit_and_resume_from_an_explicit_path(tmp_path):
    first = train(config(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2))
    assert [p.name for p in checkpointing.list_checkpoints(first.output_dir)] == ["checkpoint-2", "checkpoint-3"]
    resumed = train(config(tmp_path, max_train_steps=4, resume_from_checkpoint=str(first.output_dir / "checkpoint-2")))
    assert resumed.global_step == 4
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        train(config(tmp_path, max_train_steps=4, resume_from_checkpoint=str(tmp_path / "nowhere")))


def test_relative_output_dir_as_in_the_readme_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(TrainConfig(output_dir="run", report_to="none", max_train_steps=2, num_validation_images=1,
                               validation_steps=1, checkpointing_steps=None))
    card = (tmp_path / "run" / "README.md").read_text()
    assert "validation/step-000002/00.png" in card and (tmp_path / "run" / "validation" / "step-000002" / "00.png").is_file()
    assert result.lora_path == tmp_path / "run" / "pytorch_lora_weights.safetensors"


def test_on_step_sees_every_step_with_the_live_models_and_optimizer(tmp_path):
    seen = []

    def on_step(step, models, optimizer):
        b = next(p for n, p in models["unet"].named_parameters() if "lora_B" in n)
        moments = sum(v.abs().sum().item() for st in optimizer.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.is_floating_point())
        seen.append((step, sorted(models), type(optimizer).__name__, b.detach().abs().sum().item(), moments))

    result = train(config(tmp_path, max_train_steps=3), on_step=on_step)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and result.global_step == 3
    assert seen[0][1] == ["noise_scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert {s[2] for s in seen} == {"AdaPreLoRA"}  # the optimizer itself, not accelerate's wrapper
    assert seen[0][3] == 0 and seen[-1][3] > 0  # B starts at 0; the hook sees the weights as they train
    assert seen[0][4] == 0 and seen[-1][4] > 0  # and the optimizer's statistics as they fill
