"""Steps per second and peak memory of the DreamBooth training loop, per optimizer.

Times the project's own `train()` (data, VAE, UNet forward/backward, optimizer, scheduler) from
its step events, after a warm-up, in one subprocess per optimizer so peak memory is clean:

    python benchmarks/train_throughput.py                                # CPU, tiny model
    python benchmarks/train_throughput.py --model sd15 --device cuda --mixed_precision bf16
    python benchmarks/train_throughput.py --model sdxl --device cuda --mixed_precision bf16 --rank 16 \
        --resolution 1024 [--gradient_checkpointing]

`--model sd15` / `sdxl` build the real Stable Diffusion 1.5 / SDXL 1.0 architectures (UNet, VAE,
CLIP ViT-L/14 and, for SDXL, OpenCLIP bigG text encoders) from configs with random weights, cached
as pipeline folders: nothing is downloaded. Their tokenizer is the project's small byte-level
one, which changes nothing about the cost of a step. `tiny` and `tiny-sdxl` are the tests'
random tiny pipelines. Every model trains on the demo subject. A run that fails is reported and
the script exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_configs import build_reference_pipeline  # noqa: E402

CONFIGS = {
    "adamw": ("adamw", {}),
    "adaprelora[sketch]": ("adaprelora", {"adaprelora_stats": "sketch"}),
    "adaprelora[exact]": ("adaprelora", {"adaprelora_stats": "exact"}),
    "adaprelora[tangent]": ("adaprelora", {"adaprelora_stats": "tangent"}),
    "scaled_adamw": ("scaled_adamw", {}),
    "lorapro": ("lorapro", {}),
    "loraplus": ("loraplus", {}),
}


def worker(args) -> None:
    """One optimizer, one process: run train() and print a JSON line."""
    import torch

    from adaprelora_diffusion.dreambooth.config import TrainConfig
    from adaprelora_diffusion.dreambooth.trainer import train

    from adaprelora_diffusion.demo.descriptor import DEMO_INSTANCE_PROMPT, DEMO_SUBJECT_DIR

    name, extra = CONFIGS[args.worker]
    if args.model in ("sd15", "sdxl"):
        model = str(build_reference_pipeline(Path(args.cache) / f"{args.model}-random", args.model))
    else:  # the random-weight tiny pipelines, named explicitly (the no-model default is the pretrained one)
        from adaprelora_diffusion.demo.tiny_pipeline import ensure_tiny_pipeline

        model = str(ensure_tiny_pipeline(family="sdxl" if args.model == "tiny-sdxl" else "sd"))
    stamps: list[float] = []
    out = tempfile.mkdtemp()
    config = TrainConfig(pretrained_model_name_or_path=model, output_dir=out, optimizer=name, report_to="none",
                         num_validation_images=0, max_train_steps=args.warmup + args.steps, rank=args.rank,
                         resolution=args.resolution, mixed_precision=args.mixed_precision, checkpointing_steps=None,
                         cpu=args.device == "cpu", seed=0, instance_data_dir=str(DEMO_SUBJECT_DIR),
                         instance_prompt=DEMO_INSTANCE_PROMPT, gradient_checkpointing=args.gradient_checkpointing, **extra)
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    train(config, progress=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None)
    timed = stamps[args.warmup:]
    result = {
        "optimizer": args.worker,
        "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
        "peak_mib": (torch.cuda.max_memory_allocated() / 2**20 if args.device != "cpu"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print("RESULT " + json.dumps(result), flush=True)


def device_name(device: str) -> str:
    if device != "cpu":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "tiny-sdxl", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny) or 512 (sd15)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/adaprelora_diffusion"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = {"sd15": 512, "sdxl": 1024}.get(args.model, 64)
    if args.worker:
        return worker(args)

    results, failed = [], []
    for opt in args.optimizers:
        cmd = [sys.executable, __file__, "--worker", opt, *[a for a in (argv if argv is not None else sys.argv[1:])
                                                           if a not in args.optimizers and a != "--optimizers"]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{opt}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            failed.append(opt)
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  measured {opt}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["optimizer"] == "adamw"), None)
    print(f"training loop, {args.model} model at {args.resolution}px, rank {args.rank}, batch 1, mixed precision "
          f"{args.mixed_precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"{args.steps} steps after {args.warmup} warm-up\ndevice: {device_name(args.device)}\n")
    print("| optimizer | steps/s | step time x AdamW | peak memory MiB |")
    print("|---|---:|---:|---:|")
    for r in results:
        ratio = f"{base['steps_per_s'] / r['steps_per_s']:.3f}" if base else "-"
        print(f"| {r['optimizer']} | {r['steps_per_s']:.2f} | {ratio} | {r['peak_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(args.device), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2, default=str))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return results, failed


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)
