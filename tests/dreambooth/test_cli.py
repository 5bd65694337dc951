"""train_dreambooth.py as a user runs it: flags, errors, Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


from adaprelora_diffusion.dreambooth.config import TrainConfig, build_parser, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_field_is_a_flag_with_diffusers_names():
    flags = {a.dest for a in build_parser()._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "rank", "learning_rate",
                 "max_train_steps", "checkpointing_steps", "resume_from_checkpoint", "mixed_precision", "output_dir",
                 "resolution", "train_batch_size", "seed", "lr_scheduler", "with_prior_preservation", "class_prompt"):
        assert name in flags


def test_flags_parse_into_the_config():
    cfg = parse_config(["--rank", "8", "--train_text_encoder", "--adaprelora_clip_threshold", "0", "--max_grad_norm", "-1",
                        "--learning_rate", "3e-4"])
    assert cfg.rank == 8 and cfg.train_text_encoder and cfg.learning_rate == 3e-4
    assert cfg.adaprelora_clip_threshold is None and cfg.max_grad_norm is None


def test_a_config_prints_as_the_command_line_that_builds_it_again():
    from adaprelora_diffusion.dreambooth.config import command_line

    config = TrainConfig(pretrained_model_name_or_path="my sd", instance_prompt="a photo of sks dog", rank=8,
                         learning_rate=3e-4, train_text_encoder=True, adaprelora_clip_threshold=None, max_grad_norm=None,
                         adaprelora_stats="exact", adaprelora_eps=1e-20, skip_initial_validation=True)
    argv = command_line(config)
    assert parse_config(argv) == config
    assert "--seed" not in argv and "--optimizer" not in argv  # defaults are left out
    assert argv[argv.index("--adaprelora_clip_threshold") + 1] == "0"  # off, as the flag spells it
    assert command_line(TrainConfig()) == []


def test_adaprelora_flags_reach_the_optimizer_and_adam_flags_its_adamw_group():
    from adaprelora_diffusion.optim import optimizer_kwargs

    cfg = parse_config(["--adaprelora_beta1", "0.5", "--adaprelora_beta2_decay", "-0.8", "--adaprelora_scale_parameter",
                        "--adaprelora_eps", "1e-20", "--adam_beta1", "0.7"])
    kwargs = optimizer_kwargs("adaprelora", cfg.optimizer_settings())
    assert kwargs["betas"] == (0.5, 0.999) and kwargs["adamw_betas"] == (0.7, 0.999)
    assert kwargs["beta2_decay"] == -0.8 and kwargs["scale_parameter"] is True and kwargs["eps"] == 1e-20
    defaults = optimizer_kwargs("adaprelora", parse_config([]).optimizer_settings())
    assert defaults["betas"] == (0.0, 0.999) and defaults["beta2_decay"] is None  # momentum-free, fixed beta2
    assert parse_config(["--adaprelora_beta2_decay", "0"]).adaprelora_beta2_decay is None  # 0 turns the schedule off


@pytest.mark.parametrize("flags, named", [
    (["--adaprelora_beta1", "1.5"], "--adaprelora_beta1 must be in [0, 1)"),
    (["--adaprelora_beta2", "-0.1"], "--adaprelora_beta2 must be in [0, 1)"),
    (["--adaprelora_beta2_decay", "0.5"], "--adaprelora_beta2_decay must be in [-1, 0)"),
    (["--adaprelora_eps", "-1"], "--adaprelora_eps must be a number > 0"),
])
def test_bad_adaprelora_flags_are_named_before_anything_loads(flags, named):
    with pytest.raises(ValueError) as err:
        parse_config(["--instance_data_dir", "x", *flags]).validate()
    assert named in str(err.value)


def env_for(tiny_pipeline_dir):
    return {**os.environ, "ADAPRELORA_CACHE": str(tiny_pipeline_dir.parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_bad_flags_exit_with_a_message(tmp_path, tiny_pipeline_dir):
    done = subprocess.run([sys.executable, "train_dreambooth.py", "--resolution", "100", "--output_dir", str(tmp_path)],
                          cwd=ROOT, env=env_for(tiny_pipeline_dir), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "multiple of 8" in done.stderr


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train_dreambooth.py", "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
                             "--output_dir", str(out), "--report_to", "none",
                             "--num_validation_images", "0", "--max_train_steps", "100000", "--checkpointing_steps", "100000"],
                            cwd=ROOT, env=env_for(tiny_pipeline_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "training_config.json").exists():
        time.sleep(0.5)
    time.sleep(3)  # let a few steps run
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "training_state.json").is_file()  # the stop's own checkpoint
    assert int(checkpoints[0].name.split("-")[1]) >= 1
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "stopped early" in stdout


def test_sigterm_checkpoints_exits_143_and_the_resumed_run_is_bit_identical(tmp_path, tiny_pipeline_dir):
    from safetensors.torch import load_file

    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--report_to", "none", "--num_validation_images", "0",
              "--checkpointing_steps", "100000"]
    out = tmp_path / "preempted"
    cmd = [sys.executable, "train_dreambooth.py", *common, "--output_dir", str(out)]
    # long by construction (no machine finishes 100000 steps before the signal); the resume and the
    # reference then stop a few steps past the preemption (a constant lr: the budget changes nothing else)
    proc = subprocess.Popen(cmd + ["--max_train_steps", "100000"], cwd=ROOT, env=env_for(tiny_pipeline_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "training_config.json").exists():
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM: stopping after this step" in stderr and "Traceback" not in stderr
    (checkpoint,) = out.glob("checkpoint-*")
    preempted_at = int(checkpoint.name.split("-")[1])
    assert preempted_at > 0
    budget = ["--max_train_steps", str(preempted_at + 5)]
    resumed = subprocess.run(cmd + budget + ["--resume_from_checkpoint", "latest"], cwd=ROOT, env=env_for(tiny_pipeline_dir),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = subprocess.run([sys.executable, "train_dreambooth.py", *common, *budget, "--output_dir", str(tmp_path / "ref")],
                               cwd=ROOT, env=env_for(tiny_pipeline_dir), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    a = load_file(str(out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_errors_are_one_line_without_debug(tmp_path, tiny_pipeline_dir):
    args = [sys.executable, "train_dreambooth.py", "--pretrained_model_name_or_path", str(tmp_path / "no" / "such" / "model"),
            "--output_dir", str(tmp_path / "o")]
    done = subprocess.run(args, cwd=ROOT, env=env_for(tiny_pipeline_dir), capture_output=True, text=True, timeout=120)
    # a wrong model path is bad input, refused before training: exit 2 (engine/command.py), as in every command
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_diverging_lr_on_the_demo_model_ends_with_an_error_naming_it(tmp_path, tiny_pipeline_dir):
    """lr 100 on the embedded demo model: AdaPreLoRA's factors collapse (B·A = 0), the divergence check
    (engine/divergence.py) stops the run at its first verdict (step 200) instead of reporting "done"."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "train_dreambooth.py", "--learning_rate", "100", "--max_train_steps", "230",
                           "--checkpointing_steps", "150", "--num_validation_images", "0", "--report_to", "none",
                           "--output_dir", str(out)], cwd=ROOT, env=env_for(tiny_pipeline_dir), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged by step 200") and "--learning_rate 100 is too high: try 10" in last
    assert "Traceback" not in done.stderr and not (out / "pytorch_lora_weights.safetensors").exists()
    assert [p.name for p in out.glob("*checkpoint-*")] == ["diverged-checkpoint-150"]  # latest finds none
