import pytest
import torch
from torch import nn

from adaprelora_diffusion.optim import OPTIMIZERS, AdaPreLoRA, LoRAPro, make_optimizer

from .conftest import loss_fn, make_toy, toy_batches

LRS = {"adamw8bit": 1e-2, "adaprelora": 0.02, "adamw": 1e-2, "loraplus": 2e-3, "scaled_adamw": 1e-2, "adafactor": 1e-2, "lorapro": 0.5, "soap": 1e-2}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_the_lora_and_the_head(name):
    if name == "soap":
        pytest.importorskip("pytorch_optimizer")
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
        if not torch.cuda.is_available():
            pytest.skip("bitsandbytes' 8-bit AdamW needs a CUDA GPU")
    model = make_toy(dtype=torch.float32, random_b=False)
    batch = toy_batches(1, dtype=torch.float32)[0]
    head_before = model.head.weight.detach().clone()
    optimizer = make_optimizer(name, model, lr=LRS[name])
    first = loss_fn(model, batch).item()
    for _ in range(40):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    assert loss_fn(model, batch).item() < 0.9 * first, name
    assert not torch.equal(head_before, model.head.weight)
    assert not torch.equal(model.fc1.lora_B["default"].weight, torch.zeros_like(model.fc1.lora_B["default"].weight))


def test_factory_returns_the_project_classes_and_forwards_keywords():
    model = make_toy()
    opt = make_optimizer("adaprelora", model, lr=1e-3, stats="tangent", damping=0.3)
    assert isinstance(opt, AdaPreLoRA) and opt.stats == "tangent" and opt.param_groups[0]["damping"] == 0.3
    assert isinstance(make_optimizer("lorapro", model, lr=1e-3), LoRAPro)
    loraplus = make_optimizer("loraplus", model, lr=1e-3, loraplus_lr_ratio=4.0)
    assert {g["lr"] for g in loraplus.param_groups if g["params"]} == {1e-3, 4e-3}


def test_per_model_learning_rates():
    unet_like, text_like = make_toy(), make_toy(seed=1)
    spec = [unet_like, {"model": text_like, "lr": 1e-5}]
    for name in ("adamw", "scaled_adamw", "adaprelora", "loraplus"):
        opt = make_optimizer(name, spec, lr=1e-3)
        text_params = {id(p) for p in text_like.parameters() if p.requires_grad}
        for group in opt.param_groups:
            ids = {id(p) for p in group["params"]}
            if ids and ids <= text_params:
                assert group["lr"] in (1e-5, 1e-5 * 16), name


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("sgd", {"lr": 1e-3}, "unknown optimizer"),
        ("adamw", {"lr": -1.0}, "lr"),
        ("adaprelora", {"lr": 1e-3, "frobnicate": 1}, "does not take"),
        ("adamw", {"lr": 1e-3, "betas": (2.0, 0.9)}, "beta"),
    ],
)
def test_bad_names_and_arguments_are_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, make_toy(), **kwargs)


def test_model_without_trainable_parameters_is_a_clear_error():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer("adamw", frozen, lr=1e-3)


def test_optimizer_kwargs_maps_trainer_settings_to_each_optimizers_arguments():
    from adaprelora_diffusion.optim import OPTIMIZER_SETTINGS, OPTIMIZERS, optimizer_kwargs

    assert set(OPTIMIZER_SETTINGS) == set(OPTIMIZERS)
    settings = {"betas": (0.8, 0.99), "weight_decay": 0.1, "adam_epsilon": 1e-7, "seed": 3, "adaprelora_stats": "exact",
                "adaprelora_clip_threshold": None, "loraplus_lr_ratio": 4.0, "scaled_adamw_reg": 0.5, "lorapro_damping": 0.2}
    # Adam's flags reach AdaPreLoRA's AdamW group; its own betas come from its own two flags, as one tuple
    assert optimizer_kwargs("adaprelora", settings) == dict(adamw_betas=(0.8, 0.99), weight_decay=0.1, adamw_eps=1e-7, seed=3,
                                                             stats="exact", clip_threshold=None)
    both = {**settings, "adaprelora_beta1": 0.5, "adaprelora_beta2": 0.9, "adaprelora_beta2_decay": -0.8}
    assert optimizer_kwargs("adaprelora", both)["betas"] == (0.5, 0.9)
    assert optimizer_kwargs("adaprelora", both)["beta2_decay"] == -0.8
    assert "betas" not in optimizer_kwargs("adaprelora", {**settings, "adaprelora_beta1": 0.5})  # half a tuple: default
    assert optimizer_kwargs("loraplus", settings)["loraplus_lr_ratio"] == 4.0
    assert optimizer_kwargs("scaled_adamw", settings)["reg"] == 0.5
    assert optimizer_kwargs("lorapro", settings)["damping"] == 0.2
    assert optimizer_kwargs("adafactor", settings) == {"weight_decay": 0.1}
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_kwargs("sgd", settings)


def test_every_optimizer_accepts_what_the_trainer_passes():
    """Every flag the DreamBooth config maps must be a real argument of its optimizer."""
    from adaprelora_diffusion.dreambooth.config import TrainConfig
    from adaprelora_diffusion.optim import OPTIMIZERS, make_optimizer, optimizer_kwargs
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    for name in OPTIMIZERS:
        if name == "soap":
            pytest.importorskip("pytorch_optimizer")
        if name == "adamw8bit":
            continue  # bitsandbytes (CUDA): test_adamw8bit_without_bitsandbytes_is_a_clear_error
        opt = make_optimizer(name, model, lr=1e-3, **optimizer_kwargs(name, TrainConfig(optimizer=name).optimizer_settings()))
        if hasattr(opt, "close"):
            opt.close()


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    model = make_toy(dtype=torch.float32, random_b=False)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer("adamw8bit", model, lr=1e-3)
