"""The divergence check (engine/divergence.py) on loss sequences: it fires on adapters that do worse
than the base model or collapse, never on healthy noisy runs, and moves suspect checkpoints aside."""

import math
import random

import pytest

from adaprelora_diffusion.engine.checkpoints import list_checkpoints
from adaprelora_diffusion.engine.divergence import DivergenceCheck, set_aside_checkpoints

#: (step, adapter loss, base loss) at every 5th step after the grace period of the README's demo run (400 steps
#: at the demo model's recommended lr 3e-3, AdaPreLoRA v3), as the DreamBooth trainer measured them (the checks
#: leave training unchanged: final loss 0.1708 with and without them); single checks reach 1.11x (step 175)
DEMO_RUN = [(80, 0.7125, 1.6592), (85, 0.458, 1.2354), (90, 0.0507, 0.0905), (95, 0.0152, 0.0153), (100, 0.2082, 0.3668),
            (105, 0.0472, 0.0882), (110, 0.8575, 1.6029), (115, 0.2825, 0.6242), (120, 0.053, 0.063), (125, 0.4345, 1.1747),
            (130, 0.0853, 0.1951), (135, 0.3591, 1.1071), (140, 0.0551, 0.0738), (145, 0.4871, 1.4003), (150, 0.1031, 0.1401),
            (155, 0.0812, 0.1572), (160, 0.1066, 0.184), (165, 0.3673, 0.67), (170, 0.0312, 0.0481), (175, 0.0068, 0.0061),
            (180, 0.0152, 0.0148), (185, 0.0402, 0.0887), (190, 0.0289, 0.0509), (195, 0.5795, 1.4961), (200, 0.3289, 0.743),
            (205, 0.4801, 1.1515), (210, 0.125, 0.1682), (215, 0.0752, 0.2269), (220, 0.277, 0.9186), (225, 0.0097, 0.0144),
            (230, 0.0854, 0.1053), (235, 0.0987, 0.192), (240, 0.1604, 0.1945), (245, 0.0078, 0.0184), (250, 0.0056, 0.0071),
            (255, 0.0301, 0.0409), (260, 0.1348, 0.2534), (265, 0.2303, 0.5892), (270, 0.0168, 0.0297), (275, 0.0747, 0.1458),
            (280, 0.2, 0.3893), (285, 0.2976, 0.8042), (290, 1.1917, 2.4876), (295, 0.0648, 0.1004), (300, 0.0143, 0.015),
            (305, 0.1968, 0.4924), (310, 0.1423, 0.3895), (315, 0.0739, 0.1512), (320, 0.0273, 0.0573), (325, 0.0633, 0.1186),
            (330, 0.0318, 0.0358), (335, 0.0198, 0.0311), (340, 0.0119, 0.0217), (345, 0.2569, 0.5405), (350, 0.0062, 0.0066),
            (355, 0.0175, 0.0232), (360, 0.2691, 0.9357), (365, 0.0195, 0.0352), (370, 0.1936, 0.7469), (375, 0.05, 0.0965),
            (380, 0.0124, 0.0122), (385, 0.1489, 0.3235), (390, 0.3154, 0.6718), (395, 0.6509, 1.6897), (400, 0.0936, 0.2466)]


def feed(check, pairs):
    """Record pairs until the check fires; the step it fired at, or None."""
    for step, loss, base in pairs:
        if check.record(step, loss, base):
            return step
    return None


