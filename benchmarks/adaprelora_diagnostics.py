"""How the LoRA factors move in the first steps: is A frozen early, or does it jump?

For each optimizer (a label of benchmarks/optimizer_quality.py's CONFIGS at a given lr) this runs
one seed of a quality task for ``--steps`` steps (the task's cosine schedule) and prints, per step,
the seed's training loss and the mean over LoRA modules of:

- ``|dA|/|A|`` and ``|dB|/|B|``: the relative change of each factor in that step (Frobenius);
- ``overlap``: how much of the top-r right singular space of the full gradient G = dL/dW the row
  space of A holds, ``||P_rowA V_r||_F^2 / r`` (1: aligned; r/n for a random subspace);
- ``rotated``: how far row(A) has turned from its initial subspace, ``1 - ||Q0^T Q||_F^2 / r``.

G is the gradient of each LoRA layer's frozen base weight (switched to requires_grad for this
diagnostic only: W = W0 + s B A, so dL/dW0 = dL/dW).

    python benchmarks/adaprelora_diagnostics.py --task T2 --runs adaprelora[v2]=0.01 adaprelora=0.0316 adafactor=0.562
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaprelora_diffusion.optim import find_lora_pairs  # noqa: E402
from benchmarks.optimizer_quality import CONFIGS, TASKS  # noqa: E402
from benchmarks.quality.harness import _lr_factor, build_optimizer  # noqa: E402


def trace(task, label: str, lr: float, steps: int, seed: int = 0) -> list[dict[str, float]]:
    """Per-step factor movement of one run (see the module docstring)."""
    name, kwargs, _ = CONFIGS[label]
    inst = task.build(seed)
    pairs, _ = find_lora_pairs(inst.model)
    bases = [p.module.get_base_layer().weight for p in pairs]
    for weight in bases:
        weight.requires_grad_(True)
    optimizer = build_optimizer(name, inst.model, lr=lr, **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor("cosine", task.steps))
    initial = [torch.linalg.qr(p.a_matrix(p.A.detach()).T)[0] for p in pairs]
    rows = []
    try:
        for step in range(steps):
            for weight in bases:
                weight.grad = None
            loss = task.train_step(inst, step)
            grads = [w.grad.detach().reshape(w.shape[0], -1).clone() for w in bases]
            before = [(p.a_matrix(p.A.detach()).clone(), p.b_matrix(p.B.detach()).clone()) for p in pairs]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            moved_A, moved_B, overlap, rotated = [], [], [], []
            for p, G, (A, B), Q0 in zip(pairs, grads, before, initial):
                r = A.shape[0]
                A1, B1 = p.a_matrix(p.A.detach()), p.b_matrix(p.B.detach())
                moved_A.append(((A1 - A).norm() / A.norm()).item())
                if B.norm() > 0:
                    moved_B.append(((B1 - B).norm() / B.norm()).item())
                Q = torch.linalg.qr(A1.T)[0]
                top = torch.linalg.svd(G, full_matrices=False)[2][:r]
                overlap.append(((top @ Q).square().sum() / r).item())
                rotated.append(1.0 - ((Q0.T @ Q).square().sum() / r).item())
            rows.append({"step": step + 1, "loss": loss, "dA/A": statistics.fmean(moved_A),
                         "dB/B": statistics.fmean(moved_B) if moved_B else float("nan"),
                         "overlap": statistics.fmean(overlap), "rotated": statistics.fmean(rotated)})
    finally:
        if hasattr(optimizer, "close"):
            optimizer.close()
    return rows


def main(argv=None):
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="T2", choices=[t for t in TASKS if t not in ("T3", "T3-prior")])
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=LR", help="configs of optimizer_quality.py at an lr")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    task = TASKS[args.task](False, lambda s: print(s, file=sys.stderr), argparse.Namespace(t3_pipeline=None))
    shown = {1, 2, 3, 4, 5, 10, 15, 20, 25, 30, args.steps}
    for spec in args.runs:
        label, _, lr = spec.rpartition("=")
        if label not in CONFIGS:
            parser.error(f"unknown config {label!r}; choose one of: {', '.join(CONFIGS)}.")
        rows = trace(task, label, float(lr), args.steps, args.seed)
        print(f"\n{args.task} {label} lr={float(lr):g} (seed {args.seed}; random-subspace overlap r/n = "
              f"{task.r / min(p.shape[1] for p in find_lora_pairs(task.build(0).model)[0]):.3f} or less)\n")
        print("| step | loss | \\|dA\\|/\\|A\\| | \\|dB\\|/\\|B\\| | overlap(row A, top-r of G) | row(A) rotated from init |")
        print("|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            if row["step"] in shown:
                print(f"| {row['step']} | {row['loss']:.3f} | {row['dA/A']:.3g} | {row['dB/B']:.3g} | {row['overlap']:.3f} | "
                      f"{row['rotated']:.3f} |")
    return 0


if __name__ == "__main__":
    main()
