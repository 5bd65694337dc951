"""The `adaprelora-dreambooth` command (also `python train_dreambooth.py`).

    adaprelora-dreambooth                       # demo: tiny pretrained model, demo subject, CPU
    adaprelora-dreambooth --pretrained_model_name_or_path PATH_OR_ID \\
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir my-lora

Flags follow diffusers' DreamBooth LoRA script; `--help` lists them all. The logic lives in
`trainer.train`; this module only parses flags and turns the first Ctrl-C into a
clean stop (checkpoint, then exit; a second Ctrl-C aborts).
"""

from __future__ import annotations

import logging
import signal
import sys

from .config import parse_config
from .trainer import TrainingError, train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_config(argv)
        config.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    interrupted = {"count": 0}

    def on_sigint(signum, frame):
        interrupted["count"] += 1
        if interrupted["count"] > 1:
            raise KeyboardInterrupt
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(config, should_stop=lambda: interrupted["count"] > 0)
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    status = "stopped early" if result.stopped_early else "done"
    print(
        f"{status}: {result.global_step} steps in {result.seconds:.0f}s, final loss {result.final_loss if result.final_loss is None else round(result.final_loss, 4)}, "
        f"{result.skipped_steps} skipped; LoRA: {result.lora_path}"
        + (f"; kohya: {result.kohya_path}" if result.kohya_path else "")
    )
    return 130 if result.stopped_early else 0


