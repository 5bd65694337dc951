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
import traceback

from .config import parse_config
from .trainer import TrainingError, train


#: exit statuses, as shells report a process ended by the signal
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_config(argv)
        config.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # The first Ctrl-C or SIGTERM (cloud preemption, `kill`, `docker stop`, job schedulers) ends the
    # current step, writes a checkpoint and exits; a second Ctrl-C aborts at once.
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        if len(received) > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = train(config, should_stop=lambda: bool(received))
    except KeyboardInterrupt:
        print("aborted: the second Ctrl-C stopped the run mid-step; the newest checkpoint is intact "
              "(continue with --resume_from_checkpoint latest).", file=sys.stderr)
        return EXIT_SIGINT
    except (TrainingError, ValueError, OSError, RuntimeError) as err:
        if config.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a library error no message of ours covers: still one line, unless --debug
        if config.debug:
            traceback.print_exc()
        print(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback, and please report it)",
              file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = "stopped early" if result.stopped_early else "done"
    loss = "-" if result.final_loss is None else round(result.final_loss, 4)
    print(f"{status}: {result.global_step} steps in {result.seconds:.0f}s, final loss {loss}, {result.skipped_steps} skipped; "
          f"LoRA: {result.lora_path}" + (f"; kohya: {result.kohya_path}" if result.kohya_path else ""))
    if result.stopped_early:
        return EXIT_SIGTERM if received and received[0] == signal.SIGTERM else EXIT_SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
