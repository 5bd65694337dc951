import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from adaprelora_diffusion.dreambooth.model_loading import load_pipeline_components, model_defaults, resolve_model_source


def copy_pipeline(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_none_means_the_shipped_pretrained_tiny_model_with_a_warning(caplog):
    from adaprelora_diffusion.demo.pretrained_tiny import SHIPPED_DIR

    with caplog.at_level(logging.WARNING, logger="adaprelora_diffusion.dreambooth.model_loading"):
        c = load_pipeline_components(None)
    assert c.kind == "folder" and c.base_model_version == "sd_v1"  # the shipped descriptor says so
    assert c.source == str(SHIPPED_DIR)
    assert any("pretrained on procedural shapes" in r.getMessage() for r in caplog.records)
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.text_encoder, CLIPTextModel)
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size
    assert c.unet.dtype == torch.float32


def test_random_tiny_folder_named_explicitly_gets_its_descriptors_defaults(tiny_pipeline_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="adaprelora_diffusion.dreambooth.model_loading"):
        c = load_pipeline_components(tiny_pipeline_dir)
    assert c.kind == "folder" and c.source == str(tiny_pipeline_dir)
    defaults = model_defaults(tiny_pipeline_dir)
    assert defaults["resolution"] == 64 and Path(defaults["instance_data_dir"]).is_dir()
    assert any("tiny random-weight" in r.getMessage() and "smoke" in r.getMessage() for r in caplog.records)


