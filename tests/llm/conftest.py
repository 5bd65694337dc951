"""Tiny LMs saved once per session, and the pieces every LLM test trains with."""

import pytest
import torch

from .tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def token_rows(count=8, length=12, seed=0):
    """Fixed random token rows (labels = inputs) for exact comparisons of training steps."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x.clone()} for x in torch.randint(12, 80, (count, length), generator=g)]


def peft_llama(folder, seed=0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    settings.update(lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(**settings))


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