def test_the_demo_runs_checks_never_fire_whichever_steps_they_land_on():
    worst = {}
    for phase in range(0, 25, 5):  # checks every 25 steps, landing on steps = phase (mod 25)
        check = DivergenceCheck(lr=3e-3)
        windows = []
        for step, loss, base in DEMO_RUN:
            if (step - phase) % check.every == 0:
                assert not check.record(step, loss, base), (phase, step)
                if len(check.pairs) >= check.checks:
                    windows.append(check.ratio())
        worst[phase] = max(windows)
    # the README's "worst 5-check window 0.56x" (limit 1.25x), and 0.57x at the worst phase
    assert worst[0] == pytest.approx(0.560, abs=1e-3)
    assert max(worst.values()) == pytest.approx(0.570, abs=1e-3)
    check = DivergenceCheck(lr=3e-3)
    assert [s for s, _, _ in DEMO_RUN if check.due(s)][:5] == [100, 125, 150, 175, 200]  # the first verdict at 200


def test_healthy_noisy_runs_rarely_fire():
    """Diffusion-like noise, as the demo run shows it after its first 75 steps: base losses spread over 3
    decades (the timestep), the adapter at 0.3-1.0x of them, with spikes to 1.5x where the base loss is
    small (low noise levels, where the adapter's error dominates; the demo's largest was 1.34x)."""
    rng = random.Random(0)
    fired = 0
    for run in range(500):
        pairs = []
        for i in range(1, 17):  # 400 steps, as the demo
            base = math.exp(rng.uniform(math.log(0.005), math.log(1.5)))
            factor = 1.5 if base < 0.05 and rng.random() < 0.3 else rng.uniform(0.3, 1.0)
            if i > 3:  # from step 100 (the grace period)
                pairs.append((25 * i, base * factor, base))
        fired += feed(DivergenceCheck(lr=1e-3), pairs) is not None
    assert fired <= 2  # 1 in 500 with these settings; 82 with 3 checks and factor 1.1


def test_an_adapter_worse_than_the_base_model_fires_on_the_fifth_check_naming_the_lr():
    check = DivergenceCheck(lr=10)
    assert feed(check, [(25 * i, 2.6 * 1.3, 2.6) for i in range(4, 20)]) == 200
    message = str(check.error(None))
    assert "training diverged by step 200" in message and "1.30x the base model's" in message
    assert "--learning_rate 10 is too high: try 1;" in message


def test_a_collapsed_adapter_fires_and_a_barely_moving_one_does_not():
    check = DivergenceCheck(lr=100)
    assert feed(check, [(25 * i, 0.3, 0.3) for i in range(4, 20)]) == 200
    assert "collapsed" in str(check.error(None))
    assert feed(DivergenceCheck(lr=1e-8), [(25 * i, 0.3 * (1 - 1e-6), 0.3) for i in range(4, 20)]) is None


def test_a_non_finite_loss_fires():
    check = DivergenceCheck(lr=1e6)
    assert feed(check, [(100, 1.0, 2.0), (125, 1.0, 2.0), (150, 1.0, 2.0), (175, math.nan, 2.0), (200, 1.0, 2.0)]) == 200
    assert "not finite" in str(check.error(None))


def test_suspect_checkpoints_are_set_aside_and_latest_is_the_last_good_one(tmp_path):
    for step in (20, 40, 60, 80, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "manifest.json").write_text("{}")
    check = DivergenceCheck(lr=1e-2, every=10, checks=3, grace=0)
    pairs = [(10 * i, 0.5, 1.0) for i in range(1, 6)] + [(10 * i, 3.0, 1.0) for i in range(6, 11)]
    assert feed(check, pairs) == 60 and check.last_good_step == 50  # the window (40, 50, 60) is 1.33x
    error = check.error(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-40"]
    assert sorted(p.name for p in tmp_path.glob("diverged-*")) == ["diverged-checkpoint-100", "diverged-checkpoint-60",
                                                                   "diverged-checkpoint-80"]
    assert "continue from checkpoint-40 with --resume_from_checkpoint latest" in str(error)
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-40")  # the Trainer's `latest` agrees


def test_nothing_to_set_aside_and_bad_settings():
    assert set_aside_checkpoints("/nonexistent/folder", 0) == ([], None)
    with pytest.raises(ValueError):
        DivergenceCheck(lr=1, factor=1.0)
