"""Every flag of diffusers' train_dreambooth_lora.py is accepted, with the same meaning or a clear refusal."""

import logging

import pytest
import torch
from PIL import Image

from adaprelora_diffusion.demo import pretrained_tiny
from adaprelora_diffusion.dreambooth.config import TrainConfig, build_parser, parse_config
from adaprelora_diffusion.dreambooth.trainer import TrainingError, train

from .runs import config, tiny_default  # noqa: F401 (a fixture)

#: the flags of diffusers' examples/dreambooth/train_dreambooth_lora.py (and --image_interpolation_mode of its newer scripts)
DIFFUSERS_FLAGS = """pretrained_model_name_or_path revision variant tokenizer_name instance_data_dir class_data_dir instance_prompt
class_prompt validation_prompt num_validation_images validation_epochs with_prior_preservation prior_loss_weight
num_class_images output_dir seed resolution center_crop train_text_encoder train_batch_size sample_batch_size
num_train_epochs max_train_steps checkpointing_steps checkpoints_total_limit resume_from_checkpoint
gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps lr_num_cycles
lr_power dataloader_num_workers use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm
push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to mixed_precision prior_generation_precision local_rank
enable_xformers_memory_efficient_attention pre_compute_text_embeddings tokenizer_max_length
text_encoder_use_attention_mask validation_images class_labels_conditioning rank image_interpolation_mode""".split()


pytestmark = pytest.mark.usefixtures("tiny_default")


def test_every_diffusers_flag_is_a_flag_here():
    ours = {a.dest for a in build_parser()._actions}
    assert set(DIFFUSERS_FLAGS) <= ours, sorted(set(DIFFUSERS_FLAGS) - ours)
    cfg = parse_config(["--local_rank", "0", "--validation_images", "a.png", "b.png", "--tokenizer_max_length", "20",
                        "--allow_tf32", "--num_train_epochs", "3", "--prior_generation_precision", "bf16"])
    assert cfg.validation_images == ["a.png", "b.png"] and cfg.num_train_epochs == 3


@pytest.mark.parametrize("overrides, match", [
    (dict(validation_images=["x.png"]), "drop --validation_images"),
    (dict(pre_compute_text_embeddings=True, train_text_encoder=True), "cannot be used with --train_text_encoder"),
    (dict(use_8bit_adam=True), "does not apply to --optimizer adaprelora"),
    (dict(class_labels_conditioning="labels"), "supports only 'timesteps'"),
    (dict(validation_epochs=2, validation_steps=5), "keep one"),
    (dict(image_interpolation_mode="sinc"), "must be one of"),
])
def test_flags_that_cannot_apply_are_refused_with_the_reason(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides).validate()


def test_missing_optional_packages_and_offline_push_are_named(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("xformers", "bitsandbytes") else real(name, *a))
    with pytest.raises(ValueError, match="pip install xformers"):
        config(tmp_path, enable_xformers_memory_efficient_attention=True).validate()
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        config(tmp_path, use_8bit_adam=True, optimizer="adamw").validate()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="unset HF_HUB_OFFLINE"):
        config(tmp_path, push_to_hub=True).validate()


def test_num_train_epochs_and_validation_epochs_count_in_epochs(tmp_path):
    # 5 demo images, batch 1, accumulation 1: 5 steps per epoch
    result = train(config(tmp_path, max_train_steps=None, num_train_epochs=2, validation_epochs=1, num_validation_images=1,
                          num_validation_inference_steps=1))
    assert result.global_step == 10
    steps = sorted(p.name for p in (result.output_dir / "validation").iterdir())
    assert steps == ["step-000000", "step-000005", "step-000010"]


def test_image_interpolation_mode_changes_the_resampling(tmp_path):
    from adaprelora_diffusion.dreambooth.data import DreamBoothDataset

    folder = tmp_path / "d"
    folder.mkdir()
    Image.effect_noise((128, 128), 60).convert("RGB").save(folder / "a.png")
    near = DreamBoothDataset(folder, "p", resolution=32, center_crop=True, interpolation="nearest")[0]["instance_pixel_values"]
    lanczos = DreamBoothDataset(folder, "p", resolution=32, center_crop=True, interpolation="lanczos")[0]["instance_pixel_values"]
    assert not torch.equal(near, lanczos)


def test_tokenizer_name_length_and_attention_mask_reach_the_text_encoder(tmp_path, tiny_pipeline_dir):
    from adaprelora_diffusion.dreambooth.diffusion_loss import encode_prompts
    from adaprelora_diffusion.dreambooth.model_loading import load_pipeline_components

    m = load_pipeline_components(tiny_pipeline_dir, tokenizer=tiny_pipeline_dir / "tokenizer")
    plain, _ = encode_prompts(m, ["a photo"], "cpu")
    short, _ = encode_prompts(m, ["a photo"], "cpu", max_length=16)
    masked, _ = encode_prompts(m, ["a photo"], "cpu", max_length=16, use_attention_mask=True)
    assert plain.shape[1] == 77 and short.shape[1] == 16 and not torch.equal(short, masked)
    with pytest.raises((ValueError, OSError), match="tokenizer"):
        load_pipeline_components(tiny_pipeline_dir, tokenizer=tmp_path / "no-tokenizer")


def test_class_labels_on_a_unet_without_class_embedding_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="class embedding"):
        train(config(tmp_path, class_labels_conditioning="timesteps"))


def test_allow_tf32_without_cuda_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train(config(tmp_path, allow_tf32=True, max_train_steps=1))
    assert "--allow_tf32 has no effect" in caplog.text


def test_push_to_hub_uploads_the_output_folder_without_checkpoints(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub functions are replaced: nothing leaves the machine
    calls = {}

    class Repo:
        repo_id = "me/bolt"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", repo_id) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    train(config(tmp_path, push_to_hub=True, hub_model_id="me/bolt", checkpointing_steps=1))
    assert calls["create"] == "me/bolt" and calls["upload"]["repo_id"] == "me/bolt"
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]

    def offline(**kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    with pytest.raises(TrainingError, match="The LoRA is saved locally"):
        train(config(tmp_path / "b", push_to_hub=True, hub_model_id="me/bolt"))
    assert (tmp_path / "b" / "out" / "pytorch_lora_weights.safetensors").is_file()