def test_folder_loads_components_and_ddpm_from_its_scheduler_config(tmp_path, tiny_pipeline_dir, caplog):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "plain")
    for marker in [*folder.glob(".adaprelora_*"), *folder.glob("adaprelora_*.json")]:
        marker.unlink()  # an ordinary diffusers folder, not one of the embedded tiny pipelines
    with caplog.at_level(logging.WARNING, logger="adaprelora_diffusion.dreambooth.model_loading"):
        c = load_pipeline_components(folder)
    assert c.kind == "folder" and c.base_model_version is None and model_defaults(folder) == {}
    assert not any("Using the tiny" in r.getMessage() for r in caplog.records)
    # The pipeline ships a DDIM sampler; training gets DDPM with the same noise schedule.
    sampler = json.loads((tiny_pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sampler["_class_name"] != "DDPMScheduler"
    assert isinstance(c.noise_scheduler, DDPMScheduler)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert c.noise_scheduler.config[key] == sampler.get(key, c.noise_scheduler.config[key]), key
    ref = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(c, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_prediction_type_follows_the_model(tmp_path, tiny_pipeline_dir):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "vpred")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    assert load_pipeline_components(str(folder)).noise_scheduler.config.prediction_type == "v_prediction"


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope does not exist .*not a Hub id"):
        load_pipeline_components(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"Checkpoint file .*model\.safetensors does not exist"):
        load_pipeline_components(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="Empty model path"):
        load_pipeline_components("  ")


def test_folder_without_model_index(tmp_path, tiny_pipeline_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a diffusers pipeline folder: it has no model_index\.json"):
        load_pipeline_components(tmp_path / "empty")
    # Pointing at a sub-model folder gets a hint to go one level up.
    with pytest.raises(ValueError, match=r"pass the pipeline's root folder"):
        load_pipeline_components(tiny_pipeline_dir / "unet")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "sd15.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"pass that file's path"):
        load_pipeline_components(tmp_path / "ckpts")


def test_incomplete_folder_names_missing_parts(tmp_path, tiny_pipeline_dir):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "broken")
    shutil.rmtree(folder / "unet")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match=r"broken is an incomplete .*missing unet/config\.json, scheduler/scheduler_config\.json"):
        load_pipeline_components(folder)


def test_incomplete_sdxl_transformer_and_non_clip_folders_are_refused(tmp_path, tiny_pipeline_dir):
    sdxl = copy_pipeline(tiny_pipeline_dir, tmp_path / "sdxl")
    index = json.loads((sdxl / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    index["_class_name"] = "StableDiffusionXLPipeline"
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing text_encoder_2/config.json, tokenizer_2/tokenizer.json"):
        load_pipeline_components(sdxl)

    dit = copy_pipeline(tiny_pipeline_dir, tmp_path / "dit")
    index = json.loads((dit / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    index["_class_name"] = "StableDiffusion3Pipeline"
    (dit / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline pipeline .no UNet.; this trainer supports Stable Diffusion 1.x/2.x and SDXL"):
        load_pipeline_components(dit)

    other = copy_pipeline(tiny_pipeline_dir, tmp_path / "t5")
    cfg = json.loads((other / "text_encoder" / "config.json").read_text())
    cfg["architectures"] = ["T5EncoderModel"]
    (other / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="T5EncoderModel.*expects a CLIPTextModel"):
        load_pipeline_components(other)

    bad_json = copy_pipeline(tiny_pipeline_dir, tmp_path / "badjson")
    (bad_json / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_pipeline_components(bad_json)


def test_wrong_file_type_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin is a file but not a \.safetensors or \.ckpt checkpoint"):
        load_pipeline_components(f)


def test_routing_of_names():
    assert resolve_model_source("stable-diffusion-v1-5/stable-diffusion-v1-5") == ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert resolve_model_source("https://example.org/m/sd15.safetensors") == ("single_file", "https://example.org/m/sd15.safetensors")
    with pytest.raises(ValueError, match="URL"):
        resolve_model_source("https://example.org/m/repo")
    with pytest.raises(ValueError, match="not a Hub id"):
        resolve_model_source("./relative/missing")


def _redirect_loaders(monkeypatch, folder, calls, overrides=None):
    """Make every from_pretrained used by models.py record its call and load from ``folder``."""
    from transformers import CLIPTokenizer

    for cls in (CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPMScheduler):
        real = cls.from_pretrained.__func__

        def spy(klass, name, _real=real, **kw):
            calls.append((klass.__name__, name, kw))
            if overrides and klass.__name__ in overrides:
                return overrides[klass.__name__]
            extra = {"output_loading_info": kw["output_loading_info"]} if "output_loading_info" in kw else {}
            return _real(klass, str(folder), subfolder=kw["subfolder"], **extra)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    from adaprelora_diffusion.dreambooth import model_loading

    real_index = model_loading.read_model_index
    monkeypatch.setattr(model_loading, "read_model_index", lambda name, **kw: real_index(str(folder)))


def test_hub_id_goes_through_from_pretrained_per_subfolder(tiny_pipeline_dir, monkeypatch):
    calls = []
    _redirect_loaders(monkeypatch, tiny_pipeline_dir, calls)
    c = load_pipeline_components("owner/model", revision="abc123", variant="fp16")
    assert c.kind == "hub" and c.source == "owner/model" and isinstance(c.unet, UNet2DConditionModel)
    by_class = {cls: (name, kw) for cls, name, kw in calls}
    assert set(by_class) == {"CLIPTokenizer", "CLIPTextModel", "AutoencoderKL", "UNet2DConditionModel", "DDPMScheduler"}
    weights = {"revision": "abc123", "variant": "fp16", "output_loading_info": True}
    assert by_class["UNet2DConditionModel"] == ("owner/model", {"subfolder": "unet", **weights})
    assert by_class["AutoencoderKL"] == ("owner/model", {"subfolder": "vae", **weights})
    assert by_class["CLIPTextModel"][1] == {"subfolder": "text_encoder", **weights}
    # Tokenizer and scheduler have no weight variants.
    assert by_class["CLIPTokenizer"][1] == {"subfolder": "tokenizer", "revision": "abc123"}
    assert by_class["DDPMScheduler"][1] == {"subfolder": "scheduler", "revision": "abc123"}


def test_hub_failure_names_the_component(monkeypatch):
    # Offline (conftest): the Hub cannot be reached, and the error says which part failed.
    with pytest.raises(OSError, match=r"Could not load the \w+ of owner/model"):
        load_pipeline_components("owner/model")


def test_silently_empty_tokenizer_is_caught(tiny_pipeline_dir, monkeypatch):
    from transformers import CLIPTokenizer

    # What transformers 5 returns when the tokenizer files are missing, instead of an error:
    empty = CLIPTokenizer.from_pretrained(str(tiny_pipeline_dir), subfolder="unet")
    assert len(empty) <= 3
    _redirect_loaders(monkeypatch, tiny_pipeline_dir, [], overrides={"CLIPTokenizer": empty})
    with pytest.raises(ValueError, match=r"tokenizer of owner/model has only \d tokens: its tokenizer files are missing"):
        load_pipeline_components("owner/model")


def test_tokenizer_from_another_model_is_caught(tmp_path, tiny_pipeline_dir):
    from transformers import CLIPTokenizer

    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "mismatch")
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    n_embeddings = len(tok)
    tok.add_tokens([f"<extra{i}>" for i in range(5)])  # ids the text encoder has no embedding for
    tok.save_pretrained(str(folder / "tokenizer"))
    with pytest.raises(ValueError, match=rf"tokenizer of .*mismatch has {n_embeddings + 5} tokens but the text encoder only {n_embeddings}"):
        load_pipeline_components(folder)


def test_missing_tokenizer_files_in_folder(tmp_path, tiny_pipeline_dir):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "notok")
    for f in ("tokenizer.json", "vocab.json"):
        (folder / "tokenizer" / f).unlink()
    with pytest.raises(ValueError, match=r"missing tokenizer/tokenizer\.json \(or tokenizer/vocab\.json \+ merges\.txt\)"):
        load_pipeline_components(folder)


def test_unset_max_length_is_capped_to_text_positions(tmp_path, tiny_pipeline_dir):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "nolen")
    cfg_path = folder / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("model_max_length", None)
    cfg_path.write_text(json.dumps(cfg))
    assert load_pipeline_components(folder).tokenizer.model_max_length == 77


def test_missing_variant_error_names_component(tiny_pipeline_dir):
    with pytest.raises(OSError, match=r"Could not load the text_encoder of .*tiny-sd"):
        load_pipeline_components(tiny_pipeline_dir, variant="fp16")


def test_single_file_routes_to_from_single_file(tmp_path, tiny_pipeline_dir, monkeypatch):
    seen = []
    tiny = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))

    def fake(cls, path, **kwargs):
        seen.append((path, kwargs))
        return tiny

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(fake))
    from safetensors.torch import save_file

    for name in ("model.safetensors", "model.CKPT"):
        ckpt = tmp_path / name
        save_file({"w": torch.zeros(2)}, str(ckpt)) if name.endswith(".safetensors") else ckpt.write_bytes(b"weights")
        c = load_pipeline_components(ckpt, single_file_config=tiny_pipeline_dir)
        assert c.kind == "single_file" and c.source == str(ckpt)
        assert c.unet is tiny.unet and c.tokenizer is tiny.tokenizer
        assert isinstance(c.noise_scheduler, DDPMScheduler)
        assert c.noise_scheduler.config.beta_schedule == tiny.scheduler.config.beta_schedule
    assert seen == [(str(tmp_path / n), {"config": str(tiny_pipeline_dir)}) for n in ("model.safetensors", "model.CKPT")]


def test_single_file_errors_are_wrapped(tmp_path, tiny_pipeline_dir):
    from safetensors.torch import save_file

    bogus = tmp_path / "bogus.safetensors"
    save_file({"not_sd": torch.zeros(2)}, str(bogus))
    # Real diffusers call: with a local config it gets as far as looking for the weights.
    with pytest.raises(ValueError, match=r"Could not load the single-file checkpoint .*bogus\.safetensors"):
        load_pipeline_components(bogus, single_file_config=tiny_pipeline_dir)
    # Offline without a config it cannot fetch the default configs: the message says what to do.
    with pytest.raises(ValueError, match="single_file_config=<local diffusers SD folder"):
        load_pipeline_components(bogus)


# ------------------------------------------------------------------ weights missing from a checkpoint

def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file(edit(tensors), str(path), metadata={"format": "pt"})
    return tensors


def test_text_encoder_with_missing_weights_is_an_error(tmp_path, tiny_pipeline_dir):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "truncated")
    te_file = folder / "text_encoder" / "model.safetensors"
    _rewrite_weights(te_file, lambda t: {k: v for k, v in t.items() if "layers.1." not in k})
    with pytest.raises(ValueError) as info:
        load_pipeline_components(folder)
    message = str(info.value)
    assert f"The text_encoder of {folder} lacks 16 weight(s)" in message
    assert "encoder.layers.1." in message and "and 11 more" in message  # a few names, not all
    assert "randomly initialised" in message
    assert "another version of transformers/diffusers" in message and "pip install -c constraints.txt -e ." in message
    assert "truncated or mismatched weights file" in message
    assert "names the model does not use" not in message  # nothing was renamed here


