"""The learning-rate sweep behind ``adaprelora-llm``'s default lr (sft and classify).

    python benchmarks/llm_lr_sweep.py                       # both tasks, both optimizers, 3 seeds (~15 min, 2 CPU cores)
    python benchmarks/llm_lr_sweep.py --quick               # a smoke run (tiny budgets, 1 seed)
    python benchmarks/llm_lr_sweep.py --json out.json       # also save every run
    python benchmarks/llm_lr_sweep.py --render out.json     # reprint a saved table

Tasks, both trained through `AdaPreLoRATrainer` (transformers' Trainer, the loop the command runs):

* ``sft``: T2 of the quality benchmark (benchmarks/quality/tasks.py): a tiny Llama pretrained on one
  synthetic language, LoRA-adapted to a related one for 100 steps; metric: held-out loss (lower is better).
* ``classify``: the same pretrained model as a sequence classifier (a new score head, trained in the
  optimizer's AdamW group, and LoRA) telling T2's two languages apart from 24-token snippets for 60
  steps; metric: held-out accuracy (higher is better).

Optimizers: AdaPreLoRA with its defaults (whatever rule the package ships: rerun after changing it)
and AdamW, on one log grid of lrs, mean over seeds. The table marks each optimizer's best lr; the
command's defaults live in ``adaprelora_diffusion/llm/config.py`` (``DEFAULT_LEARNING_RATE``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.quality.harness import Config, build_optimizer, run_one
from benchmarks.quality.tasks import LanguageAdaptation, PretrainSpec, _make_lm, markov_table, sample_sequences

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
OPTIMIZERS = ("adaprelora", "adamw")
SEEDS = (0, 1, 2)
METRIC = {"sft": ("loss", "min"), "classify": ("accuracy", "max")}


class LanguageClassification:
    """Which of T2's two languages wrote this snippet? LoRA + a new head on T2's pretrained model."""

    targets = LanguageAdaptation.targets

    def __init__(self, t2: LanguageAdaptation, steps=60, batch=16, length=24, n_eval=256):
        self.t2, self.steps, self.batch, self.length = t2, steps, batch, length
        spec = t2.spec
        lang = {"sharpness": spec.sharpness, "zipf": spec.zipf}
        self.sources = [markov_table(spec.vocab, spec.language_seed, **lang)[0], t2.P]
        self.eval_x, self.eval_y = self._sample(n_eval, torch.Generator().manual_seed(99))

    def _sample(self, count: int, g: torch.Generator):
        half = count // 2
        x = torch.cat([sample_sequences(P, half, self.length, g) for P in self.sources])
        y = torch.tensor([0] * half + [1] * half)
        order = torch.randperm(len(y), generator=g)
        return x[order], y[order]

    def run(self, optimizer_name: str, lr: float, seed: int) -> float:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForSequenceClassification, PrinterCallback, TrainingArguments, default_data_collator

        from adaprelora_diffusion.llm import AdaPreLoRATrainer

        lm = _make_lm(self.t2.spec)
        config = lm.config
        config.num_labels, config.pad_token_id = 2, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification(config)
            missing = model.load_state_dict({k: v for k, v in self.t2.state.items() if not k.startswith("lm_head")},
                                            strict=False)
            assert set(missing.missing_keys) <= {"score.weight"}, missing
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=self.targets,
                                                     task_type="SEQ_CLS"))
        x, y = self._sample(self.steps * self.batch, torch.Generator().manual_seed(1000 + seed))
        rows = [{"input_ids": a, "attention_mask": torch.ones_like(a), "labels": b} for a, b in zip(x, y)]
        with tempfile.TemporaryDirectory(prefix="classify-") as out, torch.random.fork_rng(devices=[]):
            args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                                     disable_tqdm=True, max_steps=self.steps, per_device_train_batch_size=self.batch,
                                     learning_rate=lr, seed=seed, train_sampling_strategy="sequential")
            trainer = AdaPreLoRATrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                                        optimizer_name=optimizer_name)
            trainer.remove_callback(PrinterCallback)
            try:
                trainer.train()
            except Exception as err:  # a diverged run (the divergence check) scores as chance
                print(f"  classify {optimizer_name} lr {lr:g} seed {seed}: {type(err).__name__}", file=sys.stderr)
                return 0.5
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=self.eval_x, attention_mask=torch.ones_like(self.eval_x)).logits
        accuracy = (logits.argmax(-1) == self.eval_y).float().mean().item()
        return accuracy if math.isfinite(logits.sum().item()) else 0.5


def sweep(quick: bool, seeds, grid, optimizers, log=print) -> dict:
    if quick:
        t2 = LanguageAdaptation(PretrainSpec(hidden=32, length=16, steps=30, batch=8), steps=12, batch=4, eval_every=3,
                                n_eval=16)
        classify = LanguageClassification(t2, steps=10, batch=8, length=12, n_eval=32)
    else:
        t2, classify = LanguageAdaptation(), None
        classify = LanguageClassification(t2)
    runs = []
    for task in ("sft", "classify"):
        for name in optimizers:
            for lr in grid:
                for seed in seeds:
                    t0 = time.perf_counter()
                    if task == "sft":
                        result = run_one(t2, Config(name, name), lr, seed)
                        value = result.final["loss"]
                    else:
                        value = classify.run(name, lr, seed)
                    runs.append({"task": task, "optimizer": name, "lr": lr, "seed": seed, "value": value,
                                 "seconds": round(time.perf_counter() - t0, 1)})
                    log(f"{task} {name} lr {lr:g} seed {seed}: {METRIC[task][0]} {value:.4g}")
    return {"command": " ".join(["python", "benchmarks/llm_lr_sweep.py", *sys.argv[1:]]), "torch": torch.__version__,
            "runs": runs}


def table(saved: dict) -> str:
    """One row per (task, optimizer): the mean metric at each lr, the best marked with *."""
    runs = saved["runs"]
    grid = sorted({r["lr"] for r in runs})
    lines = [f"command: {saved['command']}", "",
             "| task | optimizer | " + " | ".join(f"{lr:g}" for lr in grid) + " | best lr |",
             "|---|---|" + "---:|" * (len(grid) + 1)]
    for task in ("sft", "classify"):
        metric, better = METRIC[task]
        for name in dict.fromkeys(r["optimizer"] for r in runs if r["task"] == task):
            means = {}
            for lr in grid:
                values = [r["value"] for r in runs if (r["task"], r["optimizer"], r["lr"]) == (task, name, lr)]
                values = [v if math.isfinite(v) else (math.inf if better == "min" else 0.0) for v in values]
                if values:
                    means[lr] = statistics.fmean(values)
            best = (min if better == "min" else max)(means, key=means.get)
            cells = [("-" if lr not in means else f"{means[lr]:.3f}{'*' if lr == best else ''}") for lr in grid]
            lines.append(f"| {task} ({metric}) | {name} | " + " | ".join(cells) + f" | {best:g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, one seed: checks the script runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--grid", type=float, nargs="+", default=None)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--json", help="save every run here")
    parser.add_argument("--render", help="reprint the table of a saved --json file, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        print(table(json.loads(Path(args.render).read_text())))
        return 0
    seeds = args.seeds or ((0,) if args.quick else SEEDS)
    grid = args.grid or ((1e-3, 1e-2) if args.quick else GRID)
    saved = sweep(args.quick, seeds, grid, args.optimizers, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(saved, indent=1))
    print(table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
