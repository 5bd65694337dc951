"""Faults injected for real into the DreamBooth trainer: each ends with a message and loses nothing."""

import json
import logging
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file

import adaprelora_diffusion.dreambooth.trainer as trainer
from adaprelora_diffusion.demo import pretrained_tiny
from adaprelora_diffusion.demo.descriptor import DEMO_SUBJECT_DIR
from adaprelora_diffusion.dreambooth import diffusion_loss
from adaprelora_diffusion.dreambooth.config import TrainConfig
from adaprelora_diffusion.dreambooth.data import DataWarning
from adaprelora_diffusion.dreambooth.trainer import TrainingError, train
from adaprelora_diffusion.engine.checkpoints import list_checkpoints, verify_checkpoint

from .runs import config, tiny_default  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("tiny_default")


def png_bomb(path, side=30000):
    """A real PNG whose header declares side x side 1-bit pixels (about 110 KB on disk)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_skipped_and_named(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(DEMO_SUBJECT_DIR.glob("*.png"))[:2]:
        (photos / p.name).write_bytes(p.read_bytes())
    png_bomb(photos / "huge.png")
    with pytest.warns(DataWarning, match=r"huge\.png \(too many pixels"):
        result = train(config(tmp_path, instance_data_dir=str(photos), instance_prompt="a photo of sks robot", max_train_steps=2))
    assert result.global_step == 2


def test_bad_data_fails_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        train(config(tmp_path, instance_data_dir=str(empty), instance_prompt="x"))
    assert not (tmp_path / "out").exists()
    train(config(tmp_path, max_train_steps=1))  # the same folder is not "held by another run"


def test_diverged_steps_write_no_checkpoint_and_a_resume_applies_the_new_lr(tmp_path, monkeypatch):
    real = diffusion_loss.denoising_loss
    calls = {"n": 0}

    def nan_after_two(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(diffusion_loss, "denoising_loss", nan_after_two)
    with pytest.raises(TrainingError, match="3 steps in a row"):
        train(config(tmp_path, max_train_steps=8, checkpointing_steps=1, max_consecutive_nonfinite=3, learning_rate=100.0))
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]  # none from skipped steps
    monkeypatch.setattr(diffusion_loss, "denoising_loss", real)
    seen = {}
    result = train(config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", learning_rate=1e-4),
                   on_step=lambda step, models, opt: seen.setdefault(step, [g["lr"] for g in opt.param_groups]))
    assert result.global_step == 4 and set(seen[3]) == {1e-4}  # the new lr is the one applied
    assert json.loads((out / trainer.RUN_CONFIG_NAME).read_text())["learning_rate"] == 1e-4


def test_resume_refuses_a_changed_rank(tmp_path):
    train(config(tmp_path, max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(TrainingError, match=r"--rank 4 -> 8"):
        train(config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", rank=8))


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    hold = ("import sys, time; from adaprelora_diffusion.engine.lock import OutputLock; "
            "lock = OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=f"in use by another run \\(pid {proc.pid}"):
            train(config(tmp_path, resume_from_checkpoint="latest"))
        assert sorted(p.name for p in out.iterdir()) == [".adaprelora.lock"]  # nothing written
    finally:
        proc.kill()
        proc.wait()


def test_full_disk_at_the_final_save_keeps_the_trained_state_in_a_checkpoint(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    real = trainer.save_lora_weights
    monkeypatch.setattr(trainer, "save_lora_weights", full)
    with pytest.raises(TrainingError, match=r"No space left on device.*checkpoint-3.*--resume_from_checkpoint latest"):
        train(config(tmp_path, max_train_steps=3))
    out = tmp_path / "out"
    verify_checkpoint(out / "checkpoint-3")
    monkeypatch.setattr(trainer, "save_lora_weights", real)
    result = train(config(tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))  # the export
    saved = load_file(str(out / "checkpoint-3" / "lora_params.safetensors"))
    assert result.global_step == 3 and result.lora_path.is_file()
    assert any(torch.count_nonzero(v) for k, v in saved.items() if "lora_B" in k)


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    train(config(tmp_path, max_train_steps=4, checkpointing_steps=2))
    out = tmp_path / "out"
    damaged = out / "checkpoint-4" / "lora_params.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        result = train(config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest"))
    assert "lora_params.safetensors" in caplog.text and result.global_step == 4
    with pytest.raises(TrainingError, match="lora_params.safetensors"):
        train(config(tmp_path, max_train_steps=6, resume_from_checkpoint=str(out / "checkpoint-4")))


def test_long_captions_are_named(tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    src = sorted(DEMO_SUBJECT_DIR.glob("*.png"))[0]
    (photos / "a.png").write_bytes(src.read_bytes())
    (photos / "a.txt").write_text("robot " * 200)
    with caplog.at_level(logging.WARNING):
        train(config(tmp_path, instance_data_dir=str(photos), instance_prompt="a photo of sks robot", max_train_steps=1))
    assert "a.png" in caplog.text and "will be cut" in caplog.text


def test_a_stopped_runs_card_tells_the_steps_it_trained(tmp_path):
    stops = iter([False, True])
    result = train(config(tmp_path, max_train_steps=50, num_validation_images=1, num_validation_inference_steps=1),
                   should_stop=lambda: next(stops, True))
    card = (tmp_path / "out" / "README.md").read_text()
    assert result.stopped_early and result.global_step == 2
    assert "| steps_trained | 2 |" in card and "step-000000" not in card