def test_text_encoder_saved_under_other_key_names_is_an_error(tmp_path, tiny_pipeline_dir):
    # As transformers 4.x sees a CLIP text encoder saved by transformers 5 (or any other renaming):
    # every weight is "missing" and every tensor in the file "unexpected".
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "renamed")
    te = CLIPTextModel.from_pretrained(str(tiny_pipeline_dir), subfolder="text_encoder")
    te.save_pretrained(str(folder / "text_encoder"))
    original = _rewrite_weights(folder / "text_encoder" / "model.safetensors",
                                lambda t: {"clip_text." + k: v for k, v in t.items()})
    with pytest.raises(ValueError, match=rf"text_encoder of .*renamed lacks {len(original)} weight\(s\)") as info:
        load_pipeline_components(folder)
    assert f"The file holds {len(original)} weight(s) under names the model does not use (e.g. clip_text." in str(info.value)


def test_canonical_clip_key_names_still_load(tmp_path, tiny_pipeline_dir):
    # SD checkpoints spell text-encoder keys "text_model.encoder...": transformers 5 maps them, nothing is missing.
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "prefixed")
    _rewrite_weights(folder / "text_encoder" / "model.safetensors", lambda t: {"text_model." + k: v for k, v in t.items()})
    c = load_pipeline_components(folder)
    ref = CLIPTextModel.from_pretrained(str(tiny_pipeline_dir), subfolder="text_encoder").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in c.text_encoder.state_dict().items())


