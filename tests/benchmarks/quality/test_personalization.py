"""T3 on the tiny random pipeline (fast): metric definitions and the run through the real trainer."""

import math

import numpy as np
import pytest
from PIL import Image

from adaprelora_diffusion.demo import demo_subject, scenes
from benchmarks.quality import Config
from benchmarks.quality import personalization as t3
from benchmarks.quality.personalization import Personalization, signature_coverage, subject_score


@pytest.fixture(scope="module")
def task(tiny_pipeline_dir, tmp_path_factory):
    return Personalization(steps=4, eval_every=2, num_heldout_views=2, num_scenes=2, num_timesteps=2, num_samples=2,
                           sample_steps=2, pipeline_dir=tiny_pipeline_dir, work_dir=tmp_path_factory.mktemp("t3"))


def _reference():
    views = [demo_subject.render(demo_subject.random_scene(i), 64) for i in range(6)]
    return {n: float(np.mean([signature_coverage(v)[n][0] for v in views])) for n in t3.SIGNATURE_COLORS}


def test_subject_score_separates_the_robot_from_the_scenes_world():
    ref = _reference()
    robot = [subject_score(demo_subject.render(demo_subject.random_scene(i, seed=1), 64), ref) for i in range(6)]
    world = [subject_score(scenes.scene(i)[0], ref) for i in range(30)]
    assert min(robot) > 0.6 and np.mean(robot) > 0.85
    assert max(world) < 0.2  # the pretraining palette has no orange or teal
    upside_down = demo_subject.render(demo_subject.random_scene(0, seed=1), 64).transpose(Image.FLIP_TOP_BOTTOM)
    assert subject_score(upside_down, ref) < robot[0] - 0.3  # the layout term: head above body


def test_base_model_has_no_drift_and_its_own_heldout_loss(task, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    metrics = task.evaluate(dict(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer))
    assert metrics["class_drift"] == 0.0 and metrics["scene_drift"] == 0.0
    assert metrics["heldout_loss"] == pytest.approx(task.reference["base_heldout_loss"])
    assert task.reference["real_views_fidelity"] > 0.8


def test_a_run_goes_through_the_trainer_and_reports_every_metric(task):
    result = task.run(Config("adamw", "adamw"), 3e-2, seed=0)
    assert not result.diverged and result.eval_steps == [2, 4] and len(result.curve) == 2
    assert len(result.train_loss) == 4 and all(math.isfinite(v) for v in result.train_loss)
    assert set(result.final) == set(task.metrics) and all(math.isfinite(v) for v in result.final.values())
    assert result.final["heldout_loss"] == result.curve[-1] != task.reference["base_heldout_loss"]
    assert result.final["class_drift"] > 0 and 0 <= result.final["fidelity"] <= 1
    assert result.state_bytes > 0 and result.wall_s > 0
    again = task.run(Config("adamw", "adamw"), 3e-2, seed=0)
    assert again.final == result.final  # same seed, same run
    assert not list(task.work.glob("run-*")), "run folders are removed"


def test_optimizer_variants_map_to_trainer_flags(task, tmp_path):
    kwargs = {"stats": "exact", "balance": 0.0, "betas": (0.5, 0.99), "beta2_decay": -0.8, "eps": 1e-20, "scale_parameter": True}
    cfg = task.train_config(Config("x", "adaprelora", kwargs), 1e-3, 5, "cosine", tmp_path)
    assert (cfg.adaprelora_stats, cfg.adaprelora_balance, cfg.adaprelora_beta1, cfg.adaprelora_beta2) == ("exact", 0.0, 0.5, 0.99)
    assert (cfg.adaprelora_beta2_decay, cfg.adaprelora_eps, cfg.adaprelora_scale_parameter) == (-0.8, 1e-20, True)
    assert (cfg.adam_beta1, cfg.adam_beta2) == (0.9, 0.999)  # AdaPreLoRA's betas are its own; Adam's stay
    adamw = task.train_config(Config("y", "adamw", {"betas": (0.8, 0.99)}), 1e-3, 5, "cosine", tmp_path)
    assert (adamw.adam_beta1, adamw.adam_beta2) == (0.8, 0.99)
    assert (cfg.learning_rate, cfg.seed, cfg.lr_scheduler, cfg.max_train_steps) == (1e-3, 5, "cosine", 4)
    assert cfg.lora_target_modules == "attention" and cfg.rank == 4
    cfg.validate()
    with pytest.raises(ValueError, match="cannot pass optimizer option 'foo'"):
        task.train_config(Config("x", "adaprelora", {"foo": 1}), 1e-3, 0, "cosine", tmp_path)
    with pytest.raises(ValueError, match="no weight averaging"):
        task.train_config(Config("x", "adaprelora", {}, average=0.9), 1e-3, 0, "cosine", tmp_path)


def test_a_failed_run_is_reported_as_diverged(task, monkeypatch):
    from adaprelora_diffusion.dreambooth import trainer as training

    def explode(*args, **kwargs):
        raise training.TrainingError("5 steps in a row had a non-finite loss")

    monkeypatch.setattr(training, "train", explode)
    result = task.run(Config("adamw", "adamw"), 1e3, seed=0)
    assert result.diverged and result.final["heldout_loss"] == math.inf


def test_prior_preservation_makes_class_images_once_and_trains_with_them(tiny_pipeline_dir, tmp_path):
    kw = dict(steps=2, eval_every=2, num_heldout_views=1, num_scenes=1, num_timesteps=1, num_samples=1, sample_steps=2,
              num_class_images=2, pipeline_dir=tiny_pipeline_dir, work_dir=tmp_path)
    task = Personalization(prior_preservation=True, **kw)
    assert task.name == "T3-prior" and len(list((tmp_path / "class_images").iterdir())) == 2
    cfg = task.train_config(Config("adamw", "adamw"), 1e-3, 0, "cosine", tmp_path / "o")
    assert cfg.with_prior_preservation and cfg.class_prompt == t3.CLASS_PROMPT and cfg.num_class_images == 2
    assert not task.run(Config("adamw", "adamw"), 1e-2, seed=0).diverged


def test_a_temporary_work_folder_goes_with_the_task(tiny_pipeline_dir):
    import gc

    task = Personalization(steps=1, eval_every=1, num_heldout_views=1, num_scenes=1, num_timesteps=1, num_samples=1,
                           sample_steps=2, pipeline_dir=tiny_pipeline_dir)
    work = task.work
    assert work.is_dir()
    del task
    gc.collect()
    assert not work.exists()
