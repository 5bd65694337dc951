"""Validation sampling must leave the trained modules and torch's global RNG exactly as it found them."""

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image

from adaprelora_diffusion.dreambooth import validation
from adaprelora_diffusion.dreambooth.model_loading import load_pipeline_components

PROMPT = "a photo of sks robot"


@pytest.fixture
def components(tiny_pipeline_dir):
    return load_pipeline_components(tiny_pipeline_dir)


def generate(c, **overrides):
    kwargs = dict(
        unet=c.unet, text_encoder=c.text_encoder, vae=c.vae, tokenizer=c.tokenizer,
        scheduler_config=c.noise_scheduler.config, prompt=PROMPT, num_images=2, seed=0,
        resolution=64, num_inference_steps=2,
    )
    kwargs.update(overrides)
    return validation.generate_images(**kwargs)


def arrays(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


def add_lora(unet, *, dropout=0.0, seed=1):
    """Training-like state: LoRA with non-zero B (a fresh LoRA is a no-op), only LoRA trainable."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def snapshot(module):
    return {
        "params": {n: (p.detach().clone(), p.dtype, p.requires_grad) for n, p in module.named_parameters()},
        "modes": {n: m.training for n, m in module.named_modules()},
    }


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after["modes"] == before["modes"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, dtype, flag) in before["params"].items():
        new_value, new_dtype, new_flag = after["params"][name]
        assert new_dtype == dtype, name
        assert new_flag == flag, name
        assert torch.equal(new_value, value), name


def test_modules_dtypes_flags_modes_and_weights_are_restored(components):
    c = components
    add_lora(c.unet, dropout=0.1)
    c.unet.train()
    c.text_encoder.train()
    c.text_encoder.requires_grad_(False)
    c.text_encoder.get_input_embeddings().requires_grad_(True)  # mixed flags, as in textual-inversion-like setups
    c.vae.requires_grad_(False)
    c.vae.to(torch.bfloat16)  # mixed dtypes, as with fp16/bf16 frozen weights
    c.vae.eval()
    c.vae.decoder.train()  # mixed modes within one model must survive too
    before = {name: snapshot(getattr(c, name)) for name in ("unet", "text_encoder", "vae")}

    seen_modes = []
    hook = c.unet.register_forward_pre_hook(lambda m, args: seen_modes.append(m.training))
    try:
        images = generate(c, autocast_dtype=torch.bfloat16)
    finally:
        hook.remove()

    assert len(images) == 2 and all(im.size == (64, 64) for im in images)
    assert seen_modes and not any(seen_modes), "sampling must run in eval mode (no dropout)"
    for name, snap in before.items():
        assert_unchanged(getattr(c, name), snap)


def test_global_rng_is_not_consumed_and_images_do_not_depend_on_it(components):
    c = components
    add_lora(c.unet, dropout=0.5)
    c.unet.train()  # LoRA dropout in train mode would draw from the global RNG if left on
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(c)
    assert torch.equal(torch.get_rng_state(), state)

    torch.manual_seed(999)  # a different global state must not change the images
    second = generate(c)
    for a, b in zip(arrays(first), arrays(second)):
        np.testing.assert_array_equal(a, b)


def test_image_i_uses_seed_plus_i_and_seeds_differ(components):
    pair = arrays(generate(components, num_images=2, seed=5))
    alone = arrays(generate(components, num_images=1, seed=6))
    np.testing.assert_array_equal(pair[1], alone[0])
    assert np.abs(pair[0] - pair[1]).mean() > 5, "different seeds should give different images"


def test_lora_weights_change_the_images(components):
    c = components
    base = arrays(generate(c, num_images=1))
    add_lora(c.unet)
    with_lora = arrays(generate(c, num_images=1))
    assert np.abs(base[0] - with_lora[0]).mean() > 2


def test_runs_without_grad_and_under_the_requested_autocast(components):
    c = components
    seen = []

    def record(module, args):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    hooks = [m.register_forward_pre_hook(record) for m in (c.unet, c.text_encoder)]
    try:
        generate(c, num_images=1, autocast_dtype=torch.bfloat16)
        assert seen and all(s == (False, True, torch.bfloat16) for s in seen)
        seen.clear()
        generate(c, num_images=1)
        assert seen and all(s[:2] == (False, False) for s in seen)
    finally:
        for h in hooks:
            h.remove()
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


def test_accepts_modules_wrapped_for_parallel_training(components):
    c = components
    plain = arrays(generate(c, num_images=1))
    wrapped = arrays(generate(c, num_images=1, unet=torch.nn.DataParallel(c.unet), text_encoder=torch.nn.DataParallel(c.text_encoder)))
    np.testing.assert_array_equal(plain[0], wrapped[0])


def test_bad_arguments_are_named(components):
    with pytest.raises(ValueError, match="prompt must be a non-empty"):
        generate(components, prompt="  ")
    with pytest.raises(ValueError, match="num_images must be an int >= 1"):
        generate(components, num_images=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(components, resolution=60)
    with pytest.raises(ValueError, match="does not move"):
        generate(components, device="meta")
    with pytest.raises(ValueError, match="scheduler_config must be"):
        generate(components, scheduler_config="ddim")


def test_sampling_scheduler_keeps_the_models_noise_schedule(components):
    config = dict(components.noise_scheduler.config, prediction_type="v_prediction")
    sched = validation.make_sampling_scheduler(config)
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.beta_schedule == components.noise_scheduler.config.beta_schedule


# ------------------------------------------------------------------ saving


def solid(color, size=16):
    return Image.new("RGB", (size, size), color)


def test_save_validation_images_layout_and_content(tmp_path):
    images = [solid((255, 0, 0)), solid((0, 0, 255))]
    paths = validation.save_validation_images(images, tmp_path, 42, PROMPT)
    folder = tmp_path / "validation" / "step-000042"
    assert paths == [folder / "00.png", folder / "01.png"]
    for path, image in zip(paths, images):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert (folder / "prompt.txt").read_text(encoding="utf-8").strip() == PROMPT
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "prompt.txt"]  # no temp files

    # A rerun of the same step with fewer images (e.g. after a resume) leaves no stale image behind.
    validation.save_validation_images([solid((0, 255, 0))], tmp_path, 42, "another prompt")
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "prompt.txt"]
    assert np.asarray(Image.open(folder / "00.png"))[0, 0].tolist() == [0, 255, 0]


def test_save_validation_images_is_atomic(tmp_path, monkeypatch):
    validation.save_validation_images([solid((255, 0, 0))], tmp_path, 1, PROMPT)
    target = tmp_path / "validation" / "step-000001" / "00.png"
    original = target.read_bytes()

    def crash(self, fp, *args, **kwargs):
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        validation.save_validation_images([solid((0, 0, 255))], tmp_path, 1, PROMPT)
    assert target.read_bytes() == original
    assert sorted(p.name for p in target.parent.iterdir()) == ["00.png", "prompt.txt"]


def test_save_validation_images_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="No images given"):
        validation.save_validation_images([], tmp_path, 0, PROMPT)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        validation.save_validation_images([solid((0, 0, 0))], tmp_path, -1, PROMPT)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        validation.save_validation_images([solid((0, 0, 0))], a_file, 0, PROMPT)


# ------------------------------------------------------------------ tracker logging


@pytest.fixture
def tensorboard_accelerator(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("validation-test")
    yield accelerator
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no global accelerate state for other tests


def test_log_images_writes_tensorboard_image_summary(tmp_path, tensorboard_accelerator, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = [solid((255, 0, 0), 8), solid((0, 0, 255), 8)]

    class Unknown:
        name = "somewhere"

    with caplog.at_level("DEBUG", logger="adaprelora_diffusion.dreambooth.validation"):
        validation.log_images([Unknown()] + tensorboard_accelerator.trackers, images, step=7, tag="val/robot")
    assert "somewhere" in caplog.text
    tensorboard_accelerator.end_training()  # flush

    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files
    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert "val/robot" in acc.Tags()["images"]
    (event,) = acc.Images("val/robot")
    assert event.step == 7
    import io

    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    # The batch is shown side by side: red image, then blue image.
    assert grid.shape == (8, 16, 3)
    assert grid[4, 4].tolist() == [255, 0, 0] and grid[4, 12].tolist() == [0, 0, 255]


def test_log_images_rejects_mixed_sizes(tensorboard_accelerator):
    with pytest.raises(ValueError, match="share one size"):
        validation.log_images(tensorboard_accelerator.trackers, [solid((0, 0, 0), 8), solid((0, 0, 0), 16)], step=0)


def test_batched_sampling_gives_the_same_images_as_one_at_a_time(components):
    one = arrays(generate(components, num_images=3))
    batched = arrays(generate(components, num_images=3, batch_size=2))  # a full and a ragged batch
    assert len(batched) == 3
    for a, b in zip(one, batched):
        assert np.abs(a - b).max() <= 2  # float rounding only: each image keeps its own seed


def test_bad_batch_size_is_refused(components):
    with pytest.raises(ValueError, match="batch_size"):
        generate(components, batch_size=0)
