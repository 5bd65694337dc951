"""What only SDXL has: two text encoders, pooled embeddings, size/crop micro-conditioning, SGM names.
(The behaviour both families share is tested by the family-parametrised tests in test_trainer.py.)"""

import pytest
import torch
from PIL import Image

from adaprelora_diffusion.dreambooth.config import TrainConfig
from adaprelora_diffusion.dreambooth.data import DreamBoothDataset, collate_fn
from adaprelora_diffusion.dreambooth.lora_files import sgm_module_names
from adaprelora_diffusion.dreambooth.model_loading import load_pipeline_components
from adaprelora_diffusion.dreambooth.trainer import train


def one_image(folder, size=(100, 80)):
    folder.mkdir()
    Image.new("RGB", size, (200, 90, 30)).save(folder / "a.png")
    return folder


def test_micro_conditioning_follows_each_images_size_and_crop(tmp_path):
    ds = DreamBoothDataset(one_image(tmp_path / "d"), "p", resolution=64, center_crop=True)
    ex = ds[0]
    # 100x80 (w x h) -> short side 80 to 64: 80x64, center crop at left (80-64)//2 = 8
    assert ex["instance_original_size"] == (80, 100) and ex["instance_crop_top_left"] == (0, 8)
    batch = collate_fn([ex])
    assert batch["original_sizes"] == [(80, 100)] and batch["crop_top_lefts"] == [(0, 8)]
    flips = {DreamBoothDataset(one_image(tmp_path / f"f{s}"), "p", resolution=64, random_flip=True, seed=s)[0]["instance_crop_top_left"]
             for s in range(12)}
    assert all(0 <= left <= 16 and top == 0 for top, left in flips) and len(flips) > 1


def test_the_unet_receives_the_time_ids_and_pooled_embeddings(tmp_path, tiny_sdxl_pipeline_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    seen = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        if self.training:
            seen.append((encoder_hidden_states.shape, {k: v.clone() for k, v in added_cond_kwargs.items()}))
        return real(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    train(TrainConfig(pretrained_model_name_or_path=str(tiny_sdxl_pipeline_dir), instance_data_dir=str(one_image(tmp_path / "d")),
                      instance_prompt="a photo of sks block", center_crop=True, max_train_steps=1, report_to="none",
                      num_validation_images=0, output_dir=str(tmp_path / "out")))
    (hidden_shape, added), = seen
    assert added["time_ids"].tolist() == [[80.0, 100.0, 0.0, 8.0, 64.0, 64.0]]
    assert added["text_embeds"].shape == (1, 32) and hidden_shape[-1] == 64  # pooled te2; te1 + te2 hidden side by side


def test_sdxl_folder_loads_both_text_encoders(tiny_sdxl_pipeline_dir):
    c = load_pipeline_components(tiny_sdxl_pipeline_dir)
    assert c.is_sdxl and type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert c.base_model_version == "sdxl_base_v1-0" and c.tokenizer_2 is not None


def test_refiner_and_transformer_pipelines_are_refused(tmp_path, tiny_sdxl_pipeline_dir):
    import json
    import shutil

    refiner = shutil.copytree(tiny_sdxl_pipeline_dir, tmp_path / "refiner")
    index = json.loads((refiner / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="refiner"):
        load_pipeline_components(refiner)


def test_sgm_names_of_the_real_sdxl_unet():
    """Against the real SDXL architecture (built empty from its config), the names kohya's own SDXL
    files use."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                  attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
                  addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    names = sgm_module_names(unet, ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
                                    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                                    "up_blocks.0.attentions.2.transformer_blocks.3.attn1.to_out.0",
                                    "up_blocks.1.resnets.2.conv1", "down_blocks.0.downsamplers.0.conv",
                                    "up_blocks.0.upsamplers.0.conv", "mid_block.resnets.1.time_emb_proj", "conv_in"])
    assert list(names.values()) == [
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "middle_block.1.transformer_blocks.0.attn2.to_k", "output_blocks.2.1.transformer_blocks.3.attn1.to_out.0",
        "output_blocks.5.0.in_layers.2", "input_blocks.3.0.op", "output_blocks.2.2.conv", "middle_block.2.emb_layers.1",
        "input_blocks.0.0"]


def test_sdxl_trains_at_1024_px_unless_the_model_or_the_user_says_otherwise(tmp_path, tiny_sdxl_pipeline_dir):
    import shutil

    from adaprelora_diffusion.dreambooth.model_loading import model_defaults

    plain = shutil.copytree(tiny_sdxl_pipeline_dir, tmp_path / "plain")
    (plain / "adaprelora_model.json").unlink()  # an ordinary SDXL folder
    assert model_defaults(plain)["resolution"] == 1024
    assert model_defaults(tiny_sdxl_pipeline_dir)["resolution"] == 64  # the tiny model asks for 64 px
    assert TrainConfig(resolution=768).resolved(model_defaults(plain)).resolution == 768
