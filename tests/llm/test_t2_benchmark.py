"""T2 of the quality benchmark runs through the LLM trainer and measures what the direct loop measured."""

import math

import pytest

from benchmarks.quality.harness import Config, run_one
from benchmarks.quality.tasks import LanguageAdaptation, PretrainSpec


class DirectLoop:
    """T2 without its `run`: the harness's own loop (forward, backward, step, zero_grad), as before."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        if name == "run":
            raise AttributeError(name)
        return getattr(self._task, name)


@pytest.mark.parametrize("config", [Config("adaprelora", "adaprelora"), Config("adamw", "adamw"),
                                    Config("adaprelora[beta1=0]", "adaprelora", {"betas": (0.0, 0.999)})])
def test_t2_through_the_trainer_equals_the_direct_loop(tmp_path, monkeypatch, config):
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tmp_path / "cache"))
    task = LanguageAdaptation(PretrainSpec(hidden=32, length=16, steps=30, batch=8), steps=6, batch=4, eval_every=3, n_eval=16)
    through_trainer = run_one(task, config, lr=0.01, seed=0)
    direct = run_one(DirectLoop(task), config, lr=0.01, seed=0)
    assert through_trainer.eval_steps == direct.eval_steps == [1, 3, 6]
    assert through_trainer.final == direct.final and through_trainer.curve == direct.curve  # bit for bit
    assert through_trainer.state_bytes == direct.state_bytes
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(through_trainer.train_loss, direct.train_loss))
