"""LLM LoRA training step: tokens/s and peak memory of AdaPreLoRA, AdamW and Adafactor.

The model is a stack of Llama-7B-shaped blocks (hidden 4096, MLP 11008), each with LoRA on its
seven projections (q, k, v, o, gate, up, down), attached by peft as in LLM fine-tuning. A block
runs the projections with a Llama block's data flow (q, k, v read the stream, o writes it back,
the SwiGLU MLP), without the attention softmax, which costs the same whatever the optimizer. One
step is forward, backward and the optimizer step on ``--tokens`` tokens.

Every (optimizer, rank) runs in its own process so that its peak memory is its own: on CPU the
peak resident set (``ru_maxrss``) minus the resident set after the model was built, so the
column is what training adds (activations, gradients, optimizer state, statistics); on a GPU
``torch.cuda.max_memory_allocated`` minus the allocated memory after the model was built. The
optimizer state is counted exactly (the tensors in ``optimizer.state``).

    python benchmarks/llm_throughput.py --steps 5 --repeats 3  # 1 block, ranks 8/16/64, 256 tokens
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


def merge_runs(runs: list[dict], tokens: int) -> dict:
    """One config's rounds as one result: the median and range over all their steps, the median memory."""
    times = [t for r in runs for t in r["step_s"]]
    median = statistics.median(times)
    return {**runs[0], "step_s": times, "median_s": median, "tokens_per_s": tokens / median,
            "spread_tokens_per_s": [tokens / max(times), tokens / min(times)],
            "training_mib": statistics.median(r["training_mib"] for r in runs)}


def render(results: list[dict], args) -> str:
    threads = torch.get_num_threads() if args.device == "cpu" else None
    where = f"CPU, {threads} threads" if threads else torch.cuda.get_device_name()
    lines = [f"LLM LoRA step ({args.layers} Llama-7B-shaped block(s): hidden {args.hidden}, MLP {args.mlp}, LoRA on "
             f"q/k/v/o/gate/up/down; {args.tokens} tokens a step, {args.dtype}; {where}; median of {args.steps} steps "
             f"after {args.warmup} warm-up in each of {args.repeats} round(s), range over all rounds in brackets)", "",
             "| rank | optimizer | tokens/s | vs AdamW | training memory (MiB) | optimizer state (MiB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        adamw = next(a for a in results if a["rank"] == r["rank"] and a["optimizer"] == "adamw")
        lo, hi = r["spread_tokens_per_s"]
        lines.append(f"| {r['rank']} | {r['optimizer']} | {r['tokens_per_s']:.0f} [{lo:.0f}-{hi:.0f}] | "
                     f"{r['tokens_per_s'] / adamw['tokens_per_s']:.2f}x | {r['training_mib']:.0f} | {r['state_mib']:.1f} |")
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
    parser.add_argument("--one", nargs=2, metavar=("OPTIMIZER", "RANK"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return None
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json:
        forwarded = [a for i, a in enumerate(forwarded) if not (i > 0 and forwarded[i - 1] == "--json") and a != str(args.json)]
    names = args.optimizers if "adamw" in args.optimizers else ["adamw", *args.optimizers]
    configs = [(rank, name) for rank in args.ranks for name in names]
    runs: dict[tuple[int, str], list[dict]] = {c: [] for c in configs}
    # Rounds over every config, so a change in the machine's load hits all of them alike.
    for round_ in range(args.repeats):
        for rank, name in configs:
            done = subprocess.run([sys.executable, __file__, *forwarded, "--one", name, str(rank)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            if done.returncode != 0:
                raise SystemExit(f"{name} rank {rank} failed:\n{done.stderr[-3000:]}")
            runs[rank, name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1}: rank {rank} {name}: {runs[rank, name][-1]['tokens_per_s']:.0f} tokens/s",
                  file=sys.stderr, flush=True)
    results = [merge_runs(runs[c], args.tokens) for c in configs]
    text = render(results, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results},
                                        indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
