"""Time per optimizer.step() and optimizer state bytes on the SD 1.5 UNet's LoRA shapes.

The model is the 128 attention projections (to_q, to_k, to_v, to_out.0) of the Stable Diffusion
1.5 UNet with their real shapes (taken from diffusers' UNet2DConditionModel built from the 1.5
config on the meta device), each wrapped by peft LoRA; the frozen base weights are one set shared
by every model, and their output on the fixed random tokens is computed once (the same tensor, so
the same loss and gradients, without streaming 94M weights per untimed forward). Every iteration
runs zero_grad, a forward and a backward (so hook statistics are gathered as in training), then
`step()` at lr 1e-5 (so B stays near its start). Only `step()` is timed for the step column
(perf_counter, after a cuda synchronize on cuda); backward is timed separately, because the
"exact" and "sketch" statistics cost their work in backward, not in step().

Protocol, per rank:

* Two starts: ``b0`` is peft's own LoRA init (B = 0, as training starts), ``trained`` draws
  B ~ N(0, 0.02) (a trained-looking state). A and the input tokens are the same for both.
* Interleaved: one model + optimizer per (config, start) is built up front; then ``--warmup``
  untimed rounds and ``--steps`` timed rounds, where each round runs one iteration of every
  (config, start) in an order shuffled per round by a seeded RNG (the same every run), so that
  no config always runs first or after the same neighbour, and machine drift hits all alike.
* Per (config, start), a repeat's figure is the median step time over its rounds; its ratio to
  AdamW is the ratio of that median to AdamW's median in the same repeat, same start.
* ``--repeats`` repeats all of this with fresh models and optimizers (same seeds). The table's
  step ms and backward ms are the medians over repeats of the per-repeat medians; ``x AdamW``
  is ``median [min-max]`` over repeats of the per-repeat ratios: the spread says how far a
  figure moved between repeats on this machine, and ratios within it are not distinguishable.
* State bytes are counted once per optimizer after the run, storages shared by views once.

The one command, which reproduces the README's table (ranks 16 and 64; adamw, adaprelora and
adafactor x 2 starts; 3 + 30 rounds; 3 repeats; 16 tokens; ``--optimizers`` adds the other
configs). Run it on an otherwise idle machine, since anything else running inflates every figure:

    python benchmarks/optimizer_step.py
    python benchmarks/optimizer_step.py --device cuda --json out.json   # on a GPU
    python benchmarks/optimizer_step.py --render out.json               # reprint a saved table

``--json`` saves every raw per-step time (ms) with the summary rows, so the table (and any doc
built from it) can be regenerated with ``--render`` without measuring again.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaprelora_diffusion.optim import make_optimizer  # noqa: E402
from benchmarks.reference_configs import sd15_attention_projection_shapes  # noqa: E402

#: label -> (make_optimizer name, keyword arguments). torch's foreach kernels are forced where an
#: optimizer has them (on CPU torch would otherwise pick the slower per-tensor loop).
CONFIGS = {
    "adamw": ("adamw", {"foreach": True}),
    "adaprelora": ("adaprelora", {}),  # the optimizer's own defaults
    "adaprelora[v2]": ("adaprelora", {"step_bound": None, "trust_ratio": None}),  # version 3's bounds off
    "adaprelora[exact]": ("adaprelora", {"stats": "exact"}),
    "adaprelora[sketch]": ("adaprelora", {"stats": "sketch"}),
    "adaprelora[tangent]": ("adaprelora", {"stats": "tangent"}),
    "adafactor": ("adafactor", {"foreach": True}),  # torch.optim.Adafactor on the factors
    "scaled_adamw": ("scaled_adamw", {"foreach": True}),
    "lorapro": ("lorapro", {}),
}
DEFAULT_CONFIGS = ["adamw", "adaprelora", "adafactor"]  # the README table; --optimizers adds the rest
STARTS = ("b0", "trained")
BASELINE = "adamw"
LR = 1e-5


class FrozenProjection(nn.Linear):
    """A frozen base projection that returns its output on the benchmark's fixed tokens from a cache.

    The output is the same tensor `x @ W^T` would give, so the loss and every gradient are unchanged;
    recomputing it would stream all 94M base weights through memory every iteration (untimed, but
    ~80 ms per iteration, minutes of a default run, on a 2-core CPU). Any other input is computed normally.
    """

    cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x):
        if self.cache is not None and x is self.cache[0]:
            return self.cache[1]
        return super().forward(x)


class Projections(nn.Module):
    """The LoRA-targeted linear layers of the SD 1.5 UNet (sharing frozen base weights), on random tokens."""

    def __init__(self, weights, cache=None):
        super().__init__()
        self.layers = nn.ModuleList()
        for k, w in enumerate(weights):
            layer = FrozenProjection(w.shape[1], w.shape[0], bias=False, device="meta")
            layer.weight = w
            layer.cache = cache[k] if cache is not None else None
            self.layers.append(layer)

    def forward(self, inputs):
        return sum(layer(x).square().mean() for layer, x in zip(self.layers, inputs))


def base_weights(shapes, device, dtype) -> list[nn.Parameter]:
    """The frozen projection weights (nn.Linear's init, seed 0), built once and shared by every model."""
    torch.manual_seed(0)
    return [nn.Parameter(nn.Linear(i, o, bias=False, device=device, dtype=dtype).weight.detach(), requires_grad=False)
            for _, i, o in shapes]


def build(weights, rank, start, cache=None):
    """peft LoRA (r = alpha = rank) on every projection; A from seed 0, B = 0 (``b0``) or N(0, 0.02) (``trained``).

    `cache`: the frozen outputs on the fixed tokens, from `base_outputs` (see FrozenProjection)."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    model = Projections(weights, cache)
    torch.manual_seed(0)
    targets = ["layers." + str(i) for i in range(len(weights))]
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    g = torch.Generator(device=weights[0].device).manual_seed(2)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
        if start == "trained" and "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.02, generator=g)
    return model


def make(config, model):
    name, kwargs = CONFIGS[config]
    return make_optimizer(name, model, lr=LR, **kwargs)


def make_inputs(weights, tokens):
    g = torch.Generator(device=weights[0].device).manual_seed(1)
    return [torch.randn(tokens, w.shape[1], generator=g, device=w.device, dtype=w.dtype) for w in weights]


@torch.no_grad()
def base_outputs(weights, inputs):
    """(tokens, frozen output) per layer: computed once, shared by every model (see FrozenProjection)."""
    return [(x, nn.functional.linear(x, w)) for w, x in zip(weights, inputs)]


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors, counting shared storages once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iteration(model, optimizer, inputs, device) -> tuple[float, float]:
    """One zero_grad/forward/backward/step; returns (backward seconds, step seconds)."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(inputs)
    sync(device)
    t0 = time.perf_counter()
    loss.backward()
    sync(device)
    t1 = time.perf_counter()
    optimizer.step()
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def round_order(n, rank, repeat, rnd) -> list[int]:
    """The order of the n runs in one round: a shuffle seeded by (rank, repeat, round)."""
    order = list(range(n))
    random.Random(1_000_003 * rank + 1_009 * repeat + rnd).shuffle(order)
    return order


def measure_repeat(weights, inputs, cache, rank, repeat, keys, args, device) -> list[dict]:
    """One interleaved measurement of every (config, start) at `rank`: raw step and backward ms."""
    t_build = time.perf_counter()
    runs = []
    for config, start in keys:
        model = build(weights, rank, start, cache)
        runs.append((model, make(config, model)))
    built_s = time.perf_counter() - t_build
    steps = {key: [] for key in keys}
    backwards = {key: [] for key in keys}
    gc.collect()
    gc.disable()
    t_run = time.perf_counter()
    try:
        for rnd in range(args.warmup + args.steps):
            for k in round_order(len(keys), rank, repeat, rnd):
                backward_s, step_s = iteration(*runs[k], inputs, device)
                if rnd >= args.warmup:
                    steps[keys[k]].append(1e3 * step_s)
                    backwards[keys[k]].append(1e3 * backward_s)
    finally:
        gc.enable()
    out = []
    for (config, start), (model, optimizer) in zip(keys, runs):
        out.append({
            "rank": rank, "repeat": repeat, "optimizer": config, "start": start,
            "step_ms": steps[(config, start)], "backward_ms": backwards[(config, start)],
            "state_bytes": state_bytes(optimizer),
            "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        })
        if hasattr(optimizer, "close"):
            optimizer.close()
    print(f"  rank {rank}, repeat {repeat + 1}/{args.repeats}: built {len(runs)} runs in {built_s:.1f} s, "
          f"{args.warmup}+{args.steps} rounds in {time.perf_counter() - t_run:.1f} s", file=sys.stderr, flush=True)
    del runs
    gc.collect()
    return out


def summarize(raw, ranks, configs, starts) -> list[dict]:
    """One row per (rank, config, start): medians over repeats of per-repeat medians, ratio spread."""
    med = {(m["rank"], m["repeat"], m["optimizer"], m["start"]): statistics.median(m["step_ms"]) for m in raw}
    repeats = sorted({m["repeat"] for m in raw})
    rows = []
    for rank in ranks:
        for config in configs:
            for start in starts:
                mine = [m for m in raw if (m["rank"], m["optimizer"], m["start"]) == (rank, config, start)]
                mine.sort(key=lambda m: m["repeat"])
                per_repeat = [statistics.median(m["step_ms"]) for m in mine]
                ratios = None
                if all((rank, rep, BASELINE, start) in med for rep in repeats):
                    ratios = [med[rank, rep, config, start] / med[rank, rep, BASELINE, start] for rep in repeats]
                rows.append({
                    "rank": rank, "optimizer": config, "start": start,
                    "step_ms": statistics.median(per_repeat), "step_ms_per_repeat": per_repeat,
                    "ratio": statistics.median(ratios) if ratios else None,
                    "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
                    "ratios_per_repeat": ratios,
                    "backward_ms": statistics.median(statistics.median(m["backward_ms"]) for m in mine),
                    "state_bytes": max(m["state_bytes"] for m in mine),
                    "lora_params": mine[0]["lora_params"],
                    "step_ms_raw": [m["step_ms"] for m in mine],
                    "backward_ms_raw": [m["backward_ms"] for m in mine],
                })
    return rows


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def table(rows) -> str:
    lines = [
        "| rank | optimizer | start | step ms | x AdamW [min-max] | backward ms | state MiB | x AdamW |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = next((b for b in rows if (b["rank"], b["optimizer"], b["start"]) == (r["rank"], BASELINE, r["start"])), None)
        t_ratio = f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if r["ratio"] is not None else "-"
        s_ratio = f"{r['state_bytes'] / base['state_bytes']:.3f}" if base and base["state_bytes"] else "-"
        lines.append(
            f"| {r['rank']} | {r['optimizer']} | {r['start']} | {r['step_ms']:.2f} | {t_ratio} | {r['backward_ms']:.1f} "
            f"| {r['state_bytes'] / 2**20:.2f} | {s_ratio} |"
        )
    return "\n".join(lines)


def report(payload) -> str:
    """Header and table of a payload (a fresh measurement or a saved --json file)."""
    header = (
        f"optimizer.step() on the {payload['layers']} attention projections of the SD 1.5 UNet "
        f"({payload['dtype']} LoRA weights, {payload['tokens']} tokens/layer, lr {payload['lr']:g})\n"
        f"device: {payload['device']}; threads {payload['threads']}; torch {payload['torch']}\n"
        f"{payload['steps']} timed steps after {payload['warmup']} warm-up rounds, interleaved (order shuffled per round), "
        f"{payload['repeats']} repeats; starts: {', '.join(payload['starts'])}\n"
        "step ms, backward ms: median over repeats of each repeat's median; "
        "x AdamW: median [min-max] over repeats of the ratio of medians to AdamW (same rank, start, repeat)\n"
    )
    return header + "\n" + table(payload["results"])


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = sd15_attention_projection_shapes()
    configs = list(dict.fromkeys(args.optimizers))
    starts = list(dict.fromkeys(args.starts))
    keys = [(c, s) for c in configs for s in starts]
    weights = base_weights(shapes, device, dtype)
    inputs = make_inputs(weights, args.tokens)
    cache = base_outputs(weights, inputs)
    t0 = time.perf_counter()
    raw = []
    for rank in args.ranks:
        for repeat in range(args.repeats):
            raw += measure_repeat(weights, inputs, cache, rank, repeat, keys, args, device)
    print(f"  measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return {
        "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "dtype": args.dtype, "layers": len(shapes), "tokens": args.tokens, "lr": LR,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "ranks": list(args.ranks), "optimizers": configs, "starts": starts,
        "configs": {c: {"name": CONFIGS[c][0], "kwargs": CONFIGS[c][1]} for c in configs},
        "results": summarize(raw, list(args.ranks), configs, starts),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the LoRA weights")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--tokens", type=int, default=16,
                        help="tokens per layer per iteration (backward and the hook statistics scale with it)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds before the timed ones")
    parser.add_argument("--steps", "--iters", dest="steps", type=int, default=30, help="timed interleaved rounds")
    parser.add_argument("--repeats", type=int, default=3, help="whole measurements, fresh models each")
    parser.add_argument("--json", type=Path, help="also write the results (summary and raw per-step times) here")
    parser.add_argument("--render", type=Path, metavar="JSON", help="reprint the table of a saved --json file; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
    else:
        if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
            parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
        payload = measure(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=1))
    print(report(payload))
    return payload


if __name__ == "__main__":
    main()
