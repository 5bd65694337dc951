"""``python -m app.speed_check``: does a job train at the CLI's speed? The same run both ways.

The app way: ``python -m app`` on a fresh workspace, a job created through gradio_client and
polled once a second over plain HTTP. The CLI way: ``adaprelora-dreambooth`` with the
job's own ``training_config.json`` as flags. Both log the loss to TensorBoard, whose wall times
give the steps/s of the training loop itself (model loading and start-up excluded); sample
images and checkpoints are off so only steps are timed. The runs alternate
so that load from other processes hits both alike (app, CLI, app, CLI), and the two LoRA files must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adaprelora_diffusion.engine.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = ROOT / "adaprelora_diffusion" / "demo" / "assets" / "demo_subject"


def steps_per_second(output_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in sorted({f.parent for f in (output_dir / "logs").rglob("events.out.tfevents*")}):
        logs = EventAccumulator(str(folder))  # accelerate writes the scalars under the project's folder
        logs.Reload()
        if "loss" in logs.Tags()["scalars"]:
            break
    else:
        raise SystemExit(f"no loss scalars in {output_dir / 'logs'}")
    events = [e for e in logs.Scalars("loss") if e.step >= 2]  # step 1 includes lazy initialisation
    return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def _env() -> dict[str, str]:
    # one intra-op thread for both: on a shared CPU, OpenMP's spin-waiting makes multi-threaded
    # steps of a tiny model erratic (seconds instead of tenths), which would measure the neighbours
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def run_app(work: Path, settings: dict) -> Path:
    """Train one job through a launched app; returns its output folder."""
    from gradio_client import Client, handle_file

    port = free_port()
    workspace = work / f"workspace-{port}"
    app = subprocess.Popen([sys.executable, "-m", "app", "--workspace", str(workspace), "--port", str(port)], env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        job = client.predict([handle_file(str(p)) for p in sorted(SUBJECT.glob("*.png"))], settings, api_name="/create_job")
        import httpx  # polled once a second over plain HTTP, as a script would (a page's timer costs the server the same)

        while (status := httpx.post(f"http://127.0.0.1:{port}/gradio_api/run/job_status", json={"data": [job]},
                                    timeout=30).json()["data"][0])["state"] not in ("done", "failed", "stopped"):
            time.sleep(1)
        if status["state"] != "done":
            raise SystemExit(f"the app's job ended {status['state']}: {status['error']}")
        return workspace / "jobs" / job / "output"
    finally:
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=60)


def run_cli(work: Path, config: dict, tag: str) -> Path:
    output = work / f"cli-{tag}"
    flags = []
    for key, value in config.items():
        if key in ("output_dir", "logging_dir", "resume_from_checkpoint") or value is None or value is False:
            continue
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    # what the adaprelora-dreambooth console script runs (`python -m ...dreambooth.cli` has no __main__ block)
    entry = "import sys; from adaprelora_diffusion.dreambooth.cli import main; sys.exit(main())"
    subprocess.run([sys.executable, "-c", entry, *flags, "--output_dir", str(output)],
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return output


def _same_tensors(a: Path, b: Path) -> bool:
    """The LoRA tensors (the files' metadata names their own folders, so the bytes differ)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    settings = {"max_train_steps": args.steps, "checkpointing_steps": 10 * args.steps, "num_validation_images": 0,
                "report_to": "tensorboard", "class_word": "robot toy"}
    app_rates, cli_rates = [], []
    with tempfile.TemporaryDirectory(prefix="adaprelora-speed-") as tmp:
        work = Path(tmp)
        config = None
        for i in range(args.rounds):
            app_out = run_app(work, settings)
            config = config or json.loads((app_out / "training_config.json").read_text())
            cli_out = run_cli(work, config, str(i))
            app_rates.append(steps_per_second(app_out))
            cli_rates.append(steps_per_second(cli_out))
            same = _same_tensors(app_out / "pytorch_lora_weights.safetensors", cli_out / "pytorch_lora_weights.safetensors")
            print(f"round {i + 1}: app {app_rates[-1]:.2f} steps/s, CLI {cli_rates[-1]:.2f} steps/s, "
                  f"identical LoRA: {same}", flush=True)
    ratio = statistics.mean(app_rates) / statistics.mean(cli_rates)
    print(f"app / CLI steps/s: {ratio:.2f} ({args.steps} steps of the embedded model, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
