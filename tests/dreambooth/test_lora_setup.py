"""LoRA is attached with peft itself: transformers' PEFT version gate must not stop training."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import CLIPTextModel
from transformers.integrations import peft as transformers_peft

from adaprelora_diffusion.dreambooth import lora_files
from adaprelora_diffusion.dreambooth.config import TEXT_ENCODER_TARGETS, TrainConfig
from adaprelora_diffusion.dreambooth.lora_setup import add_text_encoder_lora, attach_lora, trainable_parameters
from adaprelora_diffusion.dreambooth.trainer import train

# What transformers 5.24 raises from PreTrainedModel.add_adapter (and its other adapter methods)
# when peft < 0.22 is installed (transformers/utils/peft_utils.py::check_peft_version).
GATE_MESSAGE = "The version of PEFT you are using is not compatible, please use a version >= 0.22.0"


@pytest.fixture
def refusing_transformers(monkeypatch):
    """Make transformers' adapter methods refuse the installed peft, as transformers 5.24 does with peft 0.21."""

    def refuse(min_version):
        raise ValueError(GATE_MESSAGE)

    monkeypatch.setattr(transformers_peft, "check_peft_version", refuse)


def load_models(folder):
    return (UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet"),
            CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder"))


def te_config(**kw) -> TrainConfig:
    return TrainConfig(train_text_encoder=True, lora_target_modules="attention", rank=2, lora_alpha=4, **kw)


def test_the_gate_stand_in_bites(tiny_pipeline_dir, refusing_transformers):
    # The old code path (transformers' add_adapter) fails under the simulated gate ...
    _, te = load_models(tiny_pipeline_dir)
    with pytest.raises(ValueError, match="The version of PEFT you are using is not compatible"):
        te.add_adapter(LoraConfig(r=2, target_modules=list(TEXT_ENCODER_TARGETS)))


def test_text_encoder_lora_attaches_trains_and_saves_despite_the_gate(tmp_path, tiny_pipeline_dir, refusing_transformers):
    unet, te = load_models(tiny_pipeline_dir)
    torch.manual_seed(0)
    attach_lora(unet, te, te_config())

    config = te.peft_config["default"]
    assert isinstance(config, LoraConfig) and sorted(config.target_modules) == sorted(TEXT_ENCODER_TARGETS)
    assert config.r == 2 and config.lora_alpha == 4
    te_params = dict(te.named_parameters())
    trainable = [n for n, p in te_params.items() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 4 * te.config.num_hidden_layers  # A and B of q/k/v/out in every layer
    assert {id(p) for p in trainable_parameters(te)} == {id(te_params[n]) for n in trainable}

    # A training step reaches the text-encoder LoRA (B starts at zero, so A's gradient is zero at first).
    ids = torch.randint(0, te.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    te(ids).last_hidden_state.square().mean().backward()
    grads = [te_params[n].grad for n in trainable if ".lora_B." in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for n in trainable:
            te_params[n].add_(torch.randn_like(te_params[n]) * 0.1)

    # Both savers read peft's state-dict utilities and te.peft_config.
    path = lora_files.save_lora_weights(tmp_path / "d", unet, te)
    te_keys = [k for k in load_file(str(path)) if k.startswith("text_encoder.")]
    assert len(te_keys) == len(trainable)
    kohya = load_file(str(lora_files.save_kohya_lora(tmp_path / "k.safetensors", unet, te)))
    assert sum(k.startswith("lora_te_") and k.endswith(".alpha") for k in kohya) == 4 * te.config.num_hidden_layers


def test_training_run_with_text_encoder_despite_the_gate(tmp_path, tiny_pipeline_dir, refusing_transformers):
    result = train(TrainConfig(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(tmp_path / "out"),
                               report_to="none", num_validation_images=0, max_train_steps=2, checkpointing_steps=None,
                               train_text_encoder=True, optimizer="adamw", learning_rate=1e-2))
    assert result.global_step == 2
    te_b = {k: v for k, v in load_file(str(result.lora_path)).items() if k.startswith("text_encoder.") and ".lora_B." in k}
    assert te_b and all(v.abs().sum() > 0 for v in te_b.values())  # trained away from the zero init


def test_same_adapter_as_transformers_add_adapter(tiny_pipeline_dir):
    """Under a peft that transformers accepts, the peft path builds exactly what add_adapter built."""
    _, ours = load_models(tiny_pipeline_dir)
    _, theirs = load_models(tiny_pipeline_dir)
    kw = dict(r=2, lora_alpha=4, lora_dropout=0.1, init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS))
    torch.manual_seed(3)
    add_text_encoder_lora(ours, LoraConfig(**kw))
    torch.manual_seed(3)
    try:
        theirs.add_adapter(LoraConfig(**kw))
    except ValueError as err:
        if "The version of PEFT you are using is not compatible" in str(err):
            pytest.skip(f"this transformers refuses the installed peft, so there is no add_adapter to compare with: {err}")
        raise

    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert ours.peft_config["default"].to_dict() == theirs.peft_config["default"].to_dict()
    # transformers' own adapter methods see it as an adapter model (trainer's _adapters_disabled uses them).
    assert ours._hf_peft_config_loaded and ours.active_adapters() == ["default"]
    ours.disable_adapters()
    assert all(m.disable_adapters for m in ours.modules() if hasattr(m, "lora_A"))
    ours.enable_adapters()


def test_second_adapter_with_the_same_name_is_refused(tiny_pipeline_dir):
    _, te = load_models(tiny_pipeline_dir)
    add_text_encoder_lora(te, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="default already exists"):
        add_text_encoder_lora(te, LoraConfig(r=2, target_modules=["k_proj"]))


def test_unknown_text_encoder_target_is_a_clear_error(tiny_pipeline_dir, monkeypatch):
    import adaprelora_diffusion.dreambooth.lora_setup as lora_setup

    unet, te = load_models(tiny_pipeline_dir)
    monkeypatch.setattr(lora_setup, "TEXT_ENCODER_TARGETS", ("no_such_proj",))
    with pytest.raises(ValueError, match=r"Could not attach LoRA to the text encoder: .*no_such_proj"):
        attach_lora(unet, te, te_config())
