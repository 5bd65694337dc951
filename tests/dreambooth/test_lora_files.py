"""LoRA files written here must reproduce the in-memory peft model's images after a fresh load."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors.torch import load_file

from adaprelora_diffusion.dreambooth import lora_files
from adaprelora_diffusion.dreambooth.lora_setup import add_text_encoder_lora

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def fresh(path):
    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type="np"):
    out = pipe("a photo of sks robot", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type=output_type)
    return np.asarray(out.images, dtype=np.float32) if output_type == "np" else out.images.numpy()


def lora_pipe(path, unet_targets=UNET_ATTN, te_targets=TE_ATTN, seed=1, unet_kwargs=None, te_kwargs=None):
    """Tiny pipeline with LoRA (rank 4, alpha 8) filled with non-zero random A and B."""
    pipe = fresh(path)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=unet_targets, **(unet_kwargs or {})))
    if te_targets:
        # As the trainer attaches it: through peft, not transformers' add_adapter (and its peft version gate).
        add_text_encoder_lora(pipe.text_encoder, LoraConfig(r=4, lora_alpha=8, target_modules=te_targets, **(te_kwargs or {})))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pipe


@pytest.fixture(scope="module")
def base_image(tiny_pipeline_dir):
    return generate(fresh(tiny_pipeline_dir))


def assert_same_images(pipe_a, pipe_b):
    np.testing.assert_allclose(generate(pipe_a), generate(pipe_b), atol=1e-4, rtol=0)
    # Latents too: decoded images can saturate at 0/1 and hide differences.
    np.testing.assert_allclose(generate(pipe_a, "latent"), generate(pipe_b, "latent"), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ diffusers layout

def test_diffusers_roundtrip_reproduces_images(tmp_path, tiny_pipeline_dir, base_image):
    pipe = lora_pipe(tiny_pipeline_dir)
    ref = generate(pipe)
    assert np.abs(ref - base_image).max() > 0.05  # the LoRA visibly changes the output
    path = lora_files.save_lora_weights(tmp_path / "out", pipe.unet, pipe.text_encoder)
    assert path == tmp_path / "out" / lora_files.LORA_WEIGHT_NAME
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [lora_files.LORA_WEIGHT_NAME]  # no temp leftovers

    loaded = fresh(tiny_pipeline_dir)
    loaded.load_lora_weights(str(tmp_path / "out"))
    assert_same_images(pipe, loaded)

    # The text-encoder half matters: without it the image differs, so it was checked above.
    unet_only = fresh(tiny_pipeline_dir)
    lora_files.save_lora_weights(tmp_path / "unet_only", pipe.unet)
    unet_only.load_lora_weights(str(tmp_path / "unet_only"))
    assert np.abs(generate(unet_only) - ref).max() > 1e-3


def test_diffusers_metadata_records_alpha_and_no_local_path(tmp_path, tiny_pipeline_dir):
    pipe = lora_pipe(tiny_pipeline_dir)
    path = lora_files.save_lora_weights(tmp_path, pipe.unet, pipe.text_encoder)
    meta = json.loads(lora_files.read_safetensors_metadata(path)["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    assert meta["text_encoder.r"] == 4 and meta["text_encoder.lora_alpha"] == 8
    assert sorted(meta["unet.target_modules"]) == sorted(UNET_ATTN)
    assert meta["unet.base_model_name_or_path"] is None
    assert str(tiny_pipeline_dir) not in json.dumps(meta)
    keys = load_file(str(path))
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
    # Text-encoder keys use the canonical CLIP spelling, portable across transformers versions.
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys if k.startswith("text_encoder."))

    # Without that metadata diffusers would assume alpha == rank: the image would differ.
    no_meta = fresh(tiny_pipeline_dir)
    no_meta.load_lora_weights(keys)
    assert np.abs(generate(no_meta) - generate(pipe)).max() > 1e-3


def test_diffusers_roundtrip_with_conv_and_mlp_targets(tmp_path, tiny_pipeline_dir):
    # Regression: convert_state_dict_to_diffusers would make this file lose its attention LoRA.
    pipe = lora_pipe(
        tiny_pipeline_dir,
        unet_targets=UNET_ATTN + ["conv1", "conv2", "proj_in", "ff.net.0.proj", "time_emb_proj"],
        te_targets=TE_ATTN + ["fc1", "fc2"],
    )
    lora_files.save_lora_weights(tmp_path, pipe.unet, pipe.text_encoder)
    loaded = fresh(tiny_pipeline_dir)
    loaded.load_lora_weights(str(tmp_path))
    assert_same_images(pipe, loaded)


def test_rank_alpha_patterns_and_rslora_survive(tmp_path, tiny_pipeline_dir):
    pipe = lora_pipe(
        tiny_pipeline_dir,
        unet_kwargs=dict(rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 3}, use_rslora=True),
        te_kwargs=dict(alpha_pattern={"layers.1.self_attn.q_proj": 2}),
    )
    lora_files.save_lora_weights(tmp_path, pipe.unet, pipe.text_encoder)
    loaded = fresh(tiny_pipeline_dir)
    loaded.load_lora_weights(str(tmp_path))
    assert_same_images(pipe, loaded)


def test_load_lora_into_pipeline_accepts_file_or_folder(tmp_path, tiny_pipeline_dir):
    pipe = lora_pipe(tiny_pipeline_dir)
    lora_files.save_lora_weights(tmp_path / "d", pipe.unet, pipe.text_encoder)
    lora_files.save_kohya_lora(tmp_path / "k" / "bolt.safetensors", pipe.unet, pipe.text_encoder)
    for target in (tmp_path / "d", tmp_path / "d" / lora_files.LORA_WEIGHT_NAME, tmp_path / "k" / "bolt.safetensors"):
        loaded = fresh(tiny_pipeline_dir)
        lora_files.load_lora_into_pipeline(loaded, target)
        np.testing.assert_allclose(generate(loaded), generate(pipe), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"No pytorch_lora_weights\.safetensors in .*bolt\.safetensors"):
        lora_files.load_lora_into_pipeline(fresh(tiny_pipeline_dir), tmp_path / "k")
    with pytest.raises(ValueError, match="does not exist"):
        lora_files.load_lora_into_pipeline(fresh(tiny_pipeline_dir), tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ kohya layout

def test_kohya_roundtrip_names_alpha_and_metadata(tmp_path, tiny_pipeline_dir, base_image):
    pipe = lora_pipe(tiny_pipeline_dir)
    path = lora_files.save_kohya_lora(tmp_path / "bolt_kohya.safetensors", pipe.unet, pipe.text_encoder,
                                   training_comment="sks robot", metadata={"ss_seed": "42"})
    tensors = load_file(str(path))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{q}.lora_up.weight"].shape == (32, 4)
    assert float(tensors[f"{q}.alpha"]) == 8.0
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    te = "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    assert float(tensors[f"{te}.alpha"]) == 8.0 and f"{te}.lora_down.weight" in tensors
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)

    meta = lora_files.read_safetensors_metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "bolt_kohya"
    assert meta["ss_training_comment"] == "sks robot" and meta["ss_seed"] == "42"
    assert meta["ss_network_train_unet_only"] == "False"
    assert "ss_network_args" not in meta  # no conv LoRA here

    loaded = fresh(tiny_pipeline_dir)
    loaded.load_lora_weights(str(tmp_path), weight_name="bolt_kohya.safetensors")
    assert_same_images(pipe, loaded)
    assert np.abs(generate(loaded) - base_image).max() > 0.05


def test_kohya_conv_lora_stays_4d_and_roundtrips(tmp_path, tiny_pipeline_dir):
    pipe = lora_pipe(
        tiny_pipeline_dir,
        unet_targets=UNET_ATTN + ["conv1", "conv2", "proj_in", "conv_shortcut", "time_emb_proj", "ff.net.2",
                                  "downsamplers.0.conv", "upsamplers.0.conv"],
        te_targets=TE_ATTN + ["fc1", "fc2"],
    )
    path = lora_files.save_kohya_lora(tmp_path / "conv.safetensors", pipe.unet, pipe.text_encoder)
    tensors = load_file(str(path))
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (64, 4, 1, 1)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].ndim == 4
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in tensors
    meta = lora_files.read_safetensors_metadata(path)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8"}

    loaded = fresh(tiny_pipeline_dir)
    loaded.load_lora_weights(str(tmp_path), weight_name="conv.safetensors")
    assert_same_images(pipe, loaded)


def test_kohya_alpha_over_rank_reproduces_each_peft_delta(tmp_path, tiny_pipeline_dir):
    """Check the file's own semantics, independent of any loader: (alpha/dim) * up @ down == peft's delta."""
    pipe = lora_pipe(
        tiny_pipeline_dir,
        unet_targets=UNET_ATTN + ["conv1"],
        unet_kwargs=dict(rank_pattern={"attn2.to_k": 2, "conv1": 3}, alpha_pattern={"attn1.to_q": 3}, use_rslora=True),
        te_kwargs=dict(alpha_pattern={"layers.1.self_attn.q_proj": 2}),
    )
    tensors = load_file(str(lora_files.save_kohya_lora(tmp_path / "p.safetensors", pipe.unet, pipe.text_encoder)))
    checked = 0
    for prefix, model, path_prefix in (("lora_unet_", pipe.unet, ""), ("lora_te_", pipe.text_encoder, "text_model.")):
        for name, module in model.named_modules():
            if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
                continue
            key = prefix + (path_prefix + name).replace(".", "_")
            down, up, alpha = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"], tensors[f"{key}.alpha"]
            rank = down.shape[0]
            if down.ndim == 4:  # conv: up is (out, r, 1, 1), down is (r, in, kh, kw)
                delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                delta = up @ down
            torch.testing.assert_close(delta * (float(alpha) / rank), module.get_delta_weight("default"))
            checked += 1
    # 7 transformer blocks x 8 projections, 8 resnets (2 down, 2 mid, 4 up), 2 TE layers x 4
    assert checked == 7 * 8 + 8 + 2 * 4


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "diffusers 0.42.1 reads kohya SD1 files with per-module alphas wrongly: "
        "_convert_non_diffusers_lora_to_diffusers names UNet attention alphas after the old "
        "'attn1.processor.to_q_lora.down.weight' key and text-encoder alphas as '<layer>.self_attn', so "
        "get_peft_kwargs builds alpha_pattern keys that match no module; peft warns 'The following "
        "alpha_pattern keys did not match any targeted module and were ignored' and uses the most common "
        "alpha everywhere. The file itself is right (test_kohya_alpha_over_rank_reproduces_each_peft_delta); "
        "uniform alphas, conv LoRA and per-module ranks load correctly."
    ),
)
def test_kohya_nonuniform_alpha_readback_by_diffusers(tmp_path, tiny_pipeline_dir):
    pipe = lora_pipe(tiny_pipeline_dir, unet_kwargs=dict(alpha_pattern={"attn1.to_q": 3}))
    lora_files.save_kohya_lora(tmp_path / "a.safetensors", pipe.unet, pipe.text_encoder)
    loaded = fresh(tiny_pipeline_dir)
    with pytest.warns(RuntimeWarning):  # silence the expected peft warning
        loaded.load_lora_weights(str(tmp_path), weight_name="a.safetensors")
    np.testing.assert_allclose(generate(loaded, "latent"), generate(pipe, "latent"), atol=1e-4, rtol=0)


def test_kohya_unet_only_and_dtype(tmp_path, tiny_pipeline_dir):
    pipe = lora_pipe(tiny_pipeline_dir, te_targets=None)
    path = lora_files.save_kohya_lora(tmp_path / "u.safetensors", pipe.unet, dtype=torch.float16, output_name="bolt")
    tensors = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    meta = lora_files.read_safetensors_metadata(path)
    assert meta["ss_network_train_unet_only"] == "True" and meta["ss_output_name"] == "bolt"


# ------------------------------------------------------------------ errors and atomicity

def test_clear_errors(tmp_path, tiny_pipeline_dir):
    plain = fresh(tiny_pipeline_dir)
    with pytest.raises(ValueError, match=r"unet has no LoRA adapter named 'default'.*add_adapter"):
        lora_files.save_lora_weights(tmp_path, plain.unet)
    pipe = lora_pipe(tiny_pipeline_dir)
    with pytest.raises(ValueError, match="adapters present: default"):
        lora_files.save_lora_weights(tmp_path, pipe.unet, adapter_name="other")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        lora_files.save_lora_weights(tmp_path / "afile", pipe.unet)
    with pytest.raises(ValueError, match=r"must end with \.safetensors"):
        lora_files.save_kohya_lora(tmp_path / "x.pt", pipe.unet)
    with pytest.raises(ValueError, match="str to str"):
        lora_files.save_kohya_lora(tmp_path / "x.safetensors", pipe.unet, metadata={"ss_steps": 100})
    dora = fresh(tiny_pipeline_dir)
    dora.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        lora_files.save_kohya_lora(tmp_path / "d.safetensors", dora.unet)


def test_failed_write_keeps_previous_file(tmp_path, tiny_pipeline_dir, monkeypatch):
    pipe = lora_pipe(tiny_pipeline_dir)
    good = lora_files.save_kohya_lora(tmp_path / "k.safetensors", pipe.unet)
    before = good.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lora_files.save_kohya_lora(tmp_path / "k.safetensors", pipe.unet)
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


# ------------------------------------------------------------------ transformers refusing the installed peft

@pytest.fixture
def te_loading_refused(monkeypatch):
    """Make transformers' load_adapter start with its real PEFT version check, as transformers 4.x does,
    against a minimum no peft meets: the refusal diffusers meets when it loads a text-encoder LoRA."""
    from transformers.integrations import peft as transformers_peft

    real = transformers_peft.PeftAdapterMixin.load_adapter

    def gated(self, *args, **kwargs):
        transformers_peft.check_peft_version(min_version="99.0")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers_peft.PeftAdapterMixin, "load_adapter", gated)


def test_refused_text_encoder_load_names_versions_and_fix(tmp_path, tiny_pipeline_dir, te_loading_refused):
    import peft
    import transformers

    pipe = lora_pipe(tiny_pipeline_dir)
    lora_files.save_lora_weights(tmp_path / "full", pipe.unet, pipe.text_encoder)
    lora_files.save_lora_weights(tmp_path / "unet_only", pipe.unet)
    target = fresh(tiny_pipeline_dir)
    lora_files.load_lora_into_pipeline(target, tmp_path / "unet_only", adapter_name="a")  # no text encoder: no refusal
    with pytest.raises(ValueError) as info:
        lora_files.load_lora_into_pipeline(target, tmp_path / "full", adapter_name="b")
    message = str(info.value)
    assert "load the text-encoder part of the LoRA" in message and "full" in message
    assert f"transformers {transformers.__version__} refuses the installed peft {peft.__version__}" in message
    assert "pip install -c constraints.txt -e ." in message and "transformers<5.24 with peft 0.21" in message
    assert 'pip install "peft>=99.0"' in message
    assert "The version of PEFT you are using is not compatible" in str(info.value.__cause__)
    # The UNet half diffusers loaded before the text encoder failed is gone; the earlier adapter stays.
    assert set(target.unet.peft_config) == {"a"}
    assert not hasattr(target.text_encoder, "peft_config")

    fresh_pipe = fresh(tiny_pipeline_dir)
    with pytest.raises(ValueError, match="refuses the installed peft"):
        lora_files.load_lora_into_pipeline(fresh_pipe, tmp_path / "full")
    assert not hasattr(fresh_pipe.unet, "peft_config")
    assert not any("lora_" in n for n, _ in fresh_pipe.unet.named_parameters())


def test_only_transformers_refusal_is_rewritten():
    refusal = ValueError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")
    assert lora_files.transformers_peft_refusal(refusal) == "0.22.0"
    # diffusers' own check (a different remedy) and other errors are left alone.
    diffusers_check = ValueError("The version of PEFT you are using is not compatible, please use a version that is at least 0.6.0")
    assert lora_files.transformers_peft_refusal(diffusers_check) is None
    assert lora_files.transformers_peft_refusal(ValueError("Target modules {'x'} not found")) is None
    assert lora_files.transformers_peft_refusal(TypeError(str(refusal))) is None
