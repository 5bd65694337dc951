"""The `adaprelora-dreambooth` command (also `python train_dreambooth.py`).

    adaprelora-dreambooth                       # demo: tiny pretrained model, demo subject, CPU
    adaprelora-dreambooth --pretrained_model_name_or_path PATH_OR_ID \\
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir my-lora

Flags follow diffusers' DreamBooth LoRA script; `--help` lists them all. The logic lives in
`trainer.train`; this module parses flags, turns the first Ctrl-C or SIGTERM into a clean stop
(engine.signals) and an error into one line and an exit status (engine.command).
"""

from __future__ import annotations

import logging
import sys

from ..engine.command import EXIT_OK, report_error
from ..engine.signals import StopSignals
from .config import parse_config
from .trainer import train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_config(argv)
        config.validate()
    except ValueError as err:
        return report_error(err)
    try:
        with StopSignals() as stop:
            result = train(config, should_stop=stop)
    except (Exception, KeyboardInterrupt) as err:  # every error: one line and an exit status (engine.command)
        return report_error(err, debug=config.debug)
    status = "stopped early" if result.stopped_early else "done"
    loss = "-" if result.final_loss is None else round(result.final_loss, 4)
    print(f"{status}: {result.global_step} steps in {result.seconds:.0f}s, final loss {loss}, {result.skipped_steps} skipped; "
          f"LoRA: {result.lora_path}" + (f"; kohya: {result.kohya_path}" if result.kohya_path else ""))
    return stop.exit_status if result.stopped_early else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
