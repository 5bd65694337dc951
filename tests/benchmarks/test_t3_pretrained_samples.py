"""The sample-check script's scoring: perfect on true drawings, near zero on flat images."""

from PIL import Image

from adaprelora_diffusion.demo import scenes
from tests.benchmarks import load_benchmark

t3 = load_benchmark("t3_pretrained_samples")


def test_eval_prompts_cover_every_colour_and_position():
    specs = t3.eval_specs()
    single = [s for s in specs if len(s.shapes) == 1]
    assert {(s.shapes[0].color, s.shapes[0].position) for s in single} == {
        (c, p) for c in scenes.COLORS for p in scenes.POSITIONS
    }
    assert all(s.shapes[0].color != s.background for s in single)
    assert len(specs) - len(single) == 6


def test_score_is_perfect_on_reference_drawings_and_low_on_flat_gray(tmp_path):
    specs = t3.eval_specs()
    truth = [[scenes.render(s) for s in specs]]
    perfect = t3.score(specs, truth)
    assert perfect["color_present"] == perfect["single_shape_color"] == perfect["two_shape_color"] == perfect["all_correct"] == 1.0
    gray = t3.score(specs, [[Image.new("RGB", (64, 64), (128, 128, 128)) for _ in specs]])
    assert gray["color_present"] == gray["single_shape_color"] == 0.0 and gray["all_correct"] == 0.0
    t3.grid(specs, truth, truth, tmp_path / "g.png", rows=[0, 30])
    assert Image.open(tmp_path / "g.png").size[1] == 2 * (64 * 2 + 4)
