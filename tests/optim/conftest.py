"""Small peft-wrapped models for the optimizer tests."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn


class Toy(nn.Module):
    """Two Linear layers and a Conv2d, all LoRA targets, plus a trainable head (not LoRA)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, stride=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def make_toy(seed=0, dtype=torch.float64, r=3, alpha=5.0, rslora=False, random_b=True):
    torch.manual_seed(seed)
    model = Toy().to(dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["conv", "fc1", "fc2"], use_rslora=rslora)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("head")
    if random_b:  # the closed-form checks need B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.normal_(0, 0.3)
    return model.to(dtype)


def toy_batches(n=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 4, 4, generator=g, dtype=dtype), torch.randn(8, 3, generator=g, dtype=dtype)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.fixture
def toy():
    return make_toy()
