"""The divergence check: stop a run whose adapter does worse than no adapter at all.

A too-high learning rate does not always make the loss non-finite (the non-finite guard's case).
AdaPreLoRA's update clip keeps every step finite: at lr 100 on the demo diffusion model its
factors swing and collapse to B·A = 0 (an adapter that does nothing, a state training cannot
leave), and under version 2's rule at lr 10 a small LM's loss jumped and never got below the
base model's again; both runs used to end with "done". (Version 3's bounds soften the LM case:
on the tests' tiny LM, base loss 2.9, lr 10 ends at 1.7-1.9 and lr 1000 near 2.9, an adapter no
worse than none, so the check stays quiet; lr 1e6 still fires, and lr 0.01 reaches 0.62.) A raw
training loss is too noisy to tell (a diffusion loss moves 10-50x between timesteps), so the
check compares *paired* losses: every `every` optimizer steps the trainer evaluates one
micro-batch twice, with the adapter and with it switched off (the base model), on the same
inputs and noise, without gradients.

The rule: from step `grace` + 1 on (a young adapter may hurt before it helps: the demo run at lr
1e-3 under AdaPreLoRA version 2 had single checks at 4.6x the base model's in its first 75
steps), over the last `checks` checks,

* the adapter's losses add up to more than `factor` times the base model's (a non-finite loss
  counts as infinite): fine-tuning lowers the loss on its own kind of data, and this adapter
  made it higher; or
* the adapter's loss equals the base model's exactly at every check: its factors collapsed.

Measured (checks every 25 steps from step 100, 5 checks, factor 1.25): the README's demo run
(400 steps at the demo model's lr 3e-3, version 3) never fires, whichever steps the checks land
on (checked at every 5th step, all phases: worst window 0.57x); the tiny LLM of the tests at lr
1e-3 and 1e-2 sits at 0.3-0.6. DreamBooth at lr 100 sits at exactly 1 (a collapsed adapter) and
the tiny LLM at lr 1e6 near 2. Five checks, because at low noise levels a diffusion loss is
mostly noise: with 3 checks and factor 1.1, 16% of simulated healthy 400-step runs fired
(tests/engine/test_divergence.py), with these 0.2%. The first verdict comes at step 200.

When it fires, checkpoints that may hold diverged weights (from the last passing check on) are
renamed ``diverged-checkpoint-N``, so ``--resume_from_checkpoint latest`` finds the last good
one, and the run stops with one line naming the learning rate.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TrainingError

__all__ = ["DivergenceError", "DivergenceCheck", "set_aside_checkpoints", "DIVERGED_PREFIX"]

logger = logging.getLogger(__name__)

DIVERGED_PREFIX = "diverged-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DivergenceError(TrainingError):
    """The loss diverged; the message names the learning rate and the checkpoint to resume from."""


@dataclass
class DivergenceCheck:
    """Feed it paired losses with `record`, which says when the rule holds (see the module); `error` is then
    what the trainer raises."""

    lr: float
    every: int = 25
    checks: int = 5
    factor: float = 1.25
    grace: int = 75  # no check up to this step: a young adapter may hurt before it helps
    lr_flag: str = "--learning_rate"
    pairs: list[tuple[int, float, float]] = field(default_factory=list)  # (step, adapter loss, base loss)
    last_good_step: int | None = None  # the step of the last check whose window passed

    def __post_init__(self):
        if self.every < 1 or self.checks < 1 or not self.factor > 1:
            raise ValueError(f"DivergenceCheck needs every >= 1, checks >= 1 and factor > 1, got {self.every}, "
                             f"{self.checks}, {self.factor}.")

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, the one about to be taken) is checked."""
        return step > self.grace and step % self.every == 0

    def ratio(self) -> float:
        """The adapter's summed loss over the base model's, over the last `checks` checks."""
        recent = self.pairs[-self.checks:]
        loss, base = sum(p[1] for p in recent), sum(p[2] for p in recent)
        if not math.isfinite(loss):
            return math.inf
        return loss / base if base > 0 and math.isfinite(base) else 1.0

    def collapsed(self) -> bool:
        recent = self.pairs[-self.checks:]
        return len(recent) == self.checks and all(p[1] == p[2] for p in recent)

    def record(self, step: int, loss: float, base_loss: float) -> bool:
        """Note the adapter's and the base model's loss on the same micro-batch at ``step``; True once diverged."""
        self.pairs.append((step, float(loss), float(base_loss)))
        if len(self.pairs) < self.checks:
            return False
        diverged = self.ratio() > self.factor or self.collapsed()
        if not diverged:
            self.last_good_step = step
        return diverged

    def error(self, output_dir: str | os.PathLike | None, resume_with_new_lr: bool = True) -> DivergenceError:
        """The error to stop with, after moving suspect checkpoints aside (``output_dir`` None: another rank does)."""
        step = self.pairs[-1][0]
        kept = None
        if output_dir is not None:
            # the window that last passed ended at last_good_step: weights from there on are suspect
            _, kept = set_aside_checkpoints(output_dir, self.last_good_step if self.last_good_step is not None else 0)
        if kept is None:
            advice = f"start again with a lower {self.lr_flag} and --overwrite_output_dir (no checkpoint from before it)"
        elif resume_with_new_lr:
            advice = f"continue from {kept} with --resume_from_checkpoint latest and a lower {self.lr_flag}"
        else:
            advice = f"{kept} is the last checkpoint from before it; start again with a lower {self.lr_flag} and --overwrite_output_dir"
        if self.collapsed():
            what = "the adapter collapsed (its loss equals the base model's exactly: B·A = 0)"
        elif math.isinf(self.ratio()):
            what = "the loss is not finite"
        else:
            what = f"the adapter's loss is {self.ratio():.2f}x the base model's on the same batches (limit {self.factor:g}x)"
        return DivergenceError(f"training diverged by step {step}: over the last {self.checks} checks {what}. "
                               f"{self.lr_flag} {self.lr:g} is too high: try {self.lr / 10:g}; {advice}.")


def set_aside_checkpoints(output_dir: str | os.PathLike, from_step: int) -> tuple[list[str], str | None]:
    """Rename ``checkpoint-N`` with N >= ``from_step`` to ``diverged-checkpoint-N`` (nothing is deleted);
    returns the renamed names and the newest checkpoint left, which ``latest`` now resolves to."""
    output_dir = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in (output_dir.iterdir() if output_dir.is_dir() else [])
                   if (m := _CHECKPOINT.match(p.name)) and p.is_dir())
    moved = []
    for number, path in found:
        if number >= from_step:
            target = path.with_name(DIVERGED_PREFIX + path.name)
            if target.exists():
                target = path.with_name(f"{DIVERGED_PREFIX}{path.name}-{os.getpid()}")
            os.replace(path, target)
            moved.append(target.name)
    kept = [p.name for n, p in found if n < from_step]
    if moved:
        logger.warning("Moved checkpoints that may hold diverged weights aside: %s.", ", ".join(moved))
    return moved, (kept[-1] if kept else None)
