"""Two CPU processes (torchrun, gloo) run `adaprelora-llm sft` like one process with the same global batch,
with DDP and with FSDP2: the hook statistics are all-reduced, so AdaPreLoRA steps every rank alike."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaprelora_diffusion.engine.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def launch(cmd, env):
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


COMMON = ["sft", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "3", "--lora_r", "4",
          "--lora_target_modules", "all-linear", "--learning_rate", "1e-2", "--lora_dropout", "0",
          "--lr_scheduler_type", "constant"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "text.jsonl"
    words = "cat dog bird fish cow horse robot sun".split()
    data.write_text("".join(json.dumps({"text": f"the {w} is big and the dog is small ."}) + "\n" for w in words))
    return data


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama_dir, text_data):
    """The adapter of one process with the global batch (2 rows per step)."""
    out = tmp_path_factory.mktemp("one")
    launch([sys.executable, "-m", "adaprelora_diffusion.llm", *COMMON, "--model_name_or_path", str(tiny_llama_dir),
            "--dataset_path", str(text_data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--save_strategy", "no"], env())
    return load_file(out / "adapter_model.safetensors")


def two_processes(out, model, data, *extra, script=("-m", "adaprelora_diffusion.llm")):
    """``adaprelora-llm`` under torchrun, 2 CPU processes (gloo), 1 row each per step; returns its output."""
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), *script, *COMMON, "--model_name_or_path", str(model), "--dataset_path", str(data),
                   "--output_dir", str(out), "--per_device_train_batch_size", "1", "--ddp_backend", "gloo", *extra], env())


def assert_same_adapter(one, two):
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any("lora_B" in k and one[k].abs().sum() > 0 for k in one)  # trained LoRAs, not two zero inits


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama_dir, text_data, one_process):
    two_processes(tmp_path / "two", tiny_llama_dir, text_data, "--save_strategy", "no")
    assert_same_adapter(one_process, load_file(tmp_path / "two" / "adapter_model.safetensors"))


def test_fsdp2_shards_the_base_model_and_matches_one_process(tmp_path, tiny_llama_dir, text_data, one_process):
    """FSDP2 through accelerate's plugin (fsdp_version 2): the base model is sharded, the LoRA factors are
    kept whole on every rank and their gradients averaged, so 2 processes step like 1. tests/llm/cpu_fsdp.py
    lets accelerate keep FSDP on CPU processes (it offers FSDP only for GPUs); the rest is the shipped path."""
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"version": 2}))  # docs/llm.md's recipe: wraps the model's decoder layers
    out = tmp_path / "fsdp"
    log = two_processes(out, tiny_llama_dir, text_data, "--fsdp", "--fsdp_config", str(config),
                        "--save_steps", "3", script=(str(ROOT / "tests" / "llm" / "cpu_fsdp.py"),))
    assert "FSDP2: 28 trainable parameters (" in log and "kept whole on every rank" in log
    assert (out / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP checkpoint path ran
    assert_same_adapter(one_process, load_file(out / "adapter_model.safetensors"))
