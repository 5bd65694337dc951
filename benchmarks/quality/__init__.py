"""Optimizer quality benchmark: tasks with known optima and a fair lr-sweep harness.

`benchmarks/optimizer_quality.py` is the command line; a task implements `harness.Task`.
"""

from .harness import SCHEDULES, Config, ConfigResult, Instance, RunResult, Task, mean_curve, run_one, state_bytes, steps_to_reach, sweep

__all__ = [
    "SCHEDULES", "Config", "ConfigResult", "Instance", "RunResult", "Task", "mean_curve", "run_one", "state_bytes",
    "steps_to_reach", "sweep",
]
