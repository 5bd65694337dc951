import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from adaprelora_diffusion.demo import tiny_pipeline as tp


def _weights(folder):
    out = {}
    for sub in ("text_encoder", "unet", "vae"):
        for f in sorted((folder / sub).glob("*.safetensors")):
            for k, v in load_file(str(f)).items():
                out[f"{sub}/{k}"] = v
    return out


def test_loads_through_from_pretrained_and_generates(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    out = pipe("a photo of sks robot", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np")
    img = out.images
    assert img.shape == (1, 64, 64, 3)
    assert np.isfinite(img).all()
    assert img.std() > 0  # not a constant image
    pil = pipe("x", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (64, 64)  # default resolution from unet.sample_size * vae factor


def test_rebuild_gives_identical_weights(tmp_path, tiny_pipeline_dir):
    again = tp.ensure_tiny_pipeline(cache_dir=tmp_path)
    assert again != tiny_pipeline_dir
    a, b = _weights(tiny_pipeline_dir), _weights(again)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ...and the seed actually matters (so the equality above is not vacuous).
    other = tp.build_tiny_pipeline(seed=1)
    w = other.unet.state_dict()
    assert not torch.equal(w["conv_in.weight"], a["unet/conv_in.weight"])


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tp.build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_covers_any_text_and_applies_merges(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    tok = pipe.tokenizer
    assert (tiny_pipeline_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_pipeline_dir / "tokenizer" / "merges.txt").is_file()
    assert tok.model_max_length == 77
    assert pipe.text_encoder.config.vocab_size == len(tok)
    text = "The photo of a sks robot, ünïcode 日本 🤖!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # The unknown token is <|endoftext|>: it must not appear inside the text.
    assert tok.eos_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    assert tok.convert_ids_to_tokens(ids[1]) == "the</w>"  # merges "t h" then "th e</w>"
    padded = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 77)


def test_reuses_complete_folder_and_repairs_incomplete(tmp_path):
    path = tp.ensure_tiny_pipeline(cache_dir=tmp_path)
    unet_weights = next((path / "unet").glob("*.safetensors"))
    stamp = unet_weights.stat().st_mtime_ns
    assert tp.ensure_tiny_pipeline(cache_dir=tmp_path) == path
    assert unet_weights.stat().st_mtime_ns == stamp  # not rewritten

    (path / "unet" / "config.json").unlink()
    assert not tp.is_complete_tiny_pipeline(path)
    assert tp.ensure_tiny_pipeline(cache_dir=tmp_path) == path
    assert tp.is_complete_tiny_pipeline(path)
    # No temp/stale siblings left behind by the atomic rename.
    assert sorted(p.name for p in tmp_path.iterdir()) == [tp.TINY_SUBDIR]


def test_stale_version_is_rebuilt(tmp_path):
    path = tp.ensure_tiny_pipeline(cache_dir=tmp_path)
    marker = path / tp._MARKER
    marker.write_text(json.dumps({"version": "old"}))
    assert not tp.is_complete_tiny_pipeline(path)
    tp.ensure_tiny_pipeline(cache_dir=tmp_path)
    assert json.loads(marker.read_text())["version"] == tp.TINY_PIPELINE_VERSION


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tmp_path / "c"))
    assert tp.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ADAPRELORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tp.default_cache_dir() == tmp_path / ".cache" / "adaprelora_diffusion"
