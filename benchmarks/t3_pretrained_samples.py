"""Does the scene-pretrained tiny pipeline draw what its prompt says? Samples, grid and a score.

For a fixed set of single-shape prompts (every colour at every position, on contrasting
backgrounds) and a few two-shape prompts, it samples with DDIM and fixed seeds, judges each image
with :func:`adaprelora_diffusion.demo.scenes.judge` (named colour in the named region, not on the
opposite side, named background in the corners), and does the same for the random-weight tiny
pipeline as a baseline. Writes a PNG grid (reference drawing | samples | random baseline) and a
JSON of the scores.

    PYTHONPATH=. python benchmarks/t3_pretrained_samples.py --pipeline /path/to/pretrained
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaprelora_diffusion.demo import scenes  # noqa: E402

torch.set_num_threads(1)


def eval_specs() -> list[scenes.SceneSpec]:
    """30 single-shape prompts (6 colours x 5 positions) + 6 two-shape prompts, all fixed."""
    specs = []
    for ci, color in enumerate(scenes.COLORS):
        for pi, position in enumerate(scenes.POSITIONS):
            backgrounds = [b for b in scenes.BACKGROUNDS if b != color]
            bg = backgrounds[(ci + pi) % len(backgrounds)]
            kind = scenes.SHAPES[(ci + pi) % len(scenes.SHAPES)]
            specs.append(scenes.SceneSpec((scenes.Shape(kind, color, position, "large"),), bg))
    pairs = [("red", "yellow", "left", "right", "black"), ("blue", "white", "top", "bottom", "gray"),
             ("green", "red", "left", "right", "white"), ("yellow", "blue", "top", "bottom", "black"),
             ("white", "green", "right", "left", "blue"), ("black", "red", "bottom", "top", "white")]
    for i, (c1, c2, p1, p2, bg) in enumerate(pairs):
        specs.append(scenes.SceneSpec((scenes.Shape(scenes.SHAPES[i % 3], c1, p1, "large"),
                                       scenes.Shape(scenes.SHAPES[(i + 1) % 3], c2, p2, "large")), bg))
    return specs


def sample(pipe_dir, prompts: list[str], seeds: list[int], steps: int, guidance: float):
    """``images[seed_index][prompt_index]`` from the pipeline folder, DDIM, fixed seeds."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for seed in seeds:
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        out.append(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        height=64, width=64).images)
    return out


def score(specs, images_per_seed) -> dict:
    present = [0, 0]; single = [0, 0]; position = [0, 0]; two = [0, 0]; background = [0, 0]; all_ok = [0, 0]
    for images in images_per_seed:
        for spec, image in zip(specs, images):
            v = scenes.judge(image, spec)
            present[0] += sum(v["color_present"]); present[1] += len(v["color_present"])
            bucket = single if len(spec.shapes) == 1 else two
            bucket[0] += sum(v["color_ok"]); bucket[1] += len(v["color_ok"])
            position[0] += sum(v["position_ok"]); position[1] += len(v["position_ok"])
            background[0] += v["background_ok"]; background[1] += 1
            all_ok[0] += all(v["color_ok"]) and all(v["position_ok"]) and v["background_ok"]; all_ok[1] += 1
    frac = lambda c: round(c[0] / max(1, c[1]), 3)  # noqa: E731
    return {"color_present": frac(present), "single_shape_color": frac(single), "single_shape_position": frac(position),
            "two_shape_color": frac(two), "background": frac(background), "all_correct": frac(all_ok),
            "counts": {"present": present, "single": single, "position": position, "two": two, "background": background, "all": all_ok}}


def grid(specs, pretrained, baseline, path: Path, rows: list[int], scale: int = 2) -> None:
    """Rows: prompt text | reference drawing | pretrained samples (one per seed) | baseline sample."""
    from PIL import Image, ImageDraw

    tile = 64 * scale
    label_w = 420
    cols = 1 + len(pretrained) + 1
    canvas = Image.new("RGB", (label_w + cols * (tile + 4), len(rows) * (tile + 4)), (60, 60, 60))
    draw = ImageDraw.Draw(canvas)
    for r, i in enumerate(rows):
        y = r * (tile + 4)
        words = specs[i].caption().split()
        lines = [" ".join(words[k:k + 7]) for k in range(0, len(words), 7)]
        draw.multiline_text((4, y + 4), "\n".join(lines), fill=(255, 255, 255))
        tiles = [scenes.render(specs[i])] + [imgs[i] for imgs in pretrained] + [baseline[0][i]]
        for c, im in enumerate(tiles):
            canvas.paste(im.resize((tile, tile), Image.NEAREST), (label_w + c * (tile + 4), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", help="pretrained pipeline folder (default: ensure_pretrained_tiny_pipeline())")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="t3_pretrained")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)

    from adaprelora_diffusion.demo.pretrained_tiny import ensure_pretrained_tiny_pipeline
    from adaprelora_diffusion.demo.tiny_pipeline import ensure_tiny_pipeline

    pipe_dir = args.pipeline or ensure_pretrained_tiny_pipeline()
    specs = eval_specs()
    prompts = [s.caption() for s in specs]
    seeds = list(range(args.seeds))
    pretrained = sample(pipe_dir, prompts, seeds, args.steps, args.guidance)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = sample(ensure_tiny_pipeline(cache_dir=tmp), prompts, seeds, args.steps, args.guidance)
    result = {
        "pipeline": str(pipe_dir), "steps": args.steps, "guidance": args.guidance, "seeds": seeds,
        "num_prompts": len(prompts), "pretrained": score(specs, pretrained), "random_baseline": score(specs, baseline),
        "chance_color": round(1 / len(scenes.PALETTE), 3),
    }
    out = Path(args.out_dir)
    rows = list(range(0, 30, 3)) + [30, 31, 32, 33]
    grid(specs, pretrained, baseline, out / f"{args.name}_samples.png", rows)
    (out / f"{args.name}_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
