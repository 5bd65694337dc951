"""Hook statistics against dL/dW computed directly."""

import pytest
import torch

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
    hooks = HookStatistics([[p] for p in pairs], "exact")
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
    hooks = HookStatistics([[p] for p in pairs], "sketch", sketch_dim=4, seed=3)
    captured = {}
    for i, pair in enumerate(pairs):  # keep each layer's input and output gradient
        def keep(module, args, output, i=i):
            captured[i] = [args[0].detach()]
            output.register_hook(lambda g: captured[i].append(g.detach()))
        pair.module.register_forward_hook(keep)
    G = true_weight_gradients(model, toy_batches(1)[0])
    draws = 600
    for i, pair in enumerate(pairs):
        x, d = captured[i]
        x = pair.module.lora_dropout[pair.adapter](x)
        def reduce(i=i, pair=pair, x=x, d=d):
            hooks.advance()  # new sketch matrices for every draw
            if pair.kind == "linear":
                a, b = hooks._linear_sums(i, x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1]))
            else:
                a, b = hooks._conv_sums(i, pair, x, d)
            return hooks.row_col_sums(a, b)

        estimates = [reduce() for _ in range(draws)]
        rows = sum(e[0] for e in estimates) / draws
        cols = sum(e[1] for e in estimates) / draws
        cols_est = [e[1] for e in estimates]
        g = G[id(pair.module)]
        # the mean of 600 sketches of dim 4: ~3% relative noise per entry, less on the total
        for est, true in ((rows, (g * g).sum(1)), (cols, (g * g).sum(0))):
            torch.testing.assert_close(est.sum(), true.sum(), rtol=0.1, atol=0)
            assert torch.corrcoef(torch.stack([est, true]))[0, 1] > 0.9
        # and a single sketch is really random (not the exact value in disguise)
        assert not torch.allclose(cols_est[0], cols_est[1])


def test_sketches_are_linear_so_accumulation_sketches_the_summed_gradient():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics([[p] for p in pairs], "sketch", sketch_dim=5, seed=7)
    first, second = toy_batches(2)
    G1 = true_weight_gradients(model, first)
    G2 = true_weight_gradients(model, second)
    hooks.reset()
    loss_fn(model, first).backward()
    loss_fn(model, second).backward()
    for i, pair in enumerate(pairs):
        gs1, s2g, _, count = hooks.fresh[i]
        s1, s2 = hooks.sketch_matrices(i, gs1)
        G = G1[id(pair.module)] + G2[id(pair.module)]
        torch.testing.assert_close(gs1, G @ s1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s2g, s2.T @ G, rtol=1e-10, atol=1e-12)
        assert count == 2
    before = hooks.sketch_matrices(0, gs1)[0].clone()
    hooks.advance()
    assert not torch.equal(hooks.sketch_matrices(0, gs1)[0], before)


def test_accumulated_backward_passes_are_counted():
    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics([[p] for p in pairs], "exact")
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
    hooks = HookStatistics([[p] for p in pairs], "exact")
    with torch.no_grad():
        loss_fn(model, toy_batches(1)[0])
    assert all(b is None for b in hooks.fresh)
    hooks.remove()
    assert all(not m._forward_hooks for m in model.modules())
    loss_fn(model, toy_batches(1)[0]).backward()
    assert all(b is None for b in hooks.fresh)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="exact"):
        HookStatistics([[]], "tangent")


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_checkpointing_still_frees_the_inputs_of_hooked_layers(mode):
    """Under non-reentrant checkpointing the activations inside the region are dropped after forward and
    recomputed in backward; the hooks must not keep the LoRA layers' inputs alive in between."""
    import weakref

    from torch.utils.checkpoint import checkpoint

    model = make_toy()
    pairs, _ = find_lora_pairs(model)
    hooks = HookStatistics([[p] for p in pairs], mode)
    inside = []  # the input of fc2, made inside the checkpointed region
    model.fc2.register_forward_pre_hook(lambda module, args: inside.append(weakref.ref(args[0])))
    x, y = toy_batches(1)[0]
    h = torch.tanh(model.conv(x)).flatten(1)
    out = checkpoint(lambda t: model.head(torch.tanh(model.fc2(torch.tanh(model.fc1(t))))), h, use_reentrant=False)
    loss = ((out - y) ** 2).mean()
    assert len(inside) == 1 and inside[0]() is None  # freed after forward, as checkpointing intends
    loss.backward()
    assert len(inside) == 2  # recomputed in backward
    reference = make_toy()
    reference_hooks = HookStatistics([[p] for p in find_lora_pairs(reference)[0]], mode)
    loss_fn(reference, (x, y)).backward()
    for got, want in zip(hooks.fresh, reference_hooks.fresh):
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert got[3] == want[3] == 1
