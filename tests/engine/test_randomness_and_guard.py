import pytest
import torch

from adaprelora_diffusion.engine.errors import TrainingError
from adaprelora_diffusion.engine.nonfinite import NonFiniteGuard
from adaprelora_diffusion.engine.randomness import keyed_randn, mix


def test_keyed_draws_depend_on_the_key_alone():
    torch.manual_seed(1)
    a = keyed_randn((3, 4), 0, 1, 7)
    torch.manual_seed(2)  # the global generator plays no part
    assert torch.equal(a, keyed_randn((3, 4), 0, 1, 7))
    assert not torch.equal(a, keyed_randn((3, 4), 0, 1, 8))
    assert mix(1, 2) != mix(2, 1) and 0 <= mix(2**70, -5) < 2**63


def test_guard_resets_on_a_good_step_and_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard(3, advice="Lower --learning_rate.")
    for ok in (False, False, True, False, False):
        guard.record(ok, step=1)
    with pytest.raises(TrainingError, match=r"3 steps in a row.*step 9.*Lower --learning_rate"):
        guard.record(False, step=9)
    with pytest.raises(ValueError):
        NonFiniteGuard(0)
