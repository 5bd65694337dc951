"""Time per optimizer.step() and optimizer state bytes on the SD 1.5 UNet's LoRA shapes.

The model is the 128 attention projections (to_q, to_k, to_v, to_out.0) of the Stable Diffusion
1.5 UNet with their real shapes (taken from diffusers' UNet2DConditionModel built from the 1.5
config on the meta device), each wrapped by peft LoRA. Every iteration runs a forward and
backward over random tokens (so hook statistics are gathered as in training), then times
`step()` alone; backward time is reported too, because the "exact" and "sketch" statistics
cost their work in backward, not in step().

    python benchmarks/optimizer_step.py                     # CPU, ranks 4 16 64
    python benchmarks/optimizer_step.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
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

CONFIGS = {
    "adaprelora[exact]": ("adaprelora", {"stats": "exact"}),
    "adaprelora[sketch]": ("adaprelora", {"stats": "sketch"}),
    "adaprelora[tangent]": ("adaprelora", {"stats": "tangent"}),
    "adamw": ("adamw", {"foreach": True}),
    "scaled_adamw": ("scaled_adamw", {"foreach": True}),
    "lorapro": ("lorapro", {}),
}


class Projections(nn.Module):
    """The LoRA-targeted linear layers of the SD 1.5 UNet, applied to random tokens."""

    def __init__(self, shapes, device, dtype):
        super().__init__()
        self.names = [name for name, _, _ in shapes]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False, device=device, dtype=dtype) for _, i, o in shapes)

    def forward(self, inputs):
        return sum(layer(x).square().mean() for layer, x in zip(self.layers, inputs))


def build(shapes, rank, device, dtype):
    torch.manual_seed(0)
    model = Projections(shapes, device, dtype)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["layers." + str(i) for i in range(len(shapes))]), model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
        if "lora_B" in name:  # a trained-looking state, not the B = 0 start
            with torch.no_grad():
                p.normal_(0, 0.02)
    return model


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
        torch.cuda.synchronize()


def measure(config, shapes, rank, device, dtype, tokens, warmup, iters):
    name, kwargs = CONFIGS[config]
    model = build(shapes, rank, device, dtype)
    optimizer = make_optimizer(name, model, lr=1e-5, **kwargs)
    g = torch.Generator(device=device).manual_seed(1)
    inputs = [torch.randn(tokens, layer.in_features, generator=g, device=device, dtype=dtype) for layer in model.layers]
    step_times, backward_times = [], []
    for i in range(warmup + iters):
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
        if i >= warmup:
            backward_times.append(t1 - t0)
            step_times.append(t2 - t1)
    result = {
        "optimizer": config,
        "rank": rank,
        "step_ms": 1e3 * statistics.median(step_times),
        "backward_ms": 1e3 * statistics.median(backward_times),
        "state_bytes": state_bytes(optimizer),
        "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if hasattr(optimizer, "close"):
        optimizer.close()
    return result


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(results) -> str:
    lines = [
        "| rank | optimizer | step ms | x AdamW | backward ms | state MiB | x AdamW |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rank in sorted({r["rank"] for r in results}):
        rows = [r for r in results if r["rank"] == rank]
        base = next((r for r in rows if r["optimizer"] == "adamw"), None)
        for r in rows:
            t_ratio = f"{r['step_ms'] / base['step_ms']:.2f}" if base else "-"
            s_ratio = f"{r['state_bytes'] / base['state_bytes']:.3f}" if base and base["state_bytes"] else "-"
            lines.append(
                f"| {rank} | {r['optimizer']} | {r['step_ms']:.2f} | {t_ratio} | {r['backward_ms']:.1f} "
                f"| {r['state_bytes'] / 2**20:.2f} | {s_ratio} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the LoRA weights")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tokens", type=int, default=64, help="tokens per layer per iteration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = sd15_attention_projection_shapes()
    results = []
    for rank in args.ranks:
        for config in args.optimizers:
            results.append(measure(config, shapes, rank, device, dtype, args.tokens, args.warmup, args.iters))
            print(f"  measured {config} at rank {rank}", file=sys.stderr, flush=True)
    header = (
        f"optimizer.step() on the {len(shapes)} attention projections of the SD 1.5 UNet "
        f"({args.dtype} LoRA weights, {args.tokens} tokens/layer, median of {args.iters})\n"
        f"device: {device_name(device)}; torch {torch.__version__}\n"
    )
    print(header)
    print(table(results))
    if args.json:
        payload = {"device": device_name(device), "torch": torch.__version__, "dtype": args.dtype, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main()
