"""Optimizer quality: held-out metrics of every LoRA optimizer, each at its own best-tuned lr.

Protocol (adaprelora_diffusion/quality/harness.py): every config gets its own log-spaced lr grid
(per optimizer family, extended by up to --extend points when the best lr sits at an edge; a
remaining edge hit is flagged), the same seeds and step budget; the best lr minimises the seed
mean of the final primary held-out metric, and is then re-run on as many fresh seeds (unless
--same-seeds), so the reported numbers are not the ones the lr was picked on. Reported: the
mean +- std (sample std over seeds) of those runs,
the first evaluated step where the seed-mean curve reaches AdamW's best-tuned final value,
wall time per run, and peak optimizer state bytes. Every run uses the same lr schedule (--schedule,
cosine decay to 0 by default) applied as a multiplier on each param group's lr.

Tasks (adaprelora_diffusion/quality/tasks.py):
  T1  low-rank regression (96 x 64 layer, rank-6 change, LoRA rank 4, 300 steps, batch 32)
  T2  tiny Llama-style LM pretrained on one synthetic Zipf-frequency language (cached), LoRA-adapted
      to a strongly shifted one (rank 4 on q/k/v/o/gate/up/down, 100 steps of 16 sequences: not
      converged, so the final loss ranks the optimizers)

    python benchmarks/optimizer_quality.py                       # full T1 + T2 (~8 min, 2 CPU cores)
    python benchmarks/optimizer_quality.py --quick --out /tmp/q  # smoke run, well under a minute
    python benchmarks/optimizer_quality.py --tasks T1 --optimizers adamw adaprelora --seeds 2

Writes optimizer_quality.md, optimizer_quality.json and <task>_curves.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaprelora_diffusion.quality.harness import SCHEDULES, Config, ConfigResult, mean_curve, steps_to_reach, sweep  # noqa: E402
from adaprelora_diffusion.quality.plot import plot_curves  # noqa: E402
from adaprelora_diffusion.quality.tasks import LanguageAdaptation, LowRankRegression, PretrainSpec  # noqa: E402


def _half_decades(lo_exp: float, hi_exp: float) -> tuple[float, ...]:
    n = round((hi_exp - lo_exp) * 2)
    return tuple(float(f"{10 ** (lo_exp + i / 2):.3g}") for i in range(n + 1))


# lr grids per optimizer family (half-decade log grids, placed by a one-seed pilot on T1 over
# 1e-5..30); TASK_GRIDS overrides them per task. The sweep extends past an edge hit.
FAMILY_GRIDS = {
    "adam": _half_decades(-3, 0),  # lr is Adam's lr on the factors (or on W for AdaPreLoRA)
    "loraplus": _half_decades(-3.5, -1),  # B's lr is 16x this
    "adafactor": _half_decades(-2, 0.5),  # torch's Adafactor: lr relative to the parameter RMS
    "lorapro": _half_decades(-1, 1.5),  # plain (momentum-free, unnormalised) gradient steps on W
}

# Per-task grids replacing a family's default. T2 (version 2 of its language, 100 steps): 4 points
# around the best lrs of a two-seed pilot of adamw/adaprelora/adafactor/loraplus (best 0.0316,
# 0.0316, 1, 0.01) and of the full run (LoRA-Pro best 0.316, found by extending 0.316..31.6
# downwards); one point further up every family collapses to ~3.1 nats (about the unigram
# loss), so the grids stop there (a best lr at an edge would still be extended).
TASK_GRIDS = {
    "T2": {
        "adam": _half_decades(-2.5, -1),
        "loraplus": _half_decades(-3, -1.5),
        "adafactor": _half_decades(-1, 0.5),
        "lorapro": _half_decades(-1, 0.5),
    },
}

# label -> (make_optimizer name, kwargs, family). AdaPreLoRA variants change one setting each
# from its defaults (stats="sketch", balance=0.5, betas=(0.9, 0.999)).
CONFIGS = {
    "adamw": ("adamw", {}, "adam"),
    "loraplus": ("loraplus", {}, "loraplus"),
    "scaled_adamw": ("scaled_adamw", {}, "adam"),
    "adafactor": ("adafactor", {}, "adafactor"),
    "lorapro": ("lorapro", {}, "lorapro"),
    "soap": ("soap", {}, "adam"),
    "adaprelora": ("adaprelora", {}, "adam"),
    "adaprelora[exact]": ("adaprelora", {"stats": "exact"}, "adam"),
    "adaprelora[tangent]": ("adaprelora", {"stats": "tangent"}, "adam"),
    "adaprelora[balance=0]": ("adaprelora", {"balance": 0.0}, "adam"),
    "adaprelora[balance=1]": ("adaprelora", {"balance": 1.0}, "adam"),
    "adaprelora[beta1=0]": ("adaprelora", {"betas": (0.0, 0.999)}, "adam"),
}
QUICK_CONFIGS = ["adamw", "adaprelora", "lorapro"]


def _t1(quick: bool, log):
    if quick:
        return LowRankRegression(steps=30, eval_every=5, n_eval=512)
    return LowRankRegression()


def _t2(quick: bool, log):
    if quick:
        spec = PretrainSpec(hidden=32, length=16, steps=30, batch=8)
        return LanguageAdaptation(spec, steps=12, batch=4, eval_every=3, n_eval=16, log=log)
    return LanguageAdaptation(log=log)


# name -> factory(quick, log) -> Task. A new task (T3) registers here and needs nothing else.
TASKS = {"T1": _t1, "T2": _t2}


def device_name() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def grid_for(task_name: str, family: str, quick: bool, override) -> tuple[float, ...]:
    grid = tuple(override) if override else TASK_GRIDS.get(task_name, {}).get(family, FAMILY_GRIDS[family])
    if quick and not override:
        mid = len(grid) // 2
        grid = grid[mid - 1 : mid + 1]
    return grid


def _mean_std(values):
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return {"mean": math.inf, "std": math.nan}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(task, results: list[ConfigResult], sweep_walls: dict[str, float]) -> dict:
    """JSON-ready summary of one task's sweeps, with steps-to-AdamW computed on seed means."""
    primary = task.metrics[0]
    adamw = next((r for r in results if r.config.label == "adamw"), None)
    target = _mean_std([run.final[primary] for run in adamw.best])["mean"] if adamw else None
    configs = []
    for res in results:
        best = res.best
        steps, curve = mean_curve(best)
        reach = steps_to_reach(steps, curve, target) if target is not None and math.isfinite(target) else None
        configs.append({
            "label": res.config.label,
            "optimizer": res.config.optimizer,
            "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in res.config.kwargs.items()},
            "grid": res.grid,
            "best_lr": res.best_lr,
            "edge": res.edge,
            "final": {m: _mean_std([run.final[m] for run in best]) for m in task.metrics},
            "steps_to_adamw": reach,
            "wall_s_per_run": statistics.fmean(run.wall_s for run in best),
            "sweep_wall_s": sweep_walls[res.config.label],
            "state_bytes": max(run.state_bytes for run in best),
            "diverged_runs_at_best_lr": sum(run.diverged for run in best),
            "sweep": [
                {"lr": lr, "finals": [run.final[primary] for run in runs], **_mean_std([run.final[primary] for run in runs]),
                 "diverged": sum(run.diverged for run in runs)}
                for lr, runs in sorted(res.runs.items())
            ],
            "curve": {"steps": steps, "mean": curve, "train_loss_mean": [statistics.fmean(v) for v in zip(*[r.train_loss for r in best])]},
        })
    return {
        "name": task.name, "description": task.description, "steps": task.steps, "eval_every": task.eval_every,
        "metrics": list(task.metrics), "reference": task.reference, "adamw_target": target, "configs": configs,
    }


