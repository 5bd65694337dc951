
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from adaprelora_diffusion.optim import AdaPreLoRA, find_lora_pairs

from .conftest import make_toy


def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    )
    unet.requires_grad_(False)
    return unet


def tiny_clip():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16)
    model = CLIPTextModel(config)
    model.requires_grad_(False)
    return model


def test_unet_attention_and_conv_pairs_are_found_by_module():
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    pairs, others = find_lora_pairs(unet)
    lora_params = {n for n, p in unet.named_parameters() if p.requires_grad and "lora_" in n}
    assert len(pairs) * 2 == len(lora_params) and not others
    kinds = {p.kind for p in pairs}
    assert kinds == {"linear", "conv"}
    for pair in pairs:
        assert pair.A is pair.module.lora_A[pair.adapter].weight
        assert pair.B is pair.module.lora_B[pair.adapter].weight
        m, n, r = pair.shape
        assert (pair.A.shape[0], pair.B.shape[0], pair.B.shape[1]) == (r, m, r)
        assert pair.scaling == pytest.approx(2.0)


def test_text_encoder_pairs_and_a_classifier_head_in_the_adamw_group():
    clip = tiny_clip()
    clip = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), clip)
    model = nn.ModuleDict({"encoder": clip, "head": nn.Linear(16, 3)})
    opt = AdaPreLoRA.from_model(model, lr=1e-3)
    assert len(find_lora_pairs(model)[0]) == 2 * 4
    lora_groups = [g for g in opt.param_groups if g["lora"]]
    adamw_groups = [g for g in opt.param_groups if not g["lora"]]
    head = {id(p) for p in model["head"].parameters()}
    assert {id(p) for g in adamw_groups for p in g["params"]} == head
    assert not head & {id(p) for g in lora_groups for p in g["params"]}
    opt.close()


def test_pairing_ignores_parameter_order():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    reordered = nn.Module()
    # Registering the modules in another order changes parameter order, not the pairing.
    reordered.add_module("fc2", model.fc2)
    reordered.add_module("conv", model.conv)
    reordered.add_module("fc1", model.fc1)
    pairs2, _ = find_lora_pairs(reordered)
    assert {(id(p.A), id(p.B)) for p in pairs} == {(id(p.A), id(p.B)) for p in pairs2}


def test_dora_factors_and_magnitudes_go_to_adamw_with_a_warning():
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True), nn.Sequential(nn.Linear(6, 5)))
    with pytest.warns(UserWarning, match="DoRA|variant"):
        pairs, others = find_lora_pairs(model)
    assert not pairs
    assert any("magnitude" in n for n, _ in others) and any("lora_A" in n for n, _ in others)


def test_a_model_without_lora_is_a_clear_error():
    with pytest.raises(ValueError, match="no LoRA pair"):
        AdaPreLoRA.from_model(nn.Linear(3, 3), lr=1e-3)
