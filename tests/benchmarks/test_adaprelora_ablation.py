"""Smoke run of the AdaPreLoRA ablation benchmark (--quick) and checks of its own pieces."""

import json
import math

import pytest
import torch

from tests.benchmarks import load_benchmark


def load():
    return load_benchmark("adaprelora_ablation")


def _no_nonstandard_json(token):
    raise AssertionError(f"non-standard JSON constant {token}")


def test_quick_run_writes_wellformed_outputs(tmp_path, capsys):
    bench = load()
    out = tmp_path / "out"
    payload = bench.main(["--quick", "--out", str(out)])
    torch.set_num_threads(1)
    printed = capsys.readouterr().out
    on_disk = json.loads((out / "adaprelora_ablation.json").read_text(), parse_constant=_no_nonstandard_json)
    markdown = (out / "adaprelora_ablation.md").read_text()
    assert markdown.strip() == printed.strip()
    assert on_disk["quick"] is True and on_disk["seeds"] == [0] and on_disk["report_seeds"] == [1]
    rows = {(r["section"], r["label"]): r for r in on_disk["rows"]}
    assert set(rows) == bench.QUICK_LABELS == {(r["section"], r["label"]) for r in payload["rows"]}
    assert on_disk["adamw_target"] == pytest.approx(rows["cosine", "adamw"]["final"]["excess_mse"]["mean"])
    assert on_disk["constant_adamw_target"] == pytest.approx(rows["constant", "adamw"]["final"]["excess_mse"]["mean"])
    full = on_disk["full_steps"]
    for (section, label), r in rows.items():
        assert r["steps"] == round(full * r["fraction"]) and r["best_lr"] in r["grid"]
        assert r["schedule"] == ("constant" if section == "constant" else "cosine")
        for m in ("excess_mse", "mse", "pop_excess"):
            assert math.isfinite(r["final"][m]["mean"]) and r["final"][m]["std"] == 0.0  # one report seed
        assert r["curve"]["steps"][-1] == r["steps"]
        assert r["curve"]["mean"][-1] == pytest.approx(r["final"]["excess_mse"]["mean"])
        assert r["steps_to_target"] is None or r["steps_to_target"] <= r["steps"]
        assert r["final_le_target"] == (r["final"]["excess_mse"]["mean"] <= r["target"])
        assert f"| {label} | {r['steps']} |" in markdown
    # paired differences: the reference row has none; the others equal the difference of the one seed's finals
    assert rows["cosine", "adaprelora"]["paired"]["excess_mse"] is None
    diff = rows["cosine", "beta1=0"]["paired"]["pop_excess"]["mean"]
    assert diff == pytest.approx(rows["cosine", "beta1=0"]["final"]["pop_excess"]["mean"]
                                 - rows["cosine", "adaprelora"]["final"]["pop_excess"]["mean"])
    assert rows["budget", "adaprelora@0.7"]["steps"] < full
    for key in ("erm", "erm_0.7"):
        assert all(math.isfinite(v["mean"]) for v in on_disk["reference"][key].values())
    assert "### lr sweeps of the cosine rows" in markdown
    # confirmation: the cosine and budget rows re-run at their picked lr on one more fresh seed
    conf = on_disk["confirm"]
    assert conf["seeds"] == [2] and [r["label"] for r in conf["rows"]] == ["adamw", "adaprelora", "beta1=0", "adaprelora@0.7"]
    assert conf["rows"][0]["paired_excess_mse"]["mean"] == 0.0 and conf["rows"][0]["wins_vs_adamw"] == 1
    assert conf["rows"][1]["paired_pop_excess_vs_default"] is None
    assert conf["rows"][2]["paired_pop_excess_vs_default"]["mean"] == pytest.approx(
        conf["rows"][2]["pop_excess"]["mean"] - conf["rows"][1]["pop_excess"]["mean"])
    assert [r["lr"] for r in conf["rows"]] == [rows["cosine", "adamw"]["best_lr"], rows["cosine", "adaprelora"]["best_lr"],
                                               rows["cosine", "beta1=0"]["best_lr"], rows["budget", "adaprelora@0.7"]["best_lr"]]
    assert "### confirmation" in markdown and "| adaprelora@0.7 | 21 |" in markdown


def test_population_excess_is_zero_at_the_oracle_and_erm_beats_nothing_learned():
    bench = load()
    task = bench.PopulationT1(steps=5, eval_every=5, n_eval=256)
    assert task._pop_error(task.oracle) - task._pop_oracle == pytest.approx(0.0, abs=1e-9)
    untrained = task.evaluate(task.build(0))  # B = 0: the LoRA has learned nothing yet
    assert untrained["pop_excess"] > 0.1
    erm = task.erm(0, 40)  # rank-r least squares on the first 40 minibatches of seed 0
    assert 0.0 <= erm["pop_excess"] < 0.01 * untrained["pop_excess"]
    x, _ = task.samples(0, 2)
    assert x.shape == (2 * task.batch, task.n)


def test_bad_flags_are_clear_errors(capsys, tmp_path):
    bench = load()
    for argv, message in ((["--seeds", "0"], "--seeds must be >= 1"), (["--only", "nope"], "unknown --only label"),
                          (["--confirm-seeds", "-1"], "--confirm-seeds must be >= 0")):
        with pytest.raises(SystemExit):
            bench.main(argv + ["--out", str(tmp_path)])
        assert message in capsys.readouterr().err
