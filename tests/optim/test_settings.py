"""AdaPreLoRA's settings are defined once (optim/settings.py) and every surface is generated from it:
the optimizer's own defaults agree, and the DreamBooth flags, the settings a resume keeps, the LLM
settings and flags and the flag -> argument table list exactly those settings."""

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch

from adaprelora_diffusion.optim import AdaPreLoRA
from adaprelora_diffusion.optim.settings import (ADAPRELORA_SETTINGS, PREFIX, keyword_table, lr_problem, normalized,
                                                 settings_problems)

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [s.flag for s in ADAPRELORA_SETTINGS]


def test_the_defaults_are_the_optimizers_own():
    parameters = inspect.signature(AdaPreLoRA.__init__).parameters
    by_keyword: dict[str, list] = {}
    for s in ADAPRELORA_SETTINGS:
        assert s.keyword in parameters, f"{s.name} sets {s.keyword}, which AdaPreLoRA does not take"
        by_keyword.setdefault(s.keyword, []).append(s)
    for keyword, members in by_keyword.items():
        default = parameters[keyword].default
        if members[0].index is None:
            assert default == members[0].default, (keyword, default, members[0].default)
        else:
            assert tuple(default) == tuple(s.default for s in sorted(members, key=lambda s: s.index)), keyword


def test_every_surface_lists_exactly_the_settings():
    from adaprelora_diffusion.dreambooth.config import TrainConfig, build_parser
    from adaprelora_diffusion.dreambooth.trainer import FIXED_ON_RESUME
    from adaprelora_diffusion.llm.settings import AdaPreLoRAArguments, AdaPreLoRASettings
    from adaprelora_diffusion.optim import OPTIMIZER_SETTINGS

    config_fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name.startswith(PREFIX)}
    assert list(config_fields) == FLAGS
    llm_fields = {f.name: f for f in dataclasses.fields(AdaPreLoRASettings)}
    assert list(llm_fields) == [s.name for s in ADAPRELORA_SETTINGS]
    assert [f.name for f in dataclasses.fields(AdaPreLoRAArguments)] == FLAGS
    help_text = " ".join(build_parser().format_help().split())
    for s in ADAPRELORA_SETTINGS:
        assert config_fields[s.flag].default == llm_fields[s.name].default == s.default
        assert config_fields[s.flag].metadata["help"] == "AdaPreLoRA: " + s.help
        assert llm_fields[s.name].metadata["help"] == s.help
        assert f"--{s.flag}" in help_text and " ".join(s.help.split()) in help_text
        assert (s.flag in FIXED_ON_RESUME) == s.fixed_on_resume
    mapped = OPTIMIZER_SETTINGS["adaprelora"]
    assert {k: v for k, v in mapped.items() if (k if isinstance(k, str) else k[0]).startswith(PREFIX)} == keyword_table()
    assert mapped[("adaprelora_beta1", "adaprelora_beta2")] == "betas"  # one tuple-valued argument from two flags


def test_the_dreambooth_llm_and_app_checks_are_the_same_rule():
    from adaprelora_diffusion.dreambooth.config import TrainConfig, parse_config
    from adaprelora_diffusion.llm.settings import AdaPreLoRASettings

    with pytest.raises(ValueError, match=r"--adaprelora_balance must be in \[0, 1\], got 1.5"):
        TrainConfig(adaprelora_balance=1.5).validate()
    with pytest.raises(ValueError, match=r"adaprelora balance must be in \[0, 1\], got 1.5"):
        AdaPreLoRASettings(balance=1.5)
    with pytest.raises(ValueError, match=r"adaprelora damping must be a number >= 0, got -1"):
        AdaPreLoRASettings(damping=-1)
    assert settings_problems({"adaprelora_momentum": "nesterov", "adaprelora_eps": math.nan, "adaprelora_beta1": 0.5}) == [
        "--adaprelora_eps must be a number > 0, got nan.", "--adaprelora_momentum must be one of gradient, update, got 'nesterov'."]
    # "off" spellings mean None everywhere: on the flags, in the config object and in the LLM settings
    assert parse_config(["--adaprelora_clip_threshold", "-1"]).adaprelora_clip_threshold is None
    assert TrainConfig(adaprelora_clip_threshold=0).optimizer_settings()["adaprelora_clip_threshold"] is None
    assert AdaPreLoRASettings(clip_threshold=0.0, beta2_decay=0).clip_threshold is None
    assert normalized({"adaprelora_beta2_decay": 0, "other": 0}) == {"adaprelora_beta2_decay": None, "other": 0}
    switchable = [s for s in ADAPRELORA_SETTINGS if s.off is not None]
    assert {"clip_threshold", "step_bound", "trust_ratio"} <= {s.name for s in switchable}
    for s in switchable:  # e.g. --adaprelora_step_bound 0 --adaprelora_trust_ratio 0: version 2's rule
        assert getattr(parse_config([f"--{s.flag}", "0"]), s.flag) is None, s.flag
        assert getattr(AdaPreLoRASettings(**{s.name: 0.0}), s.name) is None, s.name


def test_one_learning_rate_rule_for_the_optimizers_and_both_trainers():
    from adaprelora_diffusion.dreambooth.config import TrainConfig
    from adaprelora_diffusion.optim import make_optimizer

    assert lr_problem(0.0) is None and lr_problem(1e-4) is None
    for bad in (-1e-4, math.inf, math.nan, "1e-4", True):
        assert lr_problem(bad, "--learning_rate").startswith("--learning_rate must be a finite number >= 0")
        with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
            make_optimizer("adamw", torch.nn.Linear(2, 2), lr=bad)
    with pytest.raises(ValueError, match="--text_encoder_lr must be a finite number >= 0, got -1"):
        TrainConfig(text_encoder_lr=-1.0).validate()


def test_balance_is_the_share_of_the_common_part_that_As_step_carries():
    """The help text's claim, in float64 with the Frobenius metric: P_B (B dA) P_A = c P_B G P_A."""
    from adaprelora_diffusion.optim.closed_form import preconditioned_step

    g = torch.Generator().manual_seed(0)
    A, B, G = (torch.randn(1, *shape, dtype=torch.float64, generator=g) for shape in ((3, 7), (6, 3), (6, 7)))
    ones = torch.ones(1, 6, dtype=torch.float64), torch.ones(1, 7, dtype=torch.float64)
    T = lambda x: x.transpose(-1, -2)  # noqa: E731
    PB = B @ torch.linalg.inv(T(B) @ B) @ T(B)
    PA = T(A) @ torch.linalg.inv(A @ T(A)) @ A
    for c in (0.0, 0.3, 1.0):
        dA, dB = preconditioned_step(A, B, T(B) @ G, G @ T(A), *ones, balance=c, damping=0.0)
        torch.testing.assert_close(PB @ (B @ dA) @ PA, c * PB @ G @ PA, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(PB @ (dB @ A) @ PA, (1 - c) * PB @ G @ PA, rtol=1e-9, atol=1e-9)


def test_the_optimizer_page_documents_every_setting():
    table = (ROOT / "docs" / "optimizer.md").read_text().split("| argument | default | meaning |")[1].split("\n\n")[0]
    for s in ADAPRELORA_SETTINGS:
        assert f"`{s.keyword}`" in table, f"docs/optimizer.md's argument table has no row for {s.keyword}"
