"""Fair optimizer comparison: every config gets its own lr sweep, the same seeds and step budget.

A task (see `Task`) owns the model, data, training step and held-out metrics; the harness owns
the protocol: log-grid lr sweep per config (extended past an edge when the best lr lands there),
best lr by mean final primary metric over seeds, curves, wall time and optimizer state bytes.
Keeping the protocol here means a new task (e.g. diffusion, T3) is compared the same way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from adaprelora_diffusion.optim import make_optimizer

__all__ = [
    "SCHEDULES", "DIAGNOSTIC_OPTIMIZERS", "WeightAverage", "build_optimizer", "Config", "ConfigResult", "Instance", "RunResult", "Task", "mean_curve", "run_one", "state_bytes", "steps_to_reach", "sweep",
]


@dataclass
class Instance:
    """One seeded build of a task: the model with LoRA attached and whatever data the task needs."""

    model: nn.Module
    data: Any


class Task(Protocol):
    """What a benchmark task provides. Lower is better for ``metrics[0]`` (the primary metric).

    ``build(seed)`` must be deterministic in ``seed``; ``train_step`` runs forward + backward
    for step ``step`` (0-based) and returns the training loss without calling ``optimizer.step``
    (the harness does, so it can time and inspect it); ``evaluate`` returns every held-out metric.

    A task whose training runs inside a loop it does not own (T3 drives the project's DreamBooth
    trainer) instead defines ``run(config, lr, seed, schedule) -> RunResult``, and `run_one`
    hands the whole run to it; it must apply the same schedule and budget.
    """

    name: str
    description: str
    steps: int  # step budget, the same for every optimizer
    eval_every: int
    metrics: tuple[str, ...]  # metrics[0] is minimised and ranks lrs
    reference: dict[str, float]  # known optima / floors for the report (may be empty)

    def build(self, seed: int) -> Instance: ...

    def train_step(self, inst: Instance, step: int) -> float: ...

    def evaluate(self, inst: Instance) -> dict[str, float]: ...


@dataclass(frozen=True)
class Config:
    """An optimizer as compared: factory name, fixed kwargs and its own log lr grid."""

    label: str
    optimizer: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    grid: tuple[float, ...] = ()
    average: float | None = None  # evaluate an EMA of the trainable weights with this decay (see WeightAverage)


class WeightAverage:
    """An EMA of a model's trainable parameters that evaluation swaps in (averaging over recent steps).

    Written here rather than with `torch.optim.swa_utils.AveragedModel`, which keeps a deep copy of
    the whole model (frozen base included, and the optimizer's statistics hooks with it): this keeps
    one copy of the trainable tensors and swaps them in place.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight average decay must be in (0, 1), got {decay!r}.")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], current)


@dataclass
class RunResult:
    lr: float
    seed: int
    eval_steps: list[int]
    curve: list[float]  # primary held-out metric at eval_steps (inf once diverged)
    final: dict[str, float]
    train_loss: list[float]
    wall_s: float
    state_bytes: int
    diverged: bool


@dataclass
class ConfigResult:
    config: Config
    grid: list[float]
    runs: dict[float, list[RunResult]]
    best_lr: float
    edge: str | None  # "low" / "high" if the best lr is still at the grid's edge
    report: list[RunResult] | None = None  # best lr re-run on fresh seeds, if asked for

    @property
    def best(self) -> list[RunResult]:
        """The runs to report: fresh-seed re-runs when present, else the sweep's own runs."""
        return self.report if self.report is not None else self.runs[self.best_lr]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in ``optimizer.state`` (nested lists/dicts too), shared storages once."""
    seen: set[int] = set()
    total = 0

    def visit(value):
        nonlocal total
        if torch.is_tensor(value):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    return total


def _adafactor_fixed_lr(model: nn.Module, lr: float, **kwargs) -> torch.optim.Optimizer:
    """transformers' Adafactor on each factor with its relative step turned off: Adafactor's
    factored statistics, decay schedule and clipping, with a plain lr (no parameter-RMS scale, no
    1/sqrt(t) cap). Tells whether torch Adafactor's wins come from the relative step."""
    from transformers.optimization import Adafactor

    params = [p for p in model.parameters() if p.requires_grad]
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, **kwargs)


def _grafted(model: nn.Module, lr: float, **kwargs) -> torch.optim.Optimizer:
    """Version 2's or Adafactor's direction with either one's step length (benchmarks/quality/grafting.py)."""
    from .grafting import GraftedAdaPreLoRA

    return GraftedAdaPreLoRA.from_model(model, lr=lr, **kwargs)


#: Optimizers the benchmarks compare that are not part of the product's `make_optimizer` design space.
DIAGNOSTIC_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adafactor_fixed_lr": _adafactor_fixed_lr,
                                                                           "graft": _grafted}


def build_optimizer(name: str, model: nn.Module, lr: float, **kwargs) -> torch.optim.Optimizer:
    """`make_optimizer`, or one of `DIAGNOSTIC_OPTIMIZERS`."""
    if name in DIAGNOSTIC_OPTIMIZERS:
        return DIAGNOSTIC_OPTIMIZERS[name](model, lr, **kwargs)
    return make_optimizer(name, model, lr=lr, **kwargs)


