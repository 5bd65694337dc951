"""The scene generator must be deterministic and its captions must describe what is drawn."""

import pytest

from adaprelora_diffusion.demo import scenes


def test_same_index_and_seed_give_identical_scene():
    a_img, a_cap = scenes.scene(7, seed=3)
    b_img, b_cap = scenes.scene(7, seed=3)
    assert a_cap == b_cap
    assert a_img.tobytes() == b_img.tobytes()


def test_seed_and_index_change_the_data():
    caps_a = [scenes.scene(i, seed=0)[1] for i in range(50)]
    caps_b = [scenes.scene(i, seed=1)[1] for i in range(50)]
    assert caps_a != caps_b
    assert len(set(caps_a)) > 40  # different indices give (mostly) different scenes


@pytest.mark.parametrize("resolution", [64, 96])
def test_caption_matches_pixels(resolution):
    for i in range(200):
        spec = scenes.scene_spec(i, seed=0)
        image = scenes.render(spec, resolution)
        assert image.size == (resolution, resolution) and image.mode == "RGB"
        caption = spec.caption()
        for shape in spec.shapes:
            assert shape.phrase() in caption
            cx, cy = shape.center(resolution)
            assert image.getpixel((int(cx), int(cy))) == scenes.COLORS[shape.color], (i, caption)
            assert shape.color != spec.background  # never invisible
        # Corners are never covered by a shape: they show the named background.
        assert image.getpixel((0, 0)) == scenes._BACKGROUND_RGB[spec.background]
        assert caption.endswith(f"on a {spec.background} background")


def test_variety_covers_every_attribute():
    specs = [scenes.scene_spec(i, seed=0) for i in range(400)]
    shapes = [s for spec in specs for s in spec.shapes]
    assert {s.kind for s in shapes} == set(scenes.SHAPES)
    assert {s.color for s in shapes} == set(scenes.COLORS)
    assert {s.position for s in shapes} == set(scenes.POSITIONS)
    assert {s.size for s in shapes} == set(scenes.SIZES)
    assert {spec.background for spec in specs} == set(scenes.BACKGROUNDS)
    counts = {len(spec.shapes) for spec in specs}
    assert counts == {1, 2}


def test_two_shapes_differ_in_colour_and_sit_opposite():
    for i in range(300):
        spec = scenes.scene_spec(i, seed=2)
        if len(spec.shapes) == 2:
            a, b = spec.shapes
            assert a.color != b.color
            assert {a.position, b.position} in ({"left", "right"}, {"top", "bottom"})


def test_caption_words_cover_all_captions():
    words = set(scenes.caption_words())
    for i in range(200):
        assert set(scenes.scene(i)[1].split()) <= words


def test_class_prompt_and_bad_input():
    assert scenes.class_prompt("circle") == "a circle"
    with pytest.raises(ValueError, match="unknown shape"):
        scenes.class_prompt("hexagon")
    with pytest.raises(ValueError, match="non-negative"):
        scenes.scene(-1)
    with pytest.raises(ValueError, match="resolution"):
        scenes.scene(0, resolution=8)


def test_judge_accepts_every_true_rendering():
    for i in range(100):
        spec = scenes.scene_spec(i, seed=0)
        verdict = scenes.judge(scenes.render(spec, 64), spec)
        assert all(verdict["color_present"]) and all(verdict["color_ok"]) and all(verdict["position_ok"]) and verdict["background_ok"], (i, verdict)


def test_judge_rejects_wrong_colour_position_and_background():
    spec = scenes.SceneSpec(shapes=(scenes.Shape("circle", "red", "left", "large"),), background="white")
    wrong_colour = scenes.SceneSpec(shapes=(scenes.Shape("circle", "green", "left", "large"),), background="white")
    wrong_side = scenes.SceneSpec(shapes=(scenes.Shape("circle", "red", "right", "large"),), background="white")
    wrong_bg = scenes.SceneSpec(shapes=(scenes.Shape("circle", "red", "left", "large"),), background="black")
    assert scenes.judge(scenes.render(wrong_colour), spec)["color_ok"] == [False]
    side = scenes.judge(scenes.render(wrong_side), spec)
    assert side["color_ok"] == [False] and side["position_ok"] == [False]
    assert scenes.judge(scenes.render(wrong_bg), spec)["background_ok"] is False
    # Red everywhere: colour "right" at the named place, but not a shape on the left.
    from PIL import Image
    flood = scenes.judge(Image.new("RGB", (64, 64), scenes.COLORS["red"]), spec)
    assert flood["color_ok"] == [True] and flood["position_ok"] == [False] and flood["background_ok"] is False


def test_nearest_color():
    assert scenes.nearest_color((200, 40, 40)) == "red"
    assert scenes.nearest_color((120, 130, 125)) == "gray"


def test_color_present_ignores_position_but_not_colour():
    spec = scenes.SceneSpec(shapes=(scenes.Shape("circle", "red", "left", "small"),), background="white")
    moved = scenes.SceneSpec(shapes=(scenes.Shape("circle", "red", "right", "small"),), background="white")
    recoloured = scenes.SceneSpec(shapes=(scenes.Shape("circle", "blue", "left", "small"),), background="white")
    assert scenes.judge(scenes.render(moved), spec)["color_present"] == [True]
    assert scenes.judge(scenes.render(recoloured), spec)["color_present"] == [False]
