"""AdaPreLoRA as an optimizer: the real step, state round trip, stability, bad input."""

import copy
import io
import warnings

import pytest
import torch

from adaprelora_diffusion.optim import AdaPreLoRA, find_lora_pairs

from .conftest import loss_fn, make_toy, toy_batches
from .test_statistics import true_weight_gradients


def reference_step(A, B, Ga, Gb, rows, cols, damping, balance=0.5):
    """The design note's closed form for one module, written out independently (float64)."""
    r = A.shape[0]
    S = 0.5 * (rows.sum() + cols.sum())
    d1, d2 = rows.sqrt() / S**0.25, cols.sqrt() / S**0.25
    KB, KA = B.T @ torch.diag(d1) @ B, A @ torch.diag(d2) @ A.T
    delta = (damping + torch.finfo(torch.float64).eps) * (KB.trace() + KA.trace()) / (2 * r) + 1e-30
    I = torch.eye(r, dtype=torch.float64)
    KB, KA = KB + delta * I, KA + delta * I
    core = Ga @ A.T
    dA = torch.linalg.solve(KB, Ga / d2[None, :] - (1 - balance) * core @ torch.linalg.solve(KA, A))
    dB = torch.linalg.solve(KA.T, (Gb / d1[:, None] - balance * B @ torch.linalg.solve(KB, B.T @ Gb)).T).T
    return dA, dB


def reference_bounds(dA, dB, A, lr, s, step_bound, trust_ratio):
    """Version 3's bounds on one module's parameter steps, written out component by component."""
    dA, dB = dA.clone(), dB.clone()
    (r, n), m = dA.shape, dB.shape[0]
    if step_bound is not None:
        for i in range(r):
            row, col = dA[i].norm(), dB[:, i].norm()
            if row > step_bound * lr * n**0.5:
                dA[i] *= step_bound * lr * n**0.5 / row
            if col > step_bound * lr / s * m**0.5:
                dB[:, i] *= step_bound * lr / s * m**0.5 / col
    if trust_ratio is not None and dA.norm() > trust_ratio * A.norm() > 0:
        dA *= trust_ratio * A.norm() / dA.norm()
    return dA, dB


def projected_sums(A, B, G):
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    Gh = PB @ G + G @ PA - PB @ G @ PA
    return (Gh * Gh).sum(1), (Gh * Gh).sum(0)


@pytest.mark.parametrize("stats", ["exact", "sketch", "tangent"])
@pytest.mark.parametrize("rslora,beta1,bounds", [(False, 0.0, (1.0, 0.1)), (True, 0.0, (1.0, 0.1)), (False, 0.9, (1.0, 0.1)),
                                                 (False, 0.0, (None, None)), (True, 0.0, (0.3, None)), (False, 0.0, (None, 0.01))])
