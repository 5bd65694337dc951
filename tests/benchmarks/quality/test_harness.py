"""The comparison protocol's own pieces."""

import pytest
def test_weight_average_is_an_ema_of_the_trainable_weights_swapped_in_for_evaluation():
    import torch
    from torch import nn

    from benchmarks.quality.harness import WeightAverage

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    history = [model[0].weight.detach().clone()]
    average = WeightAverage(model, decay=0.5)
    for value in (1.0, 3.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
        average.update()
        history.append(model[0].weight.detach().clone())
    expected = 0.25 * history[0] + 0.25 * history[1] + 0.5 * history[2]  # EMA with decay 0.5 from the start
    with average.swapped():
        torch.testing.assert_close(model[0].weight, expected)
        assert torch.equal(model[1].weight, frozen)
    assert torch.equal(model[0].weight, history[-1])  # the training weights are back
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_build_optimizer_takes_the_diagnostic_optimizers_and_the_products():
    import torch
    from torch import nn

    from benchmarks.quality.harness import build_optimizer

    model = nn.Linear(4, 2)
    opt = build_optimizer("adafactor_fixed_lr", model, 0.01)
    group = opt.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"]) == (0.01, False, False)
    before = model.weight.detach().clone()
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    step = (model.weight.detach() - before).abs()
    # a plain lr: Adafactor's normalised update (RMS <= 1 after clipping) times 0.01, whatever the weight's RMS
    assert 0 < step.max() <= 0.01 * 4
    assert isinstance(build_optimizer("adamw", model, 0.01), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgdx", model, 0.01)
