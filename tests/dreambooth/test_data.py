import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from adaprelora_diffusion.dreambooth import data as D
from adaprelora_diffusion.dreambooth.data import DataWarning, DreamBoothDataset, EpochShuffleSampler, collate_fn


def gradient(w, h):
    """A non-symmetric RGB test pattern, so crops and flips are visible in the pixels."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def make_folder(root, n=3, size=(48, 40), ext="png"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gradient(*size).rotate(90 * i, expand=True).save(root / f"img{i}.{ext}")
    return root


def no_warnings_dataset(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return DreamBoothDataset(*args, **kwargs)


# ------------------------------------------------------------------ folder validation

def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*check the path") as e:
        DreamBoothDataset(tmp_path / "nope", "a photo of sks dog")
    assert "nope" in str(e.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "one.png"
    gradient(8, 8).save(f)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        DreamBoothDataset(f, "a photo of sks dog")


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"junk")  # hidden files do not count
    (tmp_path / "empty" / "sub").mkdir()  # not searched
    with pytest.raises(ValueError, match=r"empty contains no image files"):
        DreamBoothDataset(tmp_path / "empty", "a photo of sks dog")


def test_folder_with_only_bad_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "notes.md").write_text("hello")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(DataWarning, match="broken.jpg"):
        with pytest.raises(ValueError, match=r"None of the 2 file\(s\).*bad.*readable image"):
            DreamBoothDataset(d, "a photo of sks dog")


def test_corrupt_and_non_image_files_are_skipped_in_one_warning(tmp_path):
    d = make_folder(tmp_path / "inst", n=2)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    png = (d / "img0.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "notes.md").write_text("not an image")
    (d / "img0.txt").write_text("a caption, not a stray file")
    with pytest.warns(DataWarning) as record:
        ds = DreamBoothDataset(d, "a photo of sks dog", resolution=32)
    skipped = [str(w.message) for w in record if "not readable images" in str(w.message)]
    assert len(skipped) == 1
    for name in ("broken.jpg", "truncated.png", "notes.md"):
        assert name in skipped[0]
    assert "img0.txt" not in skipped[0]
    assert [r.path.name for r in ds.instance_images] == ["img0.png", "img1.png"]


def test_image_with_unusual_extension_is_used(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    gradient(40, 40).save(d / "photo.jfif", format="JPEG")
    ds = no_warnings_dataset(d, "p", resolution=32)
    assert ds[0]["instance_pixel_values"].shape == (3, 32, 32)


# ------------------------------------------------------------------ arguments

@pytest.mark.parametrize("bad", [100, 0, -8, 4, 64.0, "512", True, None])
def test_resolution_must_be_positive_multiple_of_8(tmp_path, bad):
    make_folder(tmp_path / "inst")
    with pytest.raises(ValueError, match="multiple of 8"):
        DreamBoothDataset(tmp_path / "inst", "p", resolution=bad)


def test_resolution_error_suggests_neighbours(tmp_path):
    make_folder(tmp_path / "inst")
    with pytest.raises(ValueError, match=r"Use e\.g\. 96 or 104"):
        DreamBoothDataset(tmp_path / "inst", "p", resolution=100)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_repeats_validated(tmp_path, bad):
    make_folder(tmp_path / "inst")
    with pytest.raises(ValueError, match="repeats"):
        DreamBoothDataset(tmp_path / "inst", "p", resolution=32, repeats=bad)


def test_repeats_multiply_length_and_cycle_images(tmp_path):
    ds = DreamBoothDataset(make_folder(tmp_path / "inst", n=3), "p", resolution=32, repeats=4, center_crop=True)
    assert len(ds) == 12
    assert ds[1]["instance_path"] == ds[4]["instance_path"] != ds[2]["instance_path"]
    with pytest.raises(IndexError):
        ds[12]


# ------------------------------------------------------------------ image modes and orientation

def _single(tmp_path, image, name, **save_kwargs):
    d = tmp_path / "inst"
    d.mkdir(exist_ok=True)
    image.save(d / name, **save_kwargs)
    return D.load_image(d / name)


def test_rgba_transparency_becomes_white(tmp_path):
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (0, 0, 8, 16))  # left half fully transparent blue
    out = _single(tmp_path, im, "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((12, 2)) == (255, 0, 0)


def test_la_and_palette_transparency_become_white(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    assert _single(tmp_path, la, "la.png").getpixel((1, 1)) == (255, 255, 255)
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0])
    p.paste(1, (4, 0, 8, 8))
    out = _single(tmp_path, p, "p.png", transparency=0)
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((6, 1)) == (0, 255, 0)


def test_cmyk_jpeg_and_grayscale_become_rgb(tmp_path):
    cmyk = _single(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "c.jpg", format="JPEG", quality=95)
    assert cmyk.mode == "RGB"
    r, g, b = cmyk.getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50  # CMYK (0,1,1,0) is red
    gray = _single(tmp_path, Image.new("L", (8, 8), 100), "g.png")
    assert gray.mode == "RGB" and gray.getpixel((3, 3)) == (100, 100, 100)


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    out = _single(tmp_path, Image.fromarray(arr), "g16.png")
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    d = tmp_path / "inst"
    d.mkdir()
    im.save(d / "rot.jpg", exif=exif, quality=95)
    out = D.load_image(d / "rot.jpg")
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[2] > 200 and top[0] < 60  # stored left (blue) is displayed on top
    assert bottom[0] > 200 and bottom[2] < 60
    ds = DreamBoothDataset(d, "p", resolution=16, center_crop=True)
    assert ds.instance_images[0].size == (20, 40)


def test_small_images_are_warned_about_by_name(tmp_path):
    d = make_folder(tmp_path / "inst", n=1, size=(64, 64))
    gradient(12, 30).save(d / "tiny.png")
    with pytest.warns(DataWarning, match=r"tiny\.png \(12x30\)") as record:
        ds = DreamBoothDataset(d, "p", resolution=32)
    assert "img0.png" not in " ".join(str(w.message) for w in record)
    # It is still used, upscaled to the training size.
    assert ds[1]["instance_pixel_values"].shape == (3, 32, 32)


# ------------------------------------------------------------------ prompts and captions

def test_caption_file_overrides_prompt(tmp_path):
    d = make_folder(tmp_path / "inst", n=2)
    (d / "img1.txt").write_text("  sks dog on a beach\n", encoding="utf-8")
    ds = DreamBoothDataset(d, "a photo of sks dog", resolution=32)
    assert ds[0]["instance_prompt"] == "a photo of sks dog"
    assert ds[1]["instance_prompt"] == "sks dog on a beach"


def test_non_utf8_caption_is_named(tmp_path):
    d = make_folder(tmp_path / "inst", n=1)
    (d / "img0.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match=r"img0\.txt is not UTF-8 text"):
        DreamBoothDataset(d, "p", resolution=32)


def test_empty_caption_falls_back_with_warning(tmp_path):
    d = make_folder(tmp_path / "inst", n=1)
    (d / "img0.txt").write_text("   ")
    with pytest.warns(DataWarning, match="img0.txt"):
        ds = DreamBoothDataset(d, "a photo of sks dog", resolution=32)
    assert ds[0]["instance_prompt"] == "a photo of sks dog"


def test_missing_prompt_needs_captions_for_every_image(tmp_path):
    d = make_folder(tmp_path / "inst", n=2)
    (d / "img0.txt").write_text("caption zero")
    with pytest.raises(ValueError, match=r"img1\.png.*instance prompt"):
        DreamBoothDataset(d, None, resolution=32)
    (d / "img1.txt").write_text("caption one")
    ds = DreamBoothDataset(d, "", resolution=32)
    assert [ds[i]["instance_prompt"] for i in range(2)] == ["caption zero", "caption one"]


# ------------------------------------------------------------------ tensors and augmentation

def test_tensors_are_chw_float_in_minus_one_one(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    Image.new("RGB", (40, 40), (255, 255, 255)).save(d / "white.png")
    Image.new("RGB", (40, 40), (0, 0, 0)).save(d / "black.png")
    gradient(40, 40).save(d / "grad.png")
    ds = no_warnings_dataset(d, "p", resolution=32, center_crop=True)
    by_name = {ds[i]["instance_path"].rsplit("/", 1)[-1]: ds[i]["instance_pixel_values"] for i in range(3)}
    assert by_name["white.png"].dtype == torch.float32 and by_name["white.png"].shape == (3, 32, 32)
    assert torch.all(by_name["white.png"] == 1.0)
    assert torch.all(by_name["black.png"] == -1.0)
    g = by_name["grad.png"]
    assert g.min() >= -1 and g.max() <= 1
    assert g[0, :, -1].mean() > g[0, :, 0].mean()  # red grows left -> right: channel order is RGB, HWC->CHW


def test_center_crop_takes_the_middle(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    im = Image.new("RGB", (96, 32), (255, 0, 0))
    im.paste((0, 255, 0), (32, 0, 64, 32))  # green middle third
    im.save(d / "wide.png")
    ds = no_warnings_dataset(d, "p", resolution=32, center_crop=True, repeats=4)
    for i in range(4):
        x = ds[i]["instance_pixel_values"]
        assert torch.allclose(x[1], torch.ones(32, 32)) and torch.allclose(x[0], -torch.ones(32, 32))


def test_random_crop_varies_and_stays_in_bounds(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    gradient(96, 32).save(d / "wide.png")
    ds = no_warnings_dataset(d, "p", resolution=32, center_crop=False, repeats=16)
    reds = {round(float(ds[i]["instance_pixel_values"][0, 0, 0]), 3) for i in range(16)}
    assert len(reds) > 3  # several different left offsets
    assert all(-1 <= r <= 1 for r in reds)


def test_random_flip_mirrors_some_items(tmp_path):
    d = make_folder(tmp_path / "inst", n=1, size=(32, 32))
    plain = no_warnings_dataset(d, "p", resolution=32, center_crop=True)[0]["instance_pixel_values"]
    ds = no_warnings_dataset(d, "p", resolution=32, center_crop=True, random_flip=True, repeats=24)
    flipped = 0
    for i in range(24):
        x = ds[i]["instance_pixel_values"]
        if torch.equal(x, plain):
            continue
        assert torch.equal(x, torch.flip(plain, dims=[2]))
        flipped += 1
    assert 0 < flipped < 24


def _all(ds):
    return torch.stack([ds[i]["instance_pixel_values"] for i in range(len(ds))])


def test_augmentation_is_deterministic_given_seed_and_epoch(tmp_path):
    d = make_folder(tmp_path / "inst", n=3, size=(64, 40))
    kw = dict(resolution=32, random_flip=True, repeats=3)
    a = _all(DreamBoothDataset(d, "p", seed=7, **kw))
    b = _all(DreamBoothDataset(d, "p", seed=torch.Generator().manual_seed(7), **kw))
    assert torch.equal(a, b)
    assert not torch.equal(a, _all(DreamBoothDataset(d, "p", seed=8, **kw)))

    ds = DreamBoothDataset(d, "p", seed=7, **kw)
    reversed_order = torch.stack([ds[i]["instance_pixel_values"] for i in reversed(range(len(ds)))]).flip(0)
    assert torch.equal(a, reversed_order)  # access order does not matter
    ds.set_epoch(1)
    epoch1 = _all(ds)
    assert not torch.equal(a, epoch1)
    ds.set_epoch(0)
    assert torch.equal(a, _all(ds))


def test_bad_seed_is_rejected(tmp_path):
    make_folder(tmp_path / "inst")
    with pytest.raises(ValueError, match="seed"):
        DreamBoothDataset(tmp_path / "inst", "p", resolution=32, seed=-1)


def test_sampler_order_depends_only_on_seed_and_epoch(tmp_path):
    ds = DreamBoothDataset(make_folder(tmp_path / "inst", n=4), "p", resolution=32, repeats=3)
    s1, s2 = EpochShuffleSampler(ds, seed=3), EpochShuffleSampler(ds, seed=3)
    first = list(s1)
    assert sorted(first) == list(range(12)) and first == list(s2)
    s1.set_epoch(1)
    assert ds.epoch == 1  # forwarded so augmentation follows the epoch
    second = list(s1)
    assert second != first and sorted(second) == list(range(12))
    s2.set_epoch(1)
    assert list(s2) == second
    assert list(EpochShuffleSampler(ds, shuffle=False)) == list(range(12))


def test_dataloader_replays_identical_batches(tmp_path):
    d = make_folder(tmp_path / "inst", n=3, size=(64, 40))

    def run(epoch):
        ds = DreamBoothDataset(d, "p", resolution=32, random_flip=True, repeats=2, seed=11)
        sampler = EpochShuffleSampler(ds, seed=11)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_fn)
        return [b["pixel_values"] for b in loader]

    a, b = run(2), run(2)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, run(3)))


# ------------------------------------------------------------------ prior preservation and collate

def test_class_images_are_paired(tmp_path):
    inst = make_folder(tmp_path / "inst", n=2)
    cls = make_folder(tmp_path / "cls", n=5, size=(40, 40))
    ds = DreamBoothDataset(inst, "a photo of sks dog", resolution=32, class_data_root=cls,
                           class_prompt="a photo of a dog")
    assert ds.with_prior_preservation and len(ds) == 5  # every class image once per epoch
    ex = ds[3]
    assert ex["class_prompt"] == "a photo of a dog"
    assert ex["class_path"].endswith("img3.png") and ex["instance_path"].endswith("img1.png")
    assert ex["class_pixel_values"].shape == (3, 32, 32)
    limited = DreamBoothDataset(inst, "p", resolution=32, class_data_root=cls, class_prompt="c", max_class_images=1)
    assert len(limited) == 2 and len(limited.class_images) == 1


def test_class_arguments_must_come_together(tmp_path):
    inst = make_folder(tmp_path / "inst", n=1)
    cls = make_folder(tmp_path / "cls", n=1)
    with pytest.raises(ValueError, match="without a class prompt"):
        DreamBoothDataset(inst, "p", resolution=32, class_data_root=cls)
    with pytest.raises(ValueError, match="without a class image folder"):
        DreamBoothDataset(inst, "p", resolution=32, class_prompt="a dog")
    with pytest.raises(ValueError, match=r"class image folder .*missing.*does not exist"):
        DreamBoothDataset(inst, "p", resolution=32, class_data_root=tmp_path / "missing", class_prompt="a dog")


def test_collate_puts_instance_rows_first(tmp_path):
    from transformers import CLIPTokenizer

    from adaprelora_diffusion.demo.tiny_pipeline import write_tokenizer_files

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer_files(tmp_path / "tok")), model_max_length=77)
    inst = make_folder(tmp_path / "inst", n=2)
    cls = tmp_path / "cls"
    cls.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(cls / "black.png")
    ds = DreamBoothDataset(inst, "sks", resolution=32, class_data_root=cls, class_prompt="dog", center_crop=True)
    batch = collate_fn([ds[0], ds[1]], tokenizer=tok)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["prompts"] == ["sks", "sks", "dog", "dog"]
    assert batch["num_instance"] == 2
    assert torch.all(batch["pixel_values"][2:] == -1) and not torch.all(batch["pixel_values"][:2] == -1)
    assert batch["input_ids"].shape == (4, 77)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][2])

    instance_only = {k: v for k, v in ds[0].items() if not k.startswith("class")}
    plain = collate_fn([instance_only])
    assert plain["pixel_values"].shape == (1, 3, 32, 32) and "input_ids" not in plain
    with pytest.raises(ValueError, match="mixing"):
        collate_fn([ds[1], instance_only])
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])


def test_class_and_instance_augmentations_are_independent(tmp_path):
    # Same picture in both folders: only separate random streams make the crops differ.
    inst = make_folder(tmp_path / "inst", n=1, size=(96, 32))
    cls = make_folder(tmp_path / "cls", n=1, size=(96, 32))
    ds = DreamBoothDataset(inst, "p", resolution=32, class_data_root=cls, class_prompt="c", repeats=8)
    assert any(not torch.equal(ds[i]["instance_pixel_values"], ds[i]["class_pixel_values"]) for i in range(8))


def test_sampler_pads_each_epoch_to_a_multiple_of_the_global_batch():
    from adaprelora_diffusion.dreambooth.data import EpochShuffleSampler

    data = list(range(5))
    plain = EpochShuffleSampler(data, seed=3)
    padded = EpochShuffleSampler(data, seed=3, pad_to_multiple=4)
    order = list(plain)
    assert len(padded) == 8 and list(padded) == order + order[:3]
    assert list(EpochShuffleSampler(data, seed=3, pad_to_multiple=5)) == order
    assert len(list(EpochShuffleSampler([0, 1], seed=0, pad_to_multiple=5))) == 5