SCHEDULES = ("cosine", "constant")


def _lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda step: 1.0
    # Cosine decay to 0 over the budget: without a decay the final metric of a noisy task mostly
    # measures the lr-times-noise plateau, not how well the optimizer conditions the problem.
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def run_one(task: Task, config: Config, lr: float, seed: int, schedule: str = "cosine") -> RunResult:
    """Train one (config, lr, seed) for the task's budget, evaluating every ``eval_every`` steps.

    The same lr schedule (a multiplier on every param group's lr) applies to every optimizer.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if hasattr(task, "run"):
        return task.run(config, lr, seed, schedule)
    inst = task.build(seed)
    optimizer = build_optimizer(config.optimizer, inst.model, lr=lr, **config.kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(schedule, task.steps))
    average = WeightAverage(inst.model, config.average) if config.average else None
    primary = task.metrics[0]
    eval_steps, curve, losses = [], [], []
    peak, diverged = 0, False
    final: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for step in range(task.steps):
            loss = task.train_step(inst, step)
            if not math.isfinite(loss):
                diverged = True
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update()
            losses.append(loss)
            if step == 0 or (step + 1) % task.eval_every == 0 or step + 1 == task.steps:
                peak = max(peak, state_bytes(optimizer))
                if average is not None:
                    with average.swapped():
                        final = task.evaluate(inst)
                else:
                    final = task.evaluate(inst)
                if not all(math.isfinite(v) for v in final.values()):
                    diverged = True
                    break
                eval_steps.append(step + 1)
                curve.append(final[primary])
    finally:
        if hasattr(optimizer, "close"):
            optimizer.close()
    wall = time.perf_counter() - t0
    if diverged:
        final = {m: math.inf if m == primary else math.nan for m in task.metrics}
    return RunResult(lr, seed, eval_steps, curve, final, losses, wall, peak, diverged)


def _score(runs: list[RunResult], metric: str) -> float:
    values = [r.final[metric] for r in runs]
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf


def sweep(task: Task, config: Config, seeds: Sequence[int], extend: int = 2, schedule: str = "cosine",
          report_seeds: Sequence[int] | None = None, log: Callable[[str], None] = lambda s: None) -> ConfigResult:
    """Sweep ``config.grid`` over ``seeds``; if the best lr is at an edge, add up to ``extend``
    grid points beyond it (same log spacing), then report whether it is still at the edge.

    With ``report_seeds`` the best lr is re-run on those seeds and they are what `best` reports:
    picking the lr on the same seeds that are reported favours whichever config got lucky
    seeds (winner's curse), most of all when differences are within the seed noise."""
    if report_seeds is not None and set(report_seeds) & set(seeds):
        raise ValueError(f"report_seeds {list(report_seeds)} must not overlap the sweep's seeds {list(seeds)}.")
    grid = sorted(config.grid)
    if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise ValueError(f"config {config.label!r} needs a non-empty grid of positive lrs, got {config.grid!r}.")
    ratio = grid[1] / grid[0] if len(grid) > 1 else 10.0
    runs: dict[float, list[RunResult]] = {}
    metric = task.metrics[0]

    def evaluate(lr):
        runs[lr] = [run_one(task, config, lr, s, schedule) for s in seeds]
        log(f"  {task.name} {config.label} lr={lr:.3g}: {metric}={_score(runs[lr], metric):.4g}")

    for lr in grid:
        evaluate(lr)
    for _ in range(extend):
        best = min(grid, key=lambda lr: _score(runs[lr], metric))
        if len(grid) > 1 and best == grid[0]:
            grid.insert(0, grid[0] / ratio)
            evaluate(grid[0])
        elif len(grid) > 1 and best == grid[-1]:
            grid.append(grid[-1] * ratio)
            evaluate(grid[-1])
        else:
            break
    best = min(grid, key=lambda lr: _score(runs[lr], metric))
    edge = None
    if len(grid) > 1 and best == grid[0]:
        edge = "low"
    elif len(grid) > 1 and best == grid[-1]:
        edge = "high"
    report = None
    if report_seeds is not None:
        report = [run_one(task, config, best, s, schedule) for s in report_seeds]
        log(f"  {task.name} {config.label} lr={best:.3g} on fresh seeds: {metric}={_score(report, metric):.4g}")
    return ConfigResult(config, grid, runs, best, edge, report)


def mean_curve(runs: list[RunResult]) -> tuple[list[int], list[float]]:
    """Seed-mean of the primary held-out curve (inf where any seed diverged)."""
    n = max(len(r.curve) for r in runs)
    steps = next(r.eval_steps for r in runs if len(r.curve) == n)
    means = []
    for i in range(n):
        vals = [r.curve[i] if i < len(r.curve) else math.inf for r in runs]
        means.append(statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf)
    return steps, means


def steps_to_reach(steps: list[int], curve: list[float], target: float) -> int | None:
    """First evaluated step whose (seed-mean) metric is <= target, or None (never)."""
    for s, v in zip(steps, curve):
        if v <= target:
            return s
    return None
