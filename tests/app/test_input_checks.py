"""Settings, model choices and photo sets are checked before a job exists, each refusal naming the fix."""

from __future__ import annotations

import pytest
from PIL import Image

from app.errors import AppError
from app.models import DEFAULT_MODEL, model_choices, resolve_model
from app.presets import preset_values
from app.settings import parse_settings
from app.uploads import UploadLimits, check_image_set, store_images

from .conftest import demo_images


def test_settings_use_the_trainer_flag_names_and_fill_the_app_defaults(tiny_model_dir):
    parsed = parse_settings({"pretrained_model_name_or_path": "tiny-sd", "rank": 8, "learning_rate": 3e-4,
                             "max_train_steps": 20, "trigger_word": "zwx", "class_word": "dog"}, [tiny_model_dir])
    assert parsed.train["rank"] == 8 and parsed.train["learning_rate"] == 3e-4 and parsed.train["max_train_steps"] == 20
    assert parsed.train["pretrained_model_name_or_path"] == str(tiny_model_dir / "tiny-sd")
    assert parsed.train["instance_prompt"] == "a photo of zwx dog" and parsed.name == "zwx dog"
    assert parsed.train["checkpointing_steps"] == 5 and parsed.train["output_kohya_format"] is True
    assert parsed.resolution == 64  # the tiny model's own recommendation


def test_presets_scale_the_models_recommended_steps_and_lr(tiny_model_dir):
    real = preset_values("person", {})
    assert (real["max_train_steps"], real["learning_rate"], real["with_prior_preservation"], real["train_text_encoder"]) == \
        (800, 5e-5, True, True)
    demo = parse_settings({"preset": "style"}, [tiny_model_dir])  # the embedded model recommends 400 steps at 3e-3
    assert demo.train["max_train_steps"] == 800 and demo.train["learning_rate"] == 3e-3
    assert demo.train["instance_prompt"] == "an image in the style of sks"
    person = parse_settings({"preset": "person"}, [tiny_model_dir])
    assert person.train["class_prompt"] == "a photo of a person" and person.train["with_prior_preservation"]


@pytest.mark.parametrize("settings, message", [
    ({"rnak": 4}, r"Unknown settings \['rnak'\]: use the trainer's flag names"),
    ({"output_dir": "/tmp/x"}, r"\['output_dir'\] are chosen by the app"),
    ({"instance_data_dir": "/etc"}, r"are chosen by the app"),
    ({"rank": "eight"}, r"settings\['rank'\] must be a whole number, got 'eight'"),
    ({"learning_rate": True}, r"must be a number"),
    ({"train_text_encoder": "yes"}, r"must be true or false"),
    ({"resolution": 100}, r"--resolution 100 must be a positive multiple of 8"),
    ({"optimizer": "sgd"}, r"--optimizer 'sgd' is unknown"),
    ({"preset": "cat"}, r"Unknown preset 'cat'"),
    ({"trigger_word": "two words"}, r"trigger_word.*one word"),
    ({"instance_prompt": "a\nb"}, r"must be one line"),
    ({"captions": ["a"]}, r"must be an object"),
    ("rank=4", r"settings must be an object"),
])
def test_bad_settings_are_refused_with_the_fix(settings, message, tiny_model_dir):
    with pytest.raises(AppError, match=message):
        parse_settings(settings, [tiny_model_dir])


