"""AdaPreLoRA's settings, defined once: name, type, default, help, valid values, optimizer argument.

Every surface is generated from ``ADAPRELORA_SETTINGS``: the DreamBooth trainer's
``--adaprelora_*`` flags and their checks (``dreambooth/config.py``), the settings a resumed run
must keep (``dreambooth/trainer.py``), the model card, the LLM tools' ``AdaPreLoRASettings`` and
``--adaprelora_*`` arguments (``llm/settings.py``), the web app's advanced panel, and the table
that maps flags to ``AdaPreLoRA`` arguments (``factory.OPTIMIZER_SETTINGS``). Adding a setting is
one ``Setting(...)`` entry here plus the argument in ``AdaPreLoRA`` (and its row in
docs/optimizer.md); tests/optim/test_settings.py checks that the defaults agree with the optimizer's.

Only the standard library and this room are imported, so every trainer can depend on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .adaprelora import DEFAULT_STATS, MOMENTUM_CHOICES, STATS_CHOICES

__all__ = ["Setting", "ADAPRELORA_SETTINGS", "PREFIX", "setting_flags", "keyword_table", "settings_problems",
           "normalized", "dataclass_fields", "lr_problem"]

#: the flags' (and the trainers' config fields') prefix: setting ``damping`` is ``--adaprelora_damping``
PREFIX = "adaprelora_"


@dataclass(frozen=True)
class Setting:
    """One AdaPreLoRA setting.

    ``keyword`` is the ``AdaPreLoRA`` argument it sets; ``index`` its position when several settings
    make one tuple-valued argument (``betas``). ``valid`` and ``rule`` say which values are allowed
    (checked before anything loads, with ``rule`` in the message); ``off`` names the values that
    mean "off" on a command line (they become ``None``). ``fixed_on_resume``: a resumed run must keep
    the checkpoint's value (its optimizer state was made with it).
    """

    name: str
    kind: type  # float, bool or str
    default: Any
    help: str
    keyword: str
    index: int | None = None
    choices: tuple[str, ...] | None = None
    valid: Callable[[Any], bool] | None = None
    rule: str = ""
    off: Callable[[Any], bool] | None = None
    fixed_on_resume: bool = True

    @property
    def flag(self) -> str:
        """The trainers' field and flag name (without dashes)."""
        return PREFIX + self.name

    @property
    def optional(self) -> bool:
        """Whether None is a value (the setting can be off)."""
        return self.default is None or self.off is not None

    @property
    def annotation(self) -> str:
        """The field's type as a dataclass annotation string (what the flag parsers read)."""
        return f"{self.kind.__name__} | None" if self.optional else self.kind.__name__

    def normalize(self, value: Any) -> Any:
        """The value with its "off" spellings (e.g. a clip threshold <= 0) turned into None."""
        if value is not None and self.off is not None and not isinstance(value, bool) and self.off(value):
            return None
        return value

    def problem(self, value: Any, label: str | None = None) -> str | None:
        """What is wrong with ``value`` in one sentence naming ``label`` (default ``--<flag>``), or None."""
        label = label or f"--{self.flag}"
        value = self.normalize(value)
        if value is None:
            return None if self.optional else f"{label} cannot be empty."
        if self.choices is not None:
            return None if value in self.choices else f"{label} must be one of {', '.join(self.choices)}, got {value!r}."
        if self.kind is bool:
            return None if isinstance(value, bool) else f"{label} must be true or false, got {value!r}."
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{label} must be a number, got {value!r}."
        if self.valid is not None and not self.valid(value):
            return f"{label} must be {self.rule}, got {value}."
        return None


def _in(low: float, high: float, closed_high: bool = False) -> Callable[[float], bool]:
    return lambda v: low <= v <= high if closed_high else low <= v < high


