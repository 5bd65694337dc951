"""Class images: generated only when missing, deterministic per index, never left half-written."""

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from adaprelora_diffusion.dreambooth import prior

PROMPT = "a photo of a robot"
FAST = dict(resolution=64, num_inference_steps=2, batch_size=2)


@pytest.fixture(scope="module")
def base_pipe(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def factory(base_pipe):
    calls = []

    def make():
        calls.append(1)
        return base_pipe

    make.calls = calls
    return make


def no_model():
    raise AssertionError("the base model must not be loaded when enough class images exist")


class FailOnCall:
    """Delegates to a real pipeline but raises on its ``fail_at``-th generation call (1-based)."""

    def __init__(self, pipe, fail_at):
        self.pipe, self.fail_at, self.calls = pipe, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.pipe(*args, **kwargs)


def names(folder):
    """Everything in the folder, hidden temp files included."""
    return sorted(p.name for p in folder.iterdir())


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def assert_complete_pngs(folder):
    for path in folder.glob("*.png"):
        with Image.open(path) as im:
            im.load()  # raises on a truncated file
            assert im.size == (64, 64)


def test_generates_from_empty_folder(tmp_path, factory):
    folder = tmp_path / "class" / "dogs"  # created, parents too
    seen = []
    paths = prior.ensure_class_images(folder, PROMPT, 3, pipeline_factory=factory, progress=lambda d, t: seen.append((d, t)), **FAST)
    assert [p.name for p in paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert names(folder) == ["class-00000.png", "class-00001.png", "class-00002.png"]  # no temp files
    assert_complete_pngs(folder)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len(factory.calls) == 1
    assert np.abs(pixels(paths[0]) - pixels(paths[1])).mean() > 5, "each index has its own seed"


def test_second_run_reuses_images_without_loading_a_model(tmp_path, factory):
    paths = prior.ensure_class_images(tmp_path, PROMPT, 3, pipeline_factory=factory, **FAST)
    before = {p: p.read_bytes() for p in paths}
    assert prior.ensure_class_images(tmp_path, PROMPT, 3, pipeline_factory=no_model, **FAST) == paths
    assert prior.ensure_class_images(tmp_path, PROMPT, 2, pipeline_factory=no_model, **FAST) == paths[:2]
    assert {p: p.read_bytes() for p in paths} == before


def test_tops_up_counting_user_images_and_ignoring_non_images(tmp_path, factory):
    Image.new("RGB", (80, 80), (10, 20, 30)).save(tmp_path / "my_dog.jpg")
    (tmp_path / "my_dog.txt").write_text("a caption")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "class-00007.png").write_bytes(b"\x89PNG truncated")  # unreadable: not counted, not overwritten

    paths = prior.ensure_class_images(tmp_path, PROMPT, 3, pipeline_factory=factory, **FAST)
    assert [p.name for p in paths] == ["class-00008.png", "class-00009.png", "my_dog.jpg"]
    assert (tmp_path / "class-00007.png").read_bytes() == b"\x89PNG truncated"
    assert (tmp_path / "notes.md").read_text() == "not an image"

    # One more needed later: only index 10 is made, nothing existing is touched.
    more = prior.ensure_class_images(tmp_path, PROMPT, 4, pipeline_factory=factory, **FAST)
    assert [p.name for p in more] == ["class-00008.png", "class-00009.png", "class-00010.png", "my_dog.jpg"]


def test_an_index_always_gets_the_same_image(tmp_path, factory):
    one_go, resumed, other_seed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prior.ensure_class_images(one_go, PROMPT, 3, pipeline_factory=factory, **FAST)  # batches [0, 1], [2]
    prior.ensure_class_images(resumed, PROMPT, 2, pipeline_factory=factory, **FAST)  # batch [0, 1]
    prior.ensure_class_images(resumed, PROMPT, 3, pipeline_factory=factory, **FAST)  # batch [2]
    for name in ("class-00000.png", "class-00001.png", "class-00002.png"):
        np.testing.assert_array_equal(pixels(one_go / name), pixels(resumed / name))

    prior.ensure_class_images(other_seed, PROMPT, 1, pipeline_factory=factory, seed=1, **FAST)
    # seed + index: seed 1's image 0 is seed 0's image 1. It was sampled alone rather than in a
    # batch of two, which may move a pixel by one level (CPU kernels round by batch shape).
    diff = np.abs(pixels(other_seed / "class-00000.png") - pixels(one_go / "class-00001.png"))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert np.abs(pixels(one_go / "class-00000.png") - pixels(one_go / "class-00001.png")).mean() > 5


def test_crash_in_second_batch_leaves_complete_images_and_rerun_finishes(tmp_path, base_pipe, factory):
    crashing = FailOnCall(base_pipe, fail_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prior.ensure_class_images(tmp_path / "run", PROMPT, 4, pipeline_factory=lambda: crashing, **FAST)
    assert names(tmp_path / "run") == ["class-00000.png", "class-00001.png"]
    assert_complete_pngs(tmp_path / "run")

    paths = prior.ensure_class_images(tmp_path / "run", PROMPT, 4, pipeline_factory=factory, **FAST)
    assert [p.name for p in paths] == [f"class-{i:05d}.png" for i in range(4)]
    clean = prior.ensure_class_images(tmp_path / "clean", PROMPT, 4, pipeline_factory=factory, **FAST)
    for a, b in zip(paths, clean):
        np.testing.assert_array_equal(pixels(a), pixels(b))


def test_crash_while_writing_leaves_no_partial_png(tmp_path, factory, monkeypatch):
    real_save = Image.Image.save
    saves = []

    def crash_on_second_save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            with open(fp, "wb") as fh:
                fh.write(b"\x89PNG half")
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        prior.ensure_class_images(tmp_path, PROMPT, 3, pipeline_factory=factory, **FAST)
    assert names(tmp_path) == ["class-00000.png"]
    assert_complete_pngs(tmp_path)

    monkeypatch.setattr(Image.Image, "save", real_save)
    paths = prior.ensure_class_images(tmp_path, PROMPT, 3, pipeline_factory=factory, **FAST)
    assert [p.name for p in paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]


def test_bad_arguments_fail_before_any_model_is_loaded(tmp_path):
    with pytest.raises(ValueError, match="class_prompt must be a non-empty string"):
        prior.ensure_class_images(tmp_path, "  ", 3, pipeline_factory=no_model)
    with pytest.raises(ValueError, match="num_class_images must be an int >= 1"):
        prior.ensure_class_images(tmp_path, PROMPT, 0, pipeline_factory=no_model)
    a_file = tmp_path / "class.png"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prior.ensure_class_images(a_file, PROMPT, 3, pipeline_factory=no_model)
    with pytest.raises(ValueError, match="multiple of 8"):
        prior.ensure_class_images(tmp_path, PROMPT, 3, pipeline_factory=no_model, resolution=100)