def test_only_models_inside_the_model_folders_or_hub_ids_are_accepted(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model(DEFAULT_MODEL, [tiny_model_dir]) is None and resolve_model("", [tiny_model_dir]) is None
    assert resolve_model("tiny-sd", [tiny_model_dir]) == str(tiny_model_dir / "tiny-sd")
    for outside in ("/etc", "../../etc", str(tiny_model_dir / ".." / "x"), "tiny-sd/../../x"):
        with pytest.raises(AppError, match="neither the embedded default"):
            resolve_model(outside, [tiny_model_dir])
    with pytest.raises(AppError, match="There is no model '.ssh' in the model folders"):  # ~ is not expanded: a name
        resolve_model("~/.ssh", [tiny_model_dir])
    broken = tiny_model_dir / "broken-model"
    broken.mkdir(exist_ok=True)
    with pytest.raises(AppError, match=r"'broken-model' cannot be loaded: .* has no model_index.json"):
        resolve_model("broken-model", [tiny_model_dir])
    (tiny_model_dir / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(AppError, match="damaged or truncated"):
        resolve_model("truncated.safetensors", [tiny_model_dir])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AppError, match="runs offline"):
        resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5", [tiny_model_dir])
    labels = [value for _, value in model_choices([tiny_model_dir])]
    assert labels[0] == DEFAULT_MODEL and str(tiny_model_dir / "tiny-sd") in labels
    assert str(broken) not in labels
    broken.rmdir()
    (tiny_model_dir / "truncated.safetensors").unlink()


def _files(paths):
    return [(p.name, p) for p in paths]


def test_a_photo_set_reports_what_to_fix(tmp_path):
    limits = UploadLimits()
    good = _files(demo_images())
    report = check_image_set(good, 64, limits)
    assert not report.errors and not report.warnings and len(report.usable) == 5

    copy = tmp_path / "again.png"
    copy.write_bytes(demo_images()[0].read_bytes())
    small = tmp_path / "tiny.jpg"
    Image.new("RGB", (32, 40), "blue").save(small)
    text = tmp_path / "notes.webp"
    text.write_text("not an image")
    report = check_image_set(good + _files([copy, small, text]), 64, limits)
    assert report.errors == ["notes.webp: is not a readable image (UnidentifiedImageError); upload jpg, png or webp photos."]
    assert any("again.png is the same picture as bolt_01_front.png" in w for w in report.warnings)
    assert any("tiny.jpg (32x40)" in w and "resolution 64" in w for w in report.warnings)
    assert "**Fix:** notes.webp" in report.as_markdown() and "**Check:** again.png" in report.as_markdown()

    few = check_image_set(good[:2], 64, limits)
    assert any("Only 2 usable photo(s)" in w for w in few.warnings)
    too_many = check_image_set(good * 3, 64, UploadLimits(max_files=10))
    assert "15 files is more than 10" in too_many.errors[0]
    assert any("Two uploads are named" in e for e in check_image_set(good + good[:1], 64, limits).errors)


def test_stored_photos_get_app_made_names_and_caption_files(tmp_path):
    report = check_image_set(_files(demo_images()[:2]), 64, UploadLimits())
    stored = store_images(report, tmp_path / "uploads", {"bolt_02_wave.png": "sks waving"}, "a photo of sks robot")
    assert [s["file"] for s in stored] == ["001_bolt_01_front.png", "002_bolt_02_wave.png"]
    assert (tmp_path / "uploads" / "002_bolt_02_wave.txt").read_text() == "sks waving"
    assert not (tmp_path / "uploads" / "001_bolt_01_front.txt").exists()  # the instance prompt needs no file
    with pytest.raises(AppError, match="names file\\(s\\) that were not uploaded: '\\.\\./x.png'"):
        store_images(report, tmp_path / "other", {"../x.png": "y"}, "p")


def test_an_sdxl_model_gets_sdxl_presets_at_1024_px(tmp_path, tiny_sdxl_pipeline_dir):
    import shutil

    models = tmp_path / "models"
    plain = shutil.copytree(tiny_sdxl_pipeline_dir, models / "my-sdxl")
    (plain / "adaprelora_model.json").unlink()  # an ordinary SDXL folder, not the tiny test model
    parsed = parse_settings({"pretrained_model_name_or_path": "my-sdxl", "preset": "person"}, [models])
    assert parsed.resolution == 1024 and parsed.train["rank"] == 32 and parsed.train["train_text_encoder"]
    assert parsed.train["max_train_steps"] == 800