ADAPRELORA_SETTINGS: tuple[Setting, ...] = (
    Setting("beta1", float, 0.0, "momentum (0: the momentum-free rule, which keeps no momentum buffers)",
            keyword="betas", index=0, valid=_in(0.0, 1.0), rule="in [0, 1)"),
    Setting("beta2", float, 0.999, "EMA decay of the statistics (when beta2_decay is off)",
            keyword="betas", index=1, valid=_in(0.0, 1.0), rule="in [0, 1)"),
    Setting("beta2_decay", float, None, "decay schedule 1 - t^x of the statistics, e.g. -0.8 as Adafactor "
            "(0 or empty: off, beta2 is used)", keyword="beta2_decay", valid=_in(-1.0, 0.0),
            rule="in [-1, 0) (Adafactor's -0.8), or 0 for a fixed beta2", off=lambda v: v == 0),
    Setting("eps", float, 1e-30, "added to every entry of G^2 in the statistics", keyword="eps",
            valid=lambda v: 0.0 < v < math.inf, rule="a number > 0"),
    Setting("scale_parameter", bool, False, "lr relative to each layer's weight RMS (Adafactor's relative step)",
            keyword="scale_parameter"),
    Setting("stats", str, DEFAULT_STATS, f"where the row/column statistics come from: {', '.join(STATS_CHOICES)}",
            keyword="stats", choices=tuple(STATS_CHOICES)),
    Setting("damping", float, 0.1, "relative damping of the r x r solves", keyword="damping",
            valid=lambda v: 0.0 <= v < math.inf, rule="a number >= 0"),
    Setting("balance", float, 0.5, "share c in [0, 1] of the common part P_B(G)P_A that A's step (B dA) carries; "
            "B's step (dB A) carries 1 - c", keyword="balance", valid=_in(0.0, 1.0, closed_high=True), rule="in [0, 1]"),
    Setting("clip_threshold", float, 1.0, "clip the RMS of the W-step to this (<= 0 or empty: off)",
            keyword="clip_threshold", valid=lambda v: 0.0 < v, rule="a number > 0 (or <= 0 for no clipping)",
            off=lambda v: v <= 0),
    Setting("step_bound", float, 1.0, "version 3: no rank component of a factor moves farther in one step than an Adam "
            "step (entries of RMS lr) would, times this: row i of A at most step_bound*lr*sqrt(n), column i of B at "
            "most step_bound*(lr/s)*sqrt(m) (<= 0 or empty: off, version 2's step)", keyword="step_bound",
            valid=lambda v: 0.0 < v < math.inf, rule="a number > 0 (or <= 0 for no bound)", off=lambda v: v <= 0),
    Setting("trust_ratio", float, 0.1, "version 3: A changes by at most this fraction of its norm per step, which "
            "stops the jump of A while B is small (<= 0 or empty: off)", keyword="trust_ratio",
            valid=lambda v: 0.0 < v < math.inf, rule="a number > 0 (or <= 0 for no limit)", off=lambda v: v <= 0),
    Setting("momentum", str, MOMENTUM_CHOICES[0], f"where the first moment sits: {', '.join(MOMENTUM_CHOICES)}",
            keyword="momentum", choices=tuple(MOMENTUM_CHOICES)),
)


def setting_flags(only: Callable[[Setting], bool] | None = None) -> tuple[str, ...]:
    """The ``adaprelora_*`` field names (of the settings ``only`` keeps)."""
    return tuple(s.flag for s in ADAPRELORA_SETTINGS if only is None or only(s))


def keyword_table() -> dict[str | tuple[str, ...], str]:
    """Flag (or tuple of flags, for a tuple-valued argument) -> AdaPreLoRA argument: OPTIMIZER_SETTINGS' shape."""
    table: dict[str | tuple[str, ...], str] = {}
    grouped: dict[str, list[Setting]] = {}
    for setting in ADAPRELORA_SETTINGS:
        if setting.index is None:
            table[setting.flag] = setting.keyword
        else:
            grouped.setdefault(setting.keyword, []).append(setting)
    for keyword, members in grouped.items():
        table[tuple(s.flag for s in sorted(members, key=lambda s: s.index))] = keyword
    return table


def normalized(values: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """``values`` with each setting's "off" spellings turned into None (keys ``prefix + name``)."""
    out = dict(values)
    for setting in ADAPRELORA_SETTINGS:
        key = prefix + setting.name
        if key in out:
            out[key] = setting.normalize(out[key])
    return out


def settings_problems(values: Mapping[str, Any], prefix: str = PREFIX, label: Callable[[str], str] | None = None) -> list[str]:
    """One sentence per bad setting in ``values`` (keys ``prefix + name``; ``label(key)`` names it, default ``--key``)."""
    label = label or (lambda key: f"--{key}")
    problems = []
    for setting in ADAPRELORA_SETTINGS:
        key = prefix + setting.name
        if key in values:
            problem = setting.problem(values[key], label(key))
            if problem:
                problems.append(problem)
    return problems


def dataclass_fields(prefix: str = PREFIX, help_prefix: str = "") -> list[tuple[str, str, dataclasses.Field]]:
    """``(name, annotation, field)`` of every setting, for ``dataclasses.make_dataclass`` or a config class.

    The metadata carries ``help`` (with ``help_prefix``) and, for settings with choices, ``choices``
    (transformers' HfArgumentParser turns them into argparse choices)."""
    out = []
    for s in ADAPRELORA_SETTINGS:
        metadata: dict[str, Any] = {"help": help_prefix + s.help}
        if s.choices is not None:
            metadata["choices"] = list(s.choices)
        out.append((prefix + s.name, s.annotation, dataclasses.field(default=s.default, metadata=metadata)))
    return out


def lr_problem(value: Any, label: str = "lr") -> str | None:
    """The one rule for a learning rate (torch.optim's, plus finiteness): a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return f"{label} must be a finite number >= 0, got {value!r}."
    return None

