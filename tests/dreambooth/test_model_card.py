"""The model card must parse as a Hub card, link only files in the folder, and list every setting."""

import re

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from adaprelora_diffusion.dreambooth import model_card

HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SETTINGS = {
    "learning_rate": 1e-4,
    "rank": 8,
    "lora_alpha": 16,
    "max_train_steps": 400,
    "resolution": 512,
    "seed": 0,
    "mixed_precision": "bf16",
    "target_modules": "to_q|to_k\nto_v",  # a pipe and a newline must not break the table
}


def split_card(text):
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, "card must start with a YAML front matter block"
    return yaml.safe_load(match.group(1)), match.group(2)


def table_rows(body):
    """The rows of the card's settings table."""
    section = body.split("## Training settings", 1)[1].split("\n## ", 1)[0] if "## Training settings" in body else ""
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Setting")]
    return {re.split(r"(?<!\\)\|", r)[1].strip(): re.split(r"(?<!\\)\|", r)[2].strip() for r in rows}


def python_snippets(body):
    return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "sks-robot-lora"
    samples = folder / "validation" / "step-000400"
    samples.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(samples / f"{i:02d}.png")
    (folder / "sks-robot-kohya.safetensors").write_bytes(b"stub")
    return folder


def write_full(lora_dir, **overrides):
    kwargs = dict(
        base_model=HUB_ID,
        instance_prompt="a photo of sks robot",
        validation_prompt='sks robot "bolt" on the moon',
        optimizer="adaprelora",
        settings=SETTINGS,
        sample_images=[lora_dir / "validation/step-000400/00.png", "validation/step-000400/01.png"],
        train_text_encoder=True,
        kohya_file=lora_dir / "sks-robot-kohya.safetensors",
    )
    kwargs.update(overrides)
    return model_card.write_model_card(lora_dir, **kwargs)


def test_hub_base_model_card(lora_dir):
    path = write_full(lora_dir)
    assert path == lora_dir / "README.md"
    meta, body = split_card(path.read_text(encoding="utf-8"))

    assert meta["base_model"] == HUB_ID
    assert meta["library_name"] == "diffusers"
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["tags"] == ["text-to-image", "diffusers", "lora", "stable-diffusion", "adaprelora"]
    assert meta["instance_prompt"] == "a photo of sks robot"
    urls = [w["output"]["url"] for w in meta["widget"]]
    assert urls == ["validation/step-000400/00.png", "validation/step-000400/01.png"]
    assert all(w["text"] == 'sks robot "bolt" on the moon' for w in meta["widget"])
    assert all((lora_dir / url).is_file() for url in urls)

    for url in urls:
        assert f"]({url})" in body
    assert "](sks-robot-kohya.safetensors)" in body
    which = body.split("## Which file for which tool", 1)[1].split("\n## ", 1)[0]
    assert "| `pytorch_lora_weights.safetensors` | diffusers" in which and "Not for AUTOMATIC1111" in which
    assert "| `sks-robot-kohya.safetensors` | AUTOMATIC1111, ComfyUI" in which
    assert "text encoder" in body and "`adaprelora`" in body and "`a photo of sks robot`" in body
    assert "smoke-test" not in body.lower()

    rows = table_rows(body)
    assert set(rows) == set(SETTINGS) | {"optimizer"}
    assert rows["optimizer"] == "adaprelora"
    assert rows["learning_rate"] == "0.0001" and rows["lora_alpha"] == "16"
    assert rows["target_modules"] == r"to_q\|to_k to_v"

    (snippet,) = python_snippets(body)
    compile(snippet, "README snippet", "exec")  # quotes in the prompt must not break the code
    assert f'from_pretrained("{HUB_ID}"' in snippet
    assert 'load_lora_weights("sks-robot-lora", weight_name="pytorch_lora_weights.safetensors")' in snippet

    # huggingface_hub reads it back with the same metadata.
    card = ModelCard.load(path)
    assert card.data.base_model == HUB_ID and card.data.instance_prompt == "a photo of sks robot"


def test_random_tiny_base_model_is_flagged_as_smoke_test(lora_dir, tiny_pipeline_dir):
    path = model_card.write_model_card(lora_dir, base_model=tiny_pipeline_dir, instance_prompt="a photo of sks robot",
                                       settings={"seed": 3})
    meta, body = split_card(path.read_text(encoding="utf-8"))
    assert "base_model" not in meta  # not a Hub id
    assert "widget" not in meta and "## Sample images" not in body
    assert "tiny random-weight" in body and "smoke-test" in body.lower()
    assert "| (no kohya file) | for AUTOMATIC1111 and ComfyUI, train with `--output_kohya_format`" in body
    (snippet,) = python_snippets(body)
    compile(snippet, "README snippet", "exec")
    assert "ensure_tiny_pipeline()" in snippet and str(tiny_pipeline_dir) not in snippet
    assert table_rows(body) == {"seed": "3"}


@pytest.mark.parametrize("as_path", [False, True])
def test_default_pretrained_base_model_is_flagged_as_demo(lora_dir, as_path):
    from adaprelora_diffusion.demo.pretrained_tiny import SHIPPED_DIR

    base = SHIPPED_DIR if as_path else None
    path = model_card.write_model_card(lora_dir, base_model=base, instance_prompt="a photo of sks robot", settings={})
    meta, body = split_card(path.read_text(encoding="utf-8"))
    assert "base_model" not in meta
    assert "pretrained on procedural shapes" in body and "demo model" in body.lower()
    assert "random-weight" not in body
    (snippet,) = python_snippets(body)
    compile(snippet, "README snippet", "exec")
    assert "default_pretrained_pipeline()" in snippet and str(SHIPPED_DIR) not in snippet


def test_local_base_models_stay_out_of_the_metadata(lora_dir, tmp_path):
    local = tmp_path / "my-sd15"
    local.mkdir()
    for base, loader in ((local, "from_pretrained"), (tmp_path / "v1-5-pruned.safetensors", "from_single_file")):
        path = model_card.write_model_card(lora_dir, base_model=str(base), instance_prompt="sks robot", settings={})
        meta, body = split_card(path.read_text(encoding="utf-8"))
        assert "base_model" not in meta
        (snippet,) = python_snippets(body)
        assert f'{loader}("{base}"' in snippet
        assert "## Training settings" not in body


def test_rewrite_is_atomic(lora_dir, monkeypatch):
    path = write_full(lora_dir)
    before = path.read_text(encoding="utf-8")

    def crash(self, *args, **kwargs):
        with open(self, "w") as fh:
            fh.write("---\nbase_mo")
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        write_full(lora_dir, instance_prompt="something else")
    assert path.read_text(encoding="utf-8") == before
    assert not [p for p in lora_dir.iterdir() if p.name.startswith(".")]


def test_bad_input_is_named(lora_dir, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    with pytest.raises(ValueError, match="outside the output folder"):
        write_full(lora_dir, sample_images=[outside])
    with pytest.raises(ValueError, match="does not exist"):
        write_full(lora_dir, sample_images=["validation/step-000001/00.png"])
    with pytest.raises(ValueError, match="kohya LoRA file .* does not exist"):
        write_full(lora_dir, kohya_file="missing.safetensors")
    with pytest.raises(ValueError, match="instance_prompt must be a non-empty string"):
        write_full(lora_dir, instance_prompt=" ")
    with pytest.raises(ValueError, match="settings must be a dict"):
        write_full(lora_dir, settings=["lr=1e-4"])
    with pytest.raises(ValueError, match="is a file"):
        write_full(outside)
    assert not (lora_dir / "README.md").exists()