@pytest.mark.parametrize("component, weights_file", [("unet", "diffusion_pytorch_model.safetensors"),
                                                     ("vae", "diffusion_pytorch_model.safetensors")])
def test_diffusers_models_with_missing_weights_are_an_error(tmp_path, tiny_pipeline_dir, component, weights_file):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / component)
    dropped = []

    def drop_one(tensors):
        dropped.append(sorted(tensors)[0])
        return {k: v for k, v in tensors.items() if k != dropped[0]}

    _rewrite_weights(folder / component / weights_file, drop_one)
    with pytest.raises(ValueError, match=rf"The {component} of .* lacks 1 weight\(s\) the model needs \({dropped[0]}\)"):
        load_pipeline_components(folder)


def test_truncated_single_file_is_named_as_damaged_not_blamed_on_configs(tmp_path, tiny_pipeline_dir):
    import zipfile

    from safetensors.torch import save_file

    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(ckpt))
    ckpt.write_bytes(ckpt.read_bytes()[:-500])
    zipped = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, zipped)
    assert zipfile.is_zipfile(zipped)
    zipped.write_bytes(zipped.read_bytes()[:-100])
    for path in (ckpt, zipped):
        with pytest.raises(ValueError, match="damaged or truncated") as info:
            load_pipeline_components(path)
        assert "single_file_config" not in str(info.value)


def test_truncated_unet_file_is_a_one_line_error(tmp_path, tiny_pipeline_dir):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "cut")
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises((ValueError, OSError), match=r"unet of .*cut"):
        load_pipeline_components(folder)
