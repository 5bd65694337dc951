"""Hook statistics against dL/dW computed directly."""

import pytest
import torch
from torch import nn

from adaprelora_diffusion.optim import find_lora_pairs
from adaprelora_diffusion.optim.statistics import HookStatistics

from .conftest import loss_fn, make_toy, toy_batches


def true_weight_gradients(model, batch):
    """dL/dW for each LoRA layer: the gradient of its (frozen) base weight, W = W0 + s B A."""
    for module in model.modules():
        if hasattr(module, "base_layer"):
            module.base_layer.weight.requires_grad_(True)
            module.base_layer.weight.grad = None
    loss_fn(model, batch).backward()
    return {id(m): m.base_layer.weight.grad.reshape(m.base_layer.weight.shape[0], -1).clone()
            for m in model.modules() if hasattr(m, "base_layer")}


def test_exact_statistics_match_true_weight_gradient():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics(pairs, "exact")
    G = true_weight_gradients(model, toy_batches(1)[0])
    for i, pair in enumerate(pairs):
        rows, cols, ref, count = hooks.fresh[i]
        g = G[id(pair.module)]
        torch.testing.assert_close(rows, (g * g).sum(1), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(cols, (g * g).sum(0), rtol=1e-10, atol=1e-14)
        # ref is exactly what autograd put into lora_B.weight.grad
        torch.testing.assert_close(ref, pair.B.grad.reshape(ref.shape), rtol=1e-10, atol=1e-14)
        assert count == 1
    assert {p.kind for p in pairs} == {"linear", "conv"}


def test_sketch_statistics_are_unbiased():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics(pairs, "sketch", sketch_dim=4, seed=3)
    batch = toy_batches(1)[0]
    G = true_weight_gradients(model, batch)
    draws = 400
    sums = [[torch.zeros_like(b[0]), torch.zeros_like(b[1])] for b in hooks.fresh]
    for _ in range(draws):
        hooks.reset()
        model.zero_grad()
        loss_fn(model, batch).backward()
        for s, b in zip(sums, hooks.fresh):
            s[0] += b[0] / draws
            s[1] += b[1] / draws
    for pair, (rows, cols) in zip(pairs, sums):
        g = G[id(pair.module)]
        # relative error of the mean of 400 sketches of dim 4: ~ sqrt(2 / (4 * 400)) = 3.5%; allow 4 sigma
        for est, true in ((rows, (g * g).sum(1)), (cols, (g * g).sum(0))):
            assert ((est.sum() - true.sum()).abs() / true.sum()) < 0.15
            assert torch.corrcoef(torch.stack([est, true]))[0, 1] > 0.9


def test_accumulated_backward_passes_are_counted():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics(pairs, "exact")
    batch = toy_batches(1)[0]
    loss_fn(model, batch).backward()
    once = [b[0].clone() for b in hooks.fresh]
    loss_fn(model, batch).backward()
    for b, first in zip(hooks.fresh, once):
        assert b[3] == 2
        torch.testing.assert_close(b[0], 2 * first)


def test_no_statistics_without_grad_and_hooks_removed():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics(pairs, "exact")
    with torch.no_grad():
        loss_fn(model, toy_batches(1)[0])
    assert all(b is None for b in hooks.fresh)
    hooks.remove()
    assert all(not m._forward_hooks for m in model.modules())
    loss_fn(model, toy_batches(1)[0]).backward()
    assert all(b is None for b in hooks.fresh)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="exact"):
        HookStatistics([], "tangent")
