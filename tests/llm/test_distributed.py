"""Two CPU processes (torchrun, gloo) run `adaprelora-llm sft` like one process with the same global batch:
the hook statistics are all-reduced, so AdaPreLoRA steps every rank alike."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from adaprelora_diffusion.engine.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def launch(cmd, env):
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama_dir):
    data = tmp_path / "text.jsonl"
    words = "cat dog bird fish cow horse robot sun".split()
    data.write_text("".join(json.dumps({"text": f"the {w} is big and the dog is small ."}) + "\n" for w in words))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    common = ["sft", "--model_name_or_path", str(tiny_llama_dir), "--dataset_path", str(data), "--use_cpu",
              "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "3", "--lora_r", "4",
              "--lora_target_modules", "all-linear", "--learning_rate", "1e-2", "--lora_dropout", "0",
              "--lr_scheduler_type", "constant", "--save_strategy", "no"]
    launch([sys.executable, "-m", "adaprelora_diffusion.llm", *common, "--output_dir", str(tmp_path / "one"),
            "--per_device_train_batch_size", "2"], env)
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "adaprelora_diffusion.llm", *common, "--output_dir", str(tmp_path / "two"),
            "--per_device_train_batch_size", "1", "--ddp_backend", "gloo"], env)
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any("lora_B" in k and one[k].abs().sum() > 0 for k in one)  # trained LoRAs, not two zero inits
