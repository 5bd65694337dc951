"""LLM LoRA training step: tokens/s and peak memory of AdaPreLoRA, AdamW and Adafactor.

The model is a stack of Llama-7B-shaped blocks (hidden 4096, MLP 11008), each with LoRA on its
seven projections (q, k, v, o, gate, up, down), attached by peft as in LLM fine-tuning. A block
runs the projections with a Llama block's data flow (q, k, v read the stream, o writes it back,
the SwiGLU MLP), without the attention softmax, which costs the same whatever the optimizer. One
step is forward, backward and the optimizer step on ``--tokens`` tokens.

Timing: at each rank, one process builds a model per optimizer and alternates their steps, so a
change in the machine's load hits all of them alike; "vs AdamW" is the median ratio of paired
steps. Memory: every (optimizer, rank) runs in its own process so that its peak is its own: on CPU the
peak resident set (``ru_maxrss``) minus the resident set after the model was built, so the
column is what training adds (activations, gradients, optimizer state, statistics); on a GPU
``torch.cuda.max_memory_allocated`` minus the allocated memory after the model was built. The
optimizer state is counted exactly (the tensors in ``optimizer.state``).

    python benchmarks/llm_throughput.py --steps 5 --repeats 2  # 1 block, ranks 8/16/64, 256 tokens
    python benchmarks/llm_throughput.py --layers 4 --tokens 2048 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adafactor", "adaprelora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Block(nn.Module):
    """The seven Llama projections in a Llama block's data flow (attention mixing left out)."""

    def __init__(self, hidden: int, mlp: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(hidden, hidden, bias=False))
        self.gate_proj, self.up_proj = nn.Linear(hidden, mlp, bias=False), nn.Linear(hidden, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden, bias=False)

    def forward(self, h):
        h = h + self.o_proj(self.q_proj(h) + self.k_proj(h) + self.v_proj(h))
        return h + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def build(layers: int, hidden: int, mlp: int, rank: int, dtype: torch.dtype, device: str) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device(device):
        stack = nn.Sequential(*[Block(hidden, mlp) for _ in range(layers)]).to(dtype)
    stack = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS)), stack)
    for name, p in stack.named_parameters():
        p.requires_grad = "lora_" in name
    for name, p in stack.named_parameters():  # B = 0 would make the first steps degenerate for every optimizer
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0.0, 1e-3)
    return stack


def _memory(device: str) -> float:
    """MiB: peak resident set (CPU) or allocated (GPU) so far."""
    if device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return torch.cuda.max_memory_allocated() / 2**20


def measure(optimizer_name: str, rank: int, args) -> dict:
    """One (optimizer, rank) in this process: step times and the memory training adds."""
    from adaprelora_diffusion.optim import make_optimizer
    from benchmarks.quality.harness import state_bytes

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = build(args.layers, args.hidden, args.mlp, rank, dtype, args.device)
    x = torch.randn(args.tokens, args.hidden, dtype=dtype, device=args.device)
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    before = _memory(args.device) if args.device == "cpu" else torch.cuda.memory_allocated() / 2**20
    optimizer = make_optimizer(optimizer_name, model, lr=1e-4)
    times = []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"optimizer": optimizer_name, "rank": rank, "step_s": times, "median_s": median,
            "tokens_per_s": args.tokens / median, "spread_tokens_per_s": [args.tokens / max(times), args.tokens / min(times)],
            "training_mib": _memory(args.device) - before, "state_mib": state_bytes(optimizer) / 2**20}


def paired(rank: int, names: list[str], args) -> dict[str, list[float]]:
    """Step times of every optimizer at one rank, their steps alternating in this process (one model
    each, the same weights): a change in the machine's load hits all of them alike, so the per-step
    ratios compare them even on a shared machine."""
    from adaprelora_diffusion.optim import make_optimizer

    dtype = getattr(torch, args.dtype)
    models, optimizers = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build(args.layers, args.hidden, args.mlp, rank, dtype, args.device)
        optimizers[name] = make_optimizer(name, models[name], lr=1e-4)
    x = torch.randn(args.tokens, args.hidden, dtype=dtype, device=args.device)
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(args.warmup + args.steps):
        for name in names:
            sync()
            t0 = time.perf_counter()
            models[name](x).float().square().mean().backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def combine(memory_runs: list[dict], times: list[float], adamw_times: list[float], tokens: int) -> dict:
    """One config: tokens/s over its paired steps, the median per-step speed ratio to AdamW, the median memory."""
    median = statistics.median(times)
    return {**memory_runs[0], "step_s": times, "median_s": median, "tokens_per_s": tokens / median,
            "spread_tokens_per_s": [tokens / max(times), tokens / min(times)],
            "vs_adamw": statistics.median(a / t for a, t in zip(adamw_times, times)),
            "training_mib": statistics.median(r["training_mib"] for r in memory_runs)}


def render(results: list[dict], args) -> str:
    threads = torch.get_num_threads() if args.device == "cpu" else None
    where = f"CPU, {threads} threads" if threads else torch.cuda.get_device_name()
    lines = [f"LLM LoRA step ({args.layers} Llama-7B-shaped block(s): hidden {args.hidden}, MLP {args.mlp}, LoRA on "
             f"q/k/v/o/gate/up/down; {args.tokens} tokens a step, {args.dtype}; {where}; median of {args.steps} steps "
             f"after {args.warmup} warm-up in each of {args.repeats} round(s), the optimizers' steps alternating in one "
             f"process; range in brackets; vs AdamW: median ratio of paired steps)", "",
             "| rank | optimizer | tokens/s | vs AdamW | training memory (MiB) | optimizer state (MiB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        lo, hi = r["spread_tokens_per_s"]
        lines.append(f"| {r['rank']} | {r['optimizer']} | {r['tokens_per_s']:.0f} [{lo:.0f}-{hi:.0f}] | "
                     f"{r['vs_adamw']:.2f}x | {r['training_mib']:.0f} | {r['state_mib']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--layers", type=int, default=1, help="Llama-shaped blocks in the stack")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=256, help="tokens a step (batch x sequence length)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all configs (each in a new process)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", nargs=2, metavar=("OPTIMIZER", "RANK"), help=argparse.SUPPRESS)  # a memory child
    parser.add_argument("--paired", metavar="RANK", help=argparse.SUPPRESS)  # a timing child
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return None
    if args.paired:
        names = args.optimizers if "adamw" in args.optimizers else ["adamw", *args.optimizers]
        print(json.dumps(paired(int(args.paired), names, args)))
        return None
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json:
        forwarded = [a for i, a in enumerate(forwarded) if not (i > 0 and forwarded[i - 1] == "--json") and a != str(args.json)]
    names = args.optimizers if "adamw" in args.optimizers else ["adamw", *args.optimizers]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def child(*extra):
        done = subprocess.run([sys.executable, __file__, *forwarded, *extra], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = []
    for rank in args.ranks:
        times: dict[str, list[float]] = {name: [] for name in names}
        memory: dict[str, list[dict]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            for name, t in child("--paired", str(rank)).items():
                times[name] += t
            for name in names:  # memory: each optimizer alone in a fresh process (one step is its peak)
                memory[name].append(child("--steps", "1", "--one", name, str(rank)))
            print(f"  round {round_ + 1}, rank {rank}: " + ", ".join(
                f"{n} {args.tokens / statistics.median(t):.0f} tokens/s" for n, t in times.items()), file=sys.stderr, flush=True)
        results += [combine(memory[name], times[name], times["adamw"], args.tokens) for name in names]
    text = render(results, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results},
                                        indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