def _strict_json(value):
    """Non-finite floats (diverged runs) become null, so the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def markdown(summary: dict, seeds: int, fresh: bool) -> str:
    metrics = summary["metrics"]
    ref = ", ".join(f"{k} = {_fmt(v)}" for k, v in summary["reference"].items())
    lines = [
        f"### {summary['name']}: {summary['description']} ({summary['steps']} steps, eval every {summary['eval_every']}; "
        + (f"lr picked on {seeds} seed(s), reported on {seeds} fresh seed(s))" if fresh else f"{seeds} seed(s))"),
        "",
        f"Reference: {ref}." if ref else "",
        "",
        "| optimizer | best lr | " + " | ".join(f"{m} (mean +- std)" for m in metrics)
        + " | steps to AdamW final | s / run | state bytes |",
        "|---|---:|" + "---:|" * len(metrics) + "---:|---:|---:|",
    ]
    for c in summary["configs"]:
        lr = f"{c['best_lr']:.3g}" + (f" (edge: {c['edge']})" if c["edge"] else "")
        cells = [f"{_fmt(c['final'][m]['mean'])} +- {_fmt(c['final'][m]['std'])}" for m in metrics]
        reach = "-" if summary["adamw_target"] is None else ("never" if c["steps_to_adamw"] is None else str(c["steps_to_adamw"]))
        lines.append(f"| {c['label']} | {lr} | " + " | ".join(cells) + f" | {reach} | {c['wall_s_per_run']:.2f} | {c['state_bytes']} |")
    return "\n".join(lines)


def main(argv=None):
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", choices=list(CONFIGS), help="config labels (default: all; --quick: a few)")
    parser.add_argument("--seeds", type=int, help="seeds per lr (default 3; --quick: 1)")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="one lr grid for every config (overrides family grids)")
    parser.add_argument("--extend", type=int, help="max grid points added past an edge hit (default 2; --quick: 0)")
    parser.add_argument("--same-seeds", action="store_true",
                        help="report the sweep's own seeds at the best lr instead of re-running it on fresh seeds "
                             "(implied by --quick)")
    parser.add_argument("--schedule", default="cosine", choices=list(SCHEDULES), help="lr schedule, the same for every config")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 2 lrs, 3 optimizers: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    extend = args.extend if args.extend is not None else (0 if args.quick else 2)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}.")
    if extend < 0:
        parser.error(f"--extend must be >= 0, got {extend}.")
    if args.lr_grid and any(not (lr > 0 and math.isfinite(lr)) for lr in args.lr_grid):
        parser.error(f"--lr-grid values must be finite and > 0, got {args.lr_grid}.")
    fresh = not (args.same_seeds or args.quick)
    report_seeds = list(range(seeds, 2 * seeds)) if fresh else None
    labels = args.optimizers or (QUICK_CONFIGS if args.quick else list(CONFIGS))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t_suite = time.perf_counter()
    payload = {
        "device": device_name(), "torch": torch.__version__, "quick": args.quick, "seeds": list(range(seeds)),
        "report_seeds": report_seeds or list(range(seeds)),
        "schedule": args.schedule,
        "protocol": "best lr per config by seed-mean final primary metric over `seeds`; reported metrics from "
                    "`report_seeds` at that lr; same seeds, budget and schedule for all",
        "tasks": {},
    }
    sections = []
    for task_name in args.tasks:
        t_task = time.perf_counter()
        task = TASKS[task_name](args.quick, log)
        results, walls = [], {}
        for label in labels:
            name, kwargs, family = CONFIGS[label]
            config = Config(label, name, kwargs, grid_for(task_name, family, args.quick, args.lr_grid))
            t0 = time.perf_counter()
            results.append(sweep(task, config, list(range(seeds)), extend=extend, schedule=args.schedule,
                                 report_seeds=report_seeds, log=log))
            walls[label] = time.perf_counter() - t0
        summary = summarize(task, results, walls)
        summary["task_wall_s"] = time.perf_counter() - t_task
        payload["tasks"][task_name] = summary
        sections.append(markdown(summary, seeds, fresh))
        args.out.mkdir(parents=True, exist_ok=True)
        curves = {c["label"]: (c["curve"]["steps"], c["curve"]["mean"]) for c in summary["configs"]}
        plot_curves(args.out / f"{task_name}_curves.png", f"{task_name} {task.description}: best-tuned, mean of {seeds} seed(s)",
                    f"held-out {task.metrics[0]}", curves)
        log(f"{task_name} done in {summary['task_wall_s']:.1f} s")
    payload["suite_wall_s"] = time.perf_counter() - t_suite
    header = (f"Optimizer quality ({'quick' if args.quick else 'full'}), device: {payload['device']}; torch {torch.__version__}; "
              f"suite wall time {payload['suite_wall_s']:.0f} s")
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_quality.md").write_text(text)
    (args.out / "optimizer_quality.json").write_text(json.dumps(_strict_json(payload), indent=2, allow_nan=False))
    return payload


if __name__ == "__main__":
    main()