def test_one_real_step_equals_the_closed_form(stats, rslora, beta1, bounds):
    """Version 2's closed form, then version 3's bounds (a per-component loop) on the parameter steps."""
    model = make_toy(rslora=rslora)
    batch = toy_batches(1)[0]
    G = true_weight_gradients(model, batch)  # also leaves the factor gradients in .grad
    pairs, _ = find_lora_pairs(model)
    before = {id(p): (p.A.detach().clone().reshape(p.A.shape[0], -1), p.B.detach().clone().reshape(p.B.shape[0], -1)) for p in pairs}
    grads = {id(p): (p.A.grad.reshape(p.A.shape[0], -1).clone(), p.B.grad.reshape(p.B.shape[0], -1).clone()) for p in pairs}
    for module in model.modules():  # keep only the LoRA factors' gradients for the step itself
        if hasattr(module, "base_layer"):
            module.base_layer.weight.grad = None
            module.base_layer.weight.requires_grad_(False)
    lr, damping, betas, eps = 0.05, 0.0, (beta1, 0.99), 1e-30
    step_bound, trust_ratio = bounds
    opt = AdaPreLoRA.from_model(model, lr=lr, damping=damping, betas=betas, eps=eps, clip_threshold=None, stats=stats,
                                step_bound=step_bound, trust_ratio=trust_ratio)
    # the hooks were installed after the backward above: run it again so they see it
    model.zero_grad()
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()
    shortened = 0
    for pair in pairs:
        m, n, r = pair.shape
        A, B = before[id(pair)]
        s = pair.module.scaling[pair.adapter]
        assert s == pytest.approx(5.0 / (3**0.5 if rslora else 3))
        Ga, Gb = grads[id(pair)][0] / s, grads[id(pair)][1] / s
        g = G[id(pair.module)]
        if stats == "exact":
            rows, cols = (g * g).sum(1), (g * g).sum(0)
        elif stats == "tangent":
            rows, cols = projected_sums(A, B, g)
        else:  # the sketch is random: read back what the optimizer stored (EMA after one step)
            state_a, state_b = opt.state[pair.A], opt.state[pair.B]
            rows = state_b["row_stats"] / (1 - betas[1]) - n * eps
            cols = state_a["col_stats"] / (1 - betas[1]) - m * eps
            assert 0.2 < rows.sum() / (g * g).sum() < 5  # one sketch: right order of magnitude
        dA, dB = reference_step(A, B, Ga, Gb, rows + n * eps, cols + m * eps, damping)
        step_A, step_B = reference_bounds(-lr / s * dA, -lr / s * dB, A, lr, s, step_bound, trust_ratio)
        shortened += int(not torch.equal(step_A, -lr / s * dA)) + int(not torch.equal(step_B, -lr / s * dB))
        torch.testing.assert_close(pair.A.detach().reshape(r, n), A + step_A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(pair.B.detach().reshape(m, r), B + step_B, rtol=1e-9, atol=1e-12)
    assert (shortened > 0) == (bounds != (None, None))  # where bounds are on, they act on this toy
    opt.close()


def run(model, opt, batches):
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


@pytest.mark.parametrize("stats", ["exact", "sketch", "tangent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_round_trip_is_bit_identical(stats, dtype):
    batches = toy_batches(7, dtype=dtype)
    kwargs = dict(lr=0.02, stats=stats, weight_decay=0.01)
    straight = make_toy(dtype=dtype)
    with AdaPreLoRA.from_model(straight, **kwargs) as opt:
        run(straight, opt, batches)

    first = make_toy(dtype=dtype)
    with AdaPreLoRA.from_model(first, **kwargs) as opt:
        run(first, opt, batches[:3])
        buffer = io.BytesIO()
        torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_toy(seed=123, dtype=dtype)  # a fresh copy: different initial values
    resumed.load_state_dict(saved["model"])
    with AdaPreLoRA.from_model(resumed, **kwargs) as opt:
        opt.load_state_dict(saved["optim"])
        assert all(v.dtype != torch.bfloat16 for p in find_lora_pairs(resumed)[0] for v in opt.state[p.A].values())
        run(resumed, opt, batches[3:])
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_training_from_zero_B_is_stable():
    model = make_toy(random_b=False)
    pairs, _ = find_lora_pairs(model)
    A0 = [p.A.detach().clone() for p in pairs]
    batches = toy_batches(1)
    norms0 = [p.A.norm().item() for p in pairs]
    with AdaPreLoRA.from_model(model, lr=0.02) as opt:
        opt.zero_grad()
        first = loss_fn(model, batches[0])
        first.backward()
        opt.step()
        for p, a in zip(pairs, A0):  # from B = 0 the first step moves only B
            assert torch.equal(p.A.detach(), a)
            assert p.B.detach().abs().sum() > 0
        for _ in range(299):
            opt.zero_grad()
            loss = loss_fn(model, batches[0])
            loss.backward()
            opt.step()
    assert torch.isfinite(loss) and loss < 0.5 * first
    for p, n0 in zip(pairs, norms0):
        assert torch.isfinite(p.A).all() and torch.isfinite(p.B).all()
        assert p.A.norm() < 10 * n0 and p.B.norm() < 10 * n0
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("where", ["lora", "adamw"])
def test_non_finite_gradient_skips_the_step_and_keeps_state(where):
    model = make_toy()
    batches = toy_batches(3)
    with AdaPreLoRA.from_model(model, lr=0.02) as opt:
        run(model, opt, batches[:1])
        params = copy.deepcopy(list(model.parameters()))
        state = copy.deepcopy(opt.state_dict()["state"])
        opt.zero_grad()
        loss_fn(model, batches[1]).backward()
        target = model.fc1.lora_A["default"].weight if where == "lora" else model.head.weight
        target.grad[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="skipped a step"):
            opt.step()
        assert opt.skipped_steps == 1
        for a, b in zip(params, model.parameters()):
            assert torch.equal(a, b)
        after = opt.state_dict()["state"]
        for key in state:
            for name in state[key]:
                assert torch.equal(state[key][name], after[key][name])
        run(model, opt, batches[2:])  # training goes on normally afterwards
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("stats", ["exact", "sketch"])
def test_statistics_follow_loss_scaling_as_done_by_grad_scaler(stats):
    batch = toy_batches(1, dtype=torch.float32)[0]
    plain = make_toy(dtype=torch.float32)
    with AdaPreLoRA.from_model(plain, lr=0.02, stats=stats) as opt:
        opt.zero_grad()
        loss_fn(plain, batch).backward()
        opt.step()
    scaled = make_toy(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with AdaPreLoRA.from_model(scaled, lr=0.02, stats=stats) as opt:
        opt.zero_grad()
        scaler.scale(loss_fn(scaled, batch)).backward()
        scaler.unscale_(opt)  # as accelerate does before gradient clipping
        scaler.step(opt)
        scaler.update()
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_of_equal_micro_batches_equals_one_batch():
    batch = toy_batches(1)[0]
    one = make_toy()
    with AdaPreLoRA.from_model(one, lr=0.02) as opt:
        opt.zero_grad()
        loss_fn(one, batch).backward()
        opt.step()
    two = make_toy()
    with AdaPreLoRA.from_model(two, lr=0.02) as opt:
        opt.zero_grad()
        for _ in range(2):
            (loss_fn(two, batch) / 2).backward()
        opt.step()
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stats", ["sketch", "tangent"])
def test_accumulating_two_different_micro_batches_equals_their_union(stats):
    (x1, y1), (x2, y2) = toy_batches(2)
    union = make_toy()
    with AdaPreLoRA.from_model(union, lr=0.02, stats=stats) as opt:
        opt.zero_grad()
        loss_fn(union, (torch.cat([x1, x2]), torch.cat([y1, y2]))).backward()
        opt.step()
    parts = make_toy()
    with AdaPreLoRA.from_model(parts, lr=0.02, stats=stats) as opt:
        opt.zero_grad()
        for batch in ((x1, y1), (x2, y2)):
            (loss_fn(parts, batch) / 2).backward()
        opt.step()
    for a, b in zip(union.parameters(), parts.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _one_step_deltas(model, **kwargs):
    """W-space factor steps of one AdaPreLoRA step, per pair, and the optimizer."""
    pairs, _ = find_lora_pairs(model)
    before = {p.name: (p.A.detach().clone(), p.B.detach().clone()) for p in pairs}
    opt = AdaPreLoRA.from_model(model, **kwargs)
    run(model, opt, toy_batches(1))
    deltas = {p.name: (p.A.detach() - before[p.name][0], p.B.detach() - before[p.name][1]) for p in pairs}
    return deltas, opt, pairs, before


def test_clipping_scales_the_step_to_the_threshold_in_the_sqrt_v_weighted_rms():
    common = dict(lr=1.0, stats="exact", betas=(0.0, 0.9), damping=0.0, step_bound=None, trust_ratio=None)
    free, opt, pairs, before = _one_step_deltas(make_toy(), clip_threshold=None, **common)
    clipped, opt_c, _, _ = _one_step_deltas(make_toy(), clip_threshold=1e-3, **common)
    for p in pairs:
        m, n, r = p.shape
        s = p.module.scaling["default"]
        A0, B0 = (t.reshape(t.shape[0], -1) for t in before[p.name])
        dA, dB = (-t.reshape(t.shape[0], -1) * s / common["lr"] for t in free[p.name])  # W-space directions
        rows = opt.state[p.B]["row_stats"] / (1 - 0.9)  # the first step's statistics, bias-corrected
        cols = opt.state[p.A]["col_stats"] / (1 - 0.9)
        S = 0.5 * (rows.sum() + cols.sum())
        sqrt_v = torch.outer(rows.sqrt(), cols.sqrt()) / S.sqrt()
        Z = B0 @ dA + dB @ A0
        rms = ((sqrt_v * Z**2).sum() / sqrt_v.sum()).sqrt()
        assert rms > 1e-3  # the unclipped step is above the threshold, so clipping acts
        for f, c in zip(free[p.name], clipped[p.name]):
            torch.testing.assert_close(c, f * (1e-3 / rms), rtol=1e-8, atol=1e-14)
    opt.close()
    opt_c.close()


def test_momentum_free_and_update_momentum_variants_train():
    for kwargs in (dict(betas=(0.0, 0.999)), dict(momentum="update")):
        model = make_toy(random_b=False)
        batches = toy_batches(1) * 50
        with AdaPreLoRA.from_model(model, lr=0.02, **kwargs) as opt:
            first = loss_fn(model, batches[0]).item()
            run(model, opt, batches)
        assert loss_fn(model, batches[0]).item() < 0.7 * first


def test_per_model_overrides_make_groups():
    a, b = make_toy(), make_toy(seed=1)
    with AdaPreLoRA.from_model([a, {"model": b, "lr": 1e-5}], lr=1e-3) as opt:
        lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [1e-5, 1e-3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(damping=-1.0), "damping"),
        (dict(balance=1.5), "balance"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(stats="full"), "stats"),
        (dict(momentum="nesterov"), "momentum"),
        (dict(sketch_dim=0), "sketch_dim"),
        (dict(beta2_decay=0.5), "beta2_decay"),
        (dict(beta2_decay=-1.5), "beta2_decay"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"),
    ],
)
def test_bad_hyper_parameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaPreLoRA.from_model(make_toy(), **kwargs)


def test_close_removes_hooks_and_a_closed_optimizer_refuses_to_step():
    model = make_toy()
    opt = AdaPreLoRA.from_model(model, lr=1e-3)
    assert any(m._forward_hooks for m in model.modules())
    opt.close()
    assert not any(m._forward_hooks for m in model.modules())
    loss_fn(model, toy_batches(1)[0]).backward()
    with pytest.raises(ValueError, match="closed"):
        opt.step()
    with AdaPreLoRA.from_model(model, lr=1e-3, stats="tangent"):
        assert not any(m._forward_hooks for m in model.modules())


def _bypass_lora_modules(model, names):
    """Make the LoRA layers ``names`` compute their output from the factor weights directly, as a
    fused LoRA kernel does, so the module hooks on lora_A / lora_B never run."""
    for name, module in model.named_modules():
        if name in names:
            def fused(x, module=module):
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                return module.base_layer(x) + (x @ A.T @ B.T) * module.scaling["default"]
            module.forward = fused


@pytest.mark.parametrize("stats", ["exact", "sketch"])
def test_hooks_that_never_fire_switch_to_tangent_with_a_warning(stats):
    batch = toy_batches(1)[0]
    model, reference = make_toy(), make_toy()
    _bypass_lora_modules(model, {"fc1"})
    opt = AdaPreLoRA.from_model(model, lr=1e-2, stats=stats)
    ref_opt = AdaPreLoRA.from_model(reference, lr=1e-2, stats="tangent")
    for m, o in ((model, opt), (reference, ref_opt)):
        loss_fn(m, batch).backward()
    with pytest.warns(RuntimeWarning, match="never fired.*'fc1'.*stats='tangent'"):
        opt.step()
    ref_opt.step()
    assert opt.stats == "tangent" and not any(m._forward_hooks for m in model.modules())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_a_layer_that_did_not_run_is_not_taken_for_a_bypassed_hook():
    model = make_toy()
    model.fc2.forward = lambda x: x[:, :10]  # fc2 (LoRA) does not run: no gradient, no statistics needed
    opt = AdaPreLoRA.from_model(model, lr=1e-2)
    loss_fn(model, toy_batches(1)[0]).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.stats == "sketch"


def _state_keys(opt, param):
    return set(opt.state[param])


def test_momentum_free_default_keeps_only_the_statistics():
    model = make_toy()
    with AdaPreLoRA.from_model(model, lr=0.01) as opt:
        assert opt.defaults["betas"][0] == 0.0
        run(model, opt, toy_batches(2))
        for p in find_lora_pairs(model)[0]:
            m, n, _ = p.shape
            assert _state_keys(opt, p.A) == {"step", "col_stats"} and _state_keys(opt, p.B) == {"step", "row_stats"}
            assert opt.state[p.A]["col_stats"].numel() == n and opt.state[p.B]["row_stats"].numel() == m
    with AdaPreLoRA.from_model(make_toy(), lr=0.01, betas=(0.9, 0.999)) as opt:
        p = opt._group_pairs[0][0]
        assert {"exp_avg_A", "col_stats"} <= _state_keys(opt, p.A)


def test_switching_momentum_on_later_allocates_its_buffers_and_keeps_the_statistics():
    batches = toy_batches(4)
    model = make_toy()
    with AdaPreLoRA.from_model(model, lr=0.01, stats="exact") as opt:
        run(model, opt, batches[:2])
        pair = opt._group_pairs[0][0]
        stats_before = opt.state[pair.A]["col_stats"].clone()
        for group in opt.param_groups:
            group["betas"] = (0.9, 0.999)
        run(model, opt, batches[2:3])
        assert "exp_avg_A" in opt.state[pair.A] and opt.state[pair.A]["exp_avg_A"].abs().sum() > 0
        assert not torch.equal(opt.state[pair.A]["col_stats"], stats_before)  # updated, not reset
        assert float(opt.state[pair.A]["step"]) == 3.0
        run(model, opt, batches[3:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_checkpoint_of_the_momentum_rule_resumes_exactly_in_a_default_optimizer():
    """Checkpoints written before the momentum-free default (betas (0.9, 0.999), no beta2_decay,
    scale_parameter or adamw_betas in their groups) resume with their own settings."""
    batches = toy_batches(5)
    kwargs = dict(lr=0.02, betas=(0.9, 0.999), stats="exact")
    straight = make_toy()
    with AdaPreLoRA.from_model(straight, **kwargs) as opt:
        run(straight, opt, batches)
    first = make_toy()
    with AdaPreLoRA.from_model(first, **kwargs) as opt:
        run(first, opt, batches[:2])
        saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("beta2_decay", "scale_parameter", "adamw_betas"):
            group.pop(key)
    resumed = make_toy(seed=5)
    resumed.load_state_dict(first.state_dict())
    with AdaPreLoRA.from_model(resumed, lr=0.02, stats="exact") as opt:  # the new defaults
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["beta2_decay"] is None
        run(resumed, opt, batches[2:])
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_beta2_decay_follows_adafactors_schedule():
    batches = toy_batches(2)
    model = make_toy()
    eps = 1e-30
    with AdaPreLoRA.from_model(model, lr=1e-3, stats="exact", beta2_decay=-0.8, eps=eps) as opt:
        pairs = opt._group_pairs[0]
        sums = []
        for batch in batches:
            G = true_weight_gradients(model, batch)
            for module in model.modules():
                if hasattr(module, "base_layer"):
                    module.base_layer.weight.requires_grad_(False)
            sums.append({id(p): ((G[id(p.module)] ** 2).sum(1), (G[id(p.module)] ** 2).sum(0)) for p in pairs})
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            if len(sums) == 1:  # beta2_1 = 1 - 1^-0.8 = 0: the first step's statistics are its own, unbiased
                for p in pairs:
                    torch.testing.assert_close(opt.state[p.B]["row_stats"], sums[0][id(p)][0], rtol=1e-9, atol=1e-20)
        weight = 2.0 ** -0.8  # 1 - beta2_2
        for p in pairs:
            expected = (1 - weight) * sums[0][id(p)][1] + weight * sums[1][id(p)][1]
            torch.testing.assert_close(opt.state[p.A]["col_stats"], expected, rtol=1e-9, atol=1e-20)


def test_scale_parameter_multiplies_each_layers_step_by_its_weight_rms():
    common = dict(lr=0.01, stats="exact", clip_threshold=None)
    plain, opt, pairs, _ = _one_step_deltas(make_toy(), **common)
    scaled, opt_s, _, _ = _one_step_deltas(make_toy(), scale_parameter=True, **common)
    for p in pairs:
        rms = max(1e-3, p.module.get_base_layer().weight.detach().square().mean().sqrt().item())
        for a, b in zip(plain[p.name], scaled[p.name]):
            torch.testing.assert_close(b, a * rms, rtol=1e-9, atol=1e-15)
    opt.close()
    opt_s.close()


def test_scale_parameter_refuses_a_quantized_base_weight():
    model = make_toy()
    model.fc1.base_layer.weight = torch.nn.Parameter(torch.zeros(7, dtype=torch.uint8), requires_grad=False)
    with AdaPreLoRA.from_model(model, lr=0.01, scale_parameter=True, stats="tangent") as opt:
        with pytest.raises(ValueError, match="scale_parameter needs the floating-point base weight of 'fc1'"):
            opt._weight_rms(next(b for b in opt._buckets if b.pairs[0].name == "fc1"))


@pytest.mark.parametrize("adamw_betas", [(0.9, 0.999), (0.5, 0.9)])
def test_non_pair_parameters_train_with_torch_adamw_and_adamw_betas(adamw_betas):
    batches = toy_batches(3)
    model, reference = make_toy(), make_toy()
    with AdaPreLoRA.from_model(model, lr=0.01, adamw_betas=adamw_betas, weight_decay=0.1) as opt:
        for group in opt.param_groups:
            if group["lora"]:
                group["lr"] = 0.0  # keep the factors still, so both heads see the same features
        run(model, opt, batches)
    torch_opt = torch.optim.AdamW(reference.head.parameters(), lr=0.01, betas=adamw_betas, weight_decay=0.1)
    for batch in batches:
        reference.zero_grad()
        loss_fn(reference, batch).backward()
        torch_opt.step()
    torch.testing.assert_close(model.head.weight, reference.head.weight, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.999)])
def test_a_zero_lr_step_leaves_the_factors_unchanged(betas):
    """lr = 0 happens at the first warmup step; the clip's rescaling must not turn 0 into NaN."""
    model = make_toy()
    before = [p.detach().clone() for p in model.parameters()]
    with AdaPreLoRA.from_model(model, lr=0.0, betas=betas, clip_threshold=1e-6) as opt:
        run(model, opt, toy_batches(2))
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_version_3_bounds_hold_on_every_step_from_b_zero():
    """From peft's B = 0 start at a large lr, where the bounds act: no row of A moves more than lr·sqrt(n), no
    column of B more than (lr/s)·sqrt(m), A by at most 10% of its norm; the first step moves only B."""
    model = make_toy(random_b=False)
    pairs, _ = find_lora_pairs(model)
    lr, acted = 0.5, 0
    with AdaPreLoRA.from_model(model, lr=lr) as opt:
        for t, batch in enumerate(toy_batches(6)):
            before = {p.name: (p.a_matrix(p.A.detach()).clone(), p.b_matrix(p.B.detach()).clone()) for p in pairs}
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            for p in pairs:
                m, n, _ = p.shape
                s = p.scaling
                A0, B0 = before[p.name]
                dA, dB = p.a_matrix(p.A.detach()) - A0, p.b_matrix(p.B.detach()) - B0
                assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
                if t == 0:
                    assert torch.equal(dA, torch.zeros_like(dA)) and dB.abs().sum() > 0
                assert (dA.norm(dim=1) <= lr * n**0.5 * (1 + 1e-9)).all()
                assert (dB.norm(dim=0) <= lr / s * m**0.5 * (1 + 1e-9)).all()
                assert dA.norm() <= 0.1 * A0.norm() * (1 + 1e-9)
                acted += int(dA.norm() >= 0.1 * A0.norm() * (1 - 1e-9)) + int((dB.norm(dim=0) >= lr / s * m**0.5 * (1 - 1e-9)).any())
    assert acted > 0  # the bounds were reached, so the checks above could fail


@pytest.mark.parametrize("bounds", [dict(), dict(step_bound=None, trust_ratio=None)])
def test_the_step_on_w_does_not_depend_on_alpha(bounds):
    """W = W0 + s·B·A with alpha 3 (s = 1) and alpha 12 (s = 4), the same A and B = 0: every step moves W alike,
    with version 3's bounds (B's bound scales with 1/s, A's does not) and without them."""
    products = []
    for alpha in (3.0, 12.0):
        model = make_toy(alpha=alpha, random_b=False)
        pairs, _ = find_lora_pairs(model)
        with AdaPreLoRA.from_model(model, lr=0.2, damping=0.0, stats="exact", **bounds) as opt:
            run(model, opt, toy_batches(5))
        products.append([p.scaling * p.b_matrix(p.B.detach()) @ p.a_matrix(p.A.detach()) for p in pairs])
    for w1, w4 in zip(*products):
        assert w1.abs().max() > 1e-3  # the LoRA has moved
        torch.testing.assert_close(w1, w4, rtol=1e-7, atol=1e-10)
