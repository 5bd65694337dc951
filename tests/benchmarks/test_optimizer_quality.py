"""End-to-end smoke run of the quality benchmark (--quick) and unit checks of its harness."""

import json
import math

import pytest
import torch
from PIL import Image

from adaprelora_diffusion.optim import make_optimizer
from benchmarks.quality import (
    Config,
    Instance,
    run_one,
    state_bytes,
    steps_to_reach,
    sweep,
)
from benchmarks.quality.tasks import (
    LowRankRegression,
    PretrainSpec,
    _make_lm,
    markov_table,
    spread_channel_scales,
)
from tests.benchmarks import load_benchmark


def load():
    return load_benchmark("optimizer_quality")


def _no_nonstandard_json(token):
    raise AssertionError(f"non-standard JSON constant {token}")


def test_quick_run_writes_wellformed_sane_outputs(tmp_path, cache, capsys):
    bench = load()
    out = tmp_path / "out"
    payload = bench.main(["--quick", "--out", str(out)])  # T3 on the shipped pretrained pipeline
    torch.set_num_threads(1)
    printed = capsys.readouterr().out
    on_disk = json.loads((out / "optimizer_quality.json").read_text(), parse_constant=_no_nonstandard_json)
    assert on_disk["tasks"].keys() == payload["tasks"].keys() == {"T1", "T2", "T3", "T3-prior", "T5"}
    assert on_disk["quick"] is True and on_disk["seeds"] == [0] and on_disk["suite_wall_s"] > 0
    markdown = (out / "optimizer_quality.md").read_text()
    assert markdown.strip() == printed.strip()
    assert list(cache.glob("quality/t2_pretrained_*.pt")), "T2's pretrained weights were not cached"
    assert not list(cache.glob("quality/*.tmp*")), "atomic write left a temp file"
    for name, task in on_disk["tasks"].items():
        assert task["metrics"][0] in ("excess_mse", "loss", "heldout_loss")
        assert task["reference"] and all(math.isfinite(v) for v in task["reference"].values())
        labels = [c["label"] for c in task["configs"]]
        assert labels == bench.QUICK_CONFIGS
        for c in task["configs"]:
            assert set(c) >= {"label", "optimizer", "kwargs", "grid", "best_lr", "edge", "final", "steps_to_adamw",
                              "wall_s_per_run", "state_bytes", "sweep", "curve"}
            if name in bench.LR_FROM:  # no sweep: the source task's best lr
                source = {x["label"]: x for x in on_disk["tasks"][bench.LR_FROM[name]]["configs"]}
                assert c["grid"] == [c["best_lr"]] == [source[c["label"]]["best_lr"]] and c["edge"] is None
            else:
                assert len(c["grid"]) == 2 and c["best_lr"] in c["grid"]
                assert c["edge"] in ("low", "high")  # with 2 lrs the best is always at an edge, and must say so
            assert [s["lr"] for s in c["sweep"]] == sorted(c["grid"])
            for m in task["metrics"]:
                assert math.isfinite(c["final"][m]["mean"]) and c["final"][m]["std"] == 0.0  # one seed
            assert c["state_bytes"] > 0 and c["wall_s_per_run"] > 0
            steps = c["curve"]["steps"]
            assert steps == sorted(steps) and steps[-1] == task["steps"]
            assert len(c["curve"]["mean"]) == len(steps)
            # the reported final equals the last point of the best-lr curve
            assert c["curve"]["mean"][-1] == pytest.approx(c["final"][task["metrics"][0]]["mean"])
            edge = f" (edge: {c['edge']})" if c["edge"] else ""
            assert f"| {c['label']} | {c['best_lr']:.3g}{edge} |" in markdown
        adamw = task["configs"][0]
        assert adamw["curve"]["mean"][-1] < adamw["curve"]["mean"][0], f"{name}: AdamW did not improve"
        assert adamw["steps_to_adamw"] is not None and adamw["steps_to_adamw"] <= task["steps"]
        assert task["adamw_target"] == pytest.approx(adamw["final"][task["metrics"][0]]["mean"])
        with Image.open(out / f"{name}_curves.png") as img:
            img.load()
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
            assert len(img.getcolors(1 << 16) or []) > 3, "the plot is blank"
        short = task.get("short_budget")
        if name in bench.LR_FROM:
            assert short is None
        else:  # the literal speed test: the best lr again with 0.7x the steps, against AdamW's final
            assert short["steps"] == round(bench.SHORT_BUDGET * task["steps"]) < task["steps"]
            assert short["target"] == task["adamw_target"]
            assert [c["label"] for c in short["configs"]] == bench.SHORT_BUDGET_CONFIGS
            for c in short["configs"]:
                assert len(c["finals"]) == 1 and c["at_or_below_target"] == sum(f <= short["target"] for f in c["finals"])
            assert f"Short budget: {short['steps']} steps" in markdown
    # the headline table has one row per swept task and the prior-drift rows for T3-prior
    for name in ("T1", "T2", "T3", "T5"):
        assert f"| {name} ({on_disk['tasks'][name]['metrics'][0]}) |" in markdown
    assert "| adaprelora | yes |" in markdown and "| adamw | no |" in markdown
    # the report re-renders identically from the saved JSON
    bench.main(["--render", str(out / "optimizer_quality.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "optimizer_quality.md").read_text() == markdown
    # AdaPreLoRA keeps less state than AdamW on the same LoRA (statistics + one momentum vs two)
    t1 = {c["label"]: c for c in on_disk["tasks"]["T1"]["configs"]}
    assert 0 < t1["adaprelora"]["state_bytes"] < t1["adamw"]["state_bytes"]


def test_second_run_reuses_the_cached_pretrained_model(tmp_path, cache):
    bench = load()
    bench.main(["--quick", "--tasks", "T2", "--optimizers", "adamw", "--out", str(tmp_path / "a")])
    cached = list(cache.glob("quality/t2_pretrained_*.pt"))
    stamp = cached[0].stat().st_mtime_ns
    bench.main(["--quick", "--tasks", "T2", "--optimizers", "adamw", "--out", str(tmp_path / "b")])
    torch.set_num_threads(1)
    assert [p.stat().st_mtime_ns for p in cache.glob("quality/t2_pretrained_*.pt")] == [stamp]
    a = json.loads((tmp_path / "a" / "optimizer_quality.json").read_text())["tasks"]["T2"]
    b = json.loads((tmp_path / "b" / "optimizer_quality.json").read_text())["tasks"]["T2"]
    assert a["configs"][0]["sweep"] == b["configs"][0]["sweep"]  # deterministic given the seeds


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--extend", "-1"], "--extend must be >= 0"),
    (["--lr-grid", "0.1", "-1"], "--lr-grid values must be finite and > 0"),
    (["--optimizers", "sgd"], "invalid choice"),
    (["--tasks", "T9"], "invalid choice"),
    (["--tasks", "T3-prior"], "task T3-prior takes its lrs from T3: add T3 to --tasks"),
    (["--render", "/nonexistent/optimizer_quality.json"], "not a readable optimizer_quality.json"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        load().main(argv + ["--out", str(tmp_path)])
    assert message in capsys.readouterr().err


class _Bowl:
    """A one-step task whose metric is |log10(lr) + 1| (a sign step moves w by lr): best lr 0.1.

    A step larger than 100 makes the metric NaN, i.e. the run diverges.
    """

    name, description, steps, eval_every, metrics, reference = "bowl", "lr bowl", 1, 1, ("err",), {}

    def build(self, seed):
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        return Instance(model, None)

    def train_step(self, inst, step):
        inst.model.weight.grad = torch.ones_like(inst.model.weight)
        return 0.0

    def evaluate(self, inst):
        moved = -inst.model.weight.item()
        return {"err": math.nan if moved > 100 else abs(math.log10(moved) + 1)}


SIGN_STEP = {"betas": (0.0, 0.0), "eps": 1e-30, "weight_decay": 0.0}  # AdamW reduced to w -= lr * sign(g)


def test_sweep_extends_past_an_edge_and_flags_a_remaining_one():
    sgd = Config("sign", "adamw", SIGN_STEP, grid=(1e-4, 1e-3))
    res = sweep(_Bowl(), sgd, [0, 1], extend=3, schedule="constant")
    assert res.grid == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert res.best_lr == pytest.approx(0.1) and res.edge is None
    assert len(res.best) == 2 and res.best[0].final["err"] == pytest.approx(0.0, abs=1e-6)
    res = sweep(_Bowl(), sgd, [0], extend=1, schedule="constant")
    assert res.best_lr == pytest.approx(1e-2) and res.edge == "high"


def test_best_lr_is_reported_on_fresh_seeds_when_asked():
    sign = Config("sign", "adamw", SIGN_STEP, grid=(1e-2, 1e-1, 1.0))
    res = sweep(_Bowl(), sign, [0, 1], extend=0, schedule="constant", report_seeds=[2, 3])
    assert [r.seed for r in res.best] == [2, 3] and all(r.lr == res.best_lr for r in res.best)
    assert [r.seed for r in res.runs[res.best_lr]] == [0, 1]
    with pytest.raises(ValueError, match="must not overlap"):
        sweep(_Bowl(), sign, [0, 1], report_seeds=[1, 2])


def test_full_mode_cli_reports_fresh_seeds(tmp_path, cache):
    out = tmp_path / "out"
    payload = load().main(["--tasks", "T1", "--optimizers", "adamw", "--seeds", "1", "--lr-grid", "0.01", "0.1",
                           "--extend", "0", "--out", str(out)])
    torch.set_num_threads(1)
    assert payload["seeds"] == [0] and payload["report_seeds"] == [1]
    config = payload["tasks"]["T1"]["configs"][0]
    picked = next(s for s in config["sweep"] if s["lr"] == config["best_lr"])
    # the reported value comes from the fresh seed's run, not from the sweep's
    assert config["final"]["excess_mse"]["mean"] != picked["mean"]
    assert "reported on 1 fresh seed(s)" in (out / "optimizer_quality.md").read_text()


def test_diverged_run_is_flagged_and_never_best():
    res = sweep(_Bowl(), Config("sign", "adamw", SIGN_STEP, grid=(1e-3, 1e3)), [0], extend=0, schedule="constant")
    assert res.best_lr == 1e-3 and res.edge == "low"
    blown = res.runs[1e3][0]
    assert blown.diverged and blown.final["err"] == math.inf and blown.curve == []
    assert not res.runs[1e-3][0].diverged


def test_cosine_schedule_decays_to_zero_and_runs_evaluate_on_schedule():
    from benchmarks.quality.harness import _lr_factor

    cosine = _lr_factor("cosine", 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor("constant", 10)(7) == 1.0
    task = LowRankRegression(steps=10, eval_every=5, n_eval=64)
    run = run_one(task, Config("loraplus", "loraplus", {}), 1e-3, seed=0)
    assert len(run.train_loss) == 10 and run.eval_steps == [1, 5, 10]
    with pytest.raises(ValueError, match="schedule must be one of"):
        run_one(task, Config("adamw", "adamw", {}), 1e-3, seed=0, schedule="linear")


def test_state_bytes_counts_shared_storage_once_and_nested_lists():
    model = torch.nn.Linear(4, 3, bias=False)
    opt = make_optimizer("adamw", model, lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert state_bytes(opt) == 2 * 12 * 4 + 4  # exp_avg, exp_avg_sq, float32 step
    shared = torch.zeros(10)
    opt.state[model.weight]["extra"] = [shared[:5], shared[5:], {"again": shared}]
    assert state_bytes(opt) == 2 * 12 * 4 + 4 + 40


def test_steps_to_reach():
    assert steps_to_reach([1, 10, 20], [5.0, 2.0, 1.0], 2.0) == 10
    assert steps_to_reach([1, 10, 20], [5.0, 2.0, 1.0], 0.5) is None


def test_channel_spread_reparametrisation_keeps_the_function_and_spreads_scales():
    spec = PretrainSpec(hidden=32, length=12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _make_lm(spec).eval()
    state = model.state_dict()
    spread = spread_channel_scales(state, spec, 10.0, seed=3)
    assert spread_channel_scales(state, spec, 1.0, seed=3) is state
    norm = spread["model.layers.0.input_layernorm.weight"] / state["model.layers.0.input_layernorm.weight"]
    assert norm.max() / norm.min() > 3  # the LoRA inputs' channel scales really are uneven
    other = _make_lm(spec).eval()
    other.load_state_dict(spread)
    x = torch.randint(spec.vocab, (3, spec.length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_markov_tables_zipf_frequencies_and_shift():
    P, base = markov_table(32, seed=7, sharpness=3.0, zipf=1.0)
    assert torch.allclose(P.sum(-1), torch.ones(32, 32))
    mean_next = P.mean((0, 1))
    assert mean_next[:4].sum() > 2 * mean_next[-4:].sum()  # low ranks are the frequent words
    shifted, (U, W, rank) = markov_table(32, seed=8, base=base, change=0.6, reshuffle=0.5, sharpness=3.0, zipf=1.0)
    assert 0 < (U != base[0]).any(1).sum() <= round(0.6 * 32) and 0 < (W != base[1]).any(1).sum() <= round(0.6 * 32)
    assert sorted(rank.tolist()) == sorted(base[2].tolist()) and (rank != base[2]).any()  # ranks permuted
    assert (shifted - P).abs().sum(-1).mean() > 0.5  # a large shift in total variation


def test_t3_pipeline_flag_picks_the_base_model(tmp_path, tiny_pipeline_dir):
    bench = load()
    argv = ["--quick", "--tasks", "T3", "--optimizers", "adamw"]
    shipped = bench.main(argv + ["--out", str(tmp_path / "a")])["tasks"]["T3"]["reference"]
    random = bench.main(argv + ["--out", str(tmp_path / "b"), "--t3-pipeline", str(tiny_pipeline_dir)])["tasks"]["T3"]["reference"]
    torch.set_num_threads(1)
    # the random-weight pipeline denoises far worse than the pretrained one it replaces
    assert random["base_heldout_loss"] > 2 * shipped["base_heldout_loss"]
