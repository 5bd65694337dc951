"""benchmarks/gpu_check.py: the prepared GPU check, rehearsed on the CPU with tiny shapes so it never rots.

The smoke run goes through scripts/gpu_check.sh, the one command a GPU machine runs, and every
section must come back ok with sane figures; --sections, the failure isolation and the time
budgets are checked in-process on cheap sections.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from . import load_benchmark
from .test_optimizer_step import _independent_state_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `--smoke` run of every section through scripts/gpu_check.sh: (payload, markdown, log, exit status, out, work)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out, work = tmp / "out", tmp / "work"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp / "site"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--work", str(work)],
                          env=env, capture_output=True, text=True, timeout=900)
    payload = json.loads((out / "gpu_check.json").read_text())
    return payload, (out / "gpu_check.md").read_text(), (out / "gpu_check.log").read_text(), done, out, work


def test_smoke_runs_every_section_and_leaves_the_files(smoke):
    payload, markdown, log, done, out, _ = smoke
    bench = load_benchmark("gpu_check")
    statuses = {name: r["status"] for name, r in payload["sections"].items()}
    assert statuses == {name: "ok" for name in bench.SECTIONS}, {n: r.get("error") for n, r in payload["sections"].items()}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert payload["smoke"] is True and payload["device"].startswith("CPU")
    assert markdown.startswith("# gpu_check: smoke run")
    for title in bench.TITLES.values():
        assert f"## {title}" in markdown and f"## {title}" in log  # written, and printed as each section ends
    assert "**error**" not in markdown
    env = payload["sections"]["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["diffusers"]
    # --render reprints the same tables from the saved file
    rendered = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--render", str(out / "gpu_check.json")],
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0 and rendered.stdout.strip() == markdown.strip()


def test_smoke_optimizer_step_rows_and_state_bytes(smoke):
    payload = smoke[0]
    bench = load_benchmark("gpu_check")
    section = payload["sections"]["optimizer"]
    plan = payload["plan"]
    ranks = [s["rank"] for s in section["sets"]]
    assert ranks == [*plan["opt_ranks"], plan["opt_llama_rank"]]
    assert [len(s["shapes"]) for s in section["sets"]] == [plan["opt_layers"]] * len(plan["opt_ranks"]) + [7]
    rows = {(r["set"], r["rank"], r["optimizer"]): r for r in section["rows"]}
    assert len(rows) == len(section["rows"]) == len(section["sets"]) * len(bench.STEP_CONFIGS)
    for s in section["sets"]:
        mine = {label: rows[s["set"], s["rank"], label] for label in bench.STEP_CONFIGS}
        for row in mine.values():
            assert row["step_ms"] > 0 and row["backward_ms"] > 0 and len(row["step_ms_per_repeat"]) == plan["opt_repeats"]
            assert isinstance(row["launches"], int) and row["launches"] > 0
            assert row["lora_params"] == sum((i + o) * s["rank"] for i, o in s["shapes"])
        assert mine["adamw[foreach]"]["x_adamw_foreach"] == 1.0 and mine["adamw[fused]"]["x_adamw_fused"] == 1.0
        assert mine["adamw[fused]"]["launches"] < mine["adamw[foreach]"]["launches"]  # one fused op against many
        # AdamW: exp_avg and exp_avg_sq of A (r x in) and B (out x r), and a float32 step per factor
        adamw = 4 * sum(2 * (i + o) * s["rank"] + 2 for i, o in s["shapes"])
        assert mine["adamw[fused]"]["state_bytes"] == mine["adamw[foreach]"]["state_bytes"] == adamw
        # torch's Adafactor on each factor: its row and column statistics and a step
        assert mine["adafactor"]["state_bytes"] == 4 * sum(i + o + 2 * s["rank"] + 2 for i, o in s["shapes"])
        assert 0 < mine["adaprelora"]["state_bytes"] < adamw
        assert mine["adaprelora"]["state_x_adamw"] == pytest.approx(mine["adaprelora"]["state_bytes"] / adamw)

    # AdaPreLoRA's state counted independently, on a model and optimizer built and stepped like the section's
    from benchmarks import optimizer_step as step_bench

    from adaprelora_diffusion.optim import make_optimizer

    s = section["sets"][0]
    weights = step_bench.base_weights([("w", i, o) for i, o in s["shapes"]], torch.device("cpu"), torch.float32)
    model = step_bench.build(weights, s["rank"], "trained")
    optimizer = make_optimizer("adaprelora", model, lr=section["lr"])
    optimizer.zero_grad(set_to_none=True)
    model(step_bench.make_inputs(weights, section["tokens"])).backward()
    optimizer.step()
    expected = _independent_state_bytes(optimizer)
    optimizer.close()
    assert rows[s["set"], s["rank"], "adaprelora"]["state_bytes"] == expected


def test_smoke_training_sampling_and_llm_rows(smoke):
    payload, _, _, _, _, work = smoke
    plan, sections = payload["plan"], payload["sections"]
    db = sections["dreambooth"]
    assert sorted((r["batch"], r["optimizer"]) for r in db["rows"]) == sorted(
        (b, o) for b in plan["db_batches"] for o in ("adamw", "adaprelora"))
    for row in db["rows"]:
        assert row["steps_done"] == plan["db_warmup"] + plan["db_steps"] and row["timed_steps"] == plan["db_steps"]
        assert row["steps_per_s"] == pytest.approx(1e3 / row["step_ms"]) and row["steps_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["batch"] * row["steps_per_s"])
        assert 0 < row["optimizer_step_ms"] < row["step_ms"] and 0 < row["optimizer_share"] < 1
        assert row["peak_rss_mib"] > 0 and Path(row["lora"]).is_file() and work in Path(row["lora"]).parents
        assert row["x_adamw"] == (1.0 if row["optimizer"] == "adamw" else pytest.approx(row["step_ms"] / next(
            r["step_ms"] for r in db["rows"] if r["optimizer"] == "adamw" and r["batch"] == row["batch"])))
    assert db["build_s"] > 0 and db["folder_mib"] > 0

    sampling = sections["sampling"]
    trained = next(r for r in db["rows"] if r["optimizer"] == "adaprelora" and r["batch"] == plan["db_batches"][0])
    assert Path(sampling["lora"]) == Path(trained["lora"]).parent  # the LoRA the dreambooth section trained
    assert [r["lora"] for r in sampling["rows"]] == ["unfused", "fused"]
    assert all(r["s_per_image"] > 0 and r["spread_s"]["n"] == plan["sample_repeats"] for r in sampling["rows"])
    assert 0 <= sampling["fused_vs_unfused_max_abs_diff"] < 1

    llm = sections["llm"]
    assert sorted((r["batch"], r["optimizer"]) for r in llm["rows"]) == sorted(
        (b, o) for b in plan["llm_batches"] for o in ("adamw", "adaprelora"))
    for row in llm["rows"]:
        assert row["timed_steps"] == plan["llm_steps"] and row["lora_params"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * plan["llm_seq"] * 1e3 / row["step_ms"])
    assert llm["params"] > 0 and llm["lora_targets"] == "all-linear"

    sdxl = sections["sdxl"]
    assert sorted(r["optimizer"] for r in sdxl["rows"]) == ["adamw", "adaprelora"]
    assert all(r["steps_per_s"] > 0 and r["timed_steps"] == plan["sdxl_steps"] for r in sdxl["rows"])
    assert sdxl["gradient_checkpointing"] is True and sdxl["resolution"] == plan["sdxl_resolution"]


def test_fits_rule():
    bench = load_benchmark("gpu_check")
    assert bench.fits(20_000, 500) == {"needs_mib": 21_012, "fits_24gb": True, "fits_16gb": False}
    assert bench.fits(15_000, 500)["fits_16gb"] is True and bench.fits(16_000, 500)["fits_16gb"] is False


def test_sections_pick_what_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what main() sets for itself; restored after the test
    bench = load_benchmark("gpu_check")
    status = bench.main(["--smoke", "--sections", "llm", "environment", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and list(payload["sections"]) == ["environment", "llm"]  # run in the canonical order
    assert payload["sections_requested"] == ["environment", "llm"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## LLM LoRA training" in markdown and "## Optimizer step" not in markdown
    assert "| 1 | adaprelora |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--sections", "nonsense", "--out", str(tmp_path)])


def test_a_failing_or_slow_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    bench = load_benchmark("gpu_check")

    def breaks_after_a_row(check, result):
        result["rows"] = [{"set": "SD 1.5 attention", "layers": 1, "rank": 2, "optimizer": "adamw[foreach]", "step_ms": 1.0,
                           "step_ms_per_repeat": [1.0], "backward_ms": 1.0, "x_adamw_foreach": 1.0, "x_adamw_fused": None,
                           "launches": 3, "launch_unit": "aten ops (CPU)", "state_bytes": 8, "state_x_adamw": 1.0}]
        check.save()
        raise RuntimeError("boom")

    def hangs(check, result):
        while True:
            time.sleep(0.05)

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(bench, "MIN_SECTION_S", 0.5)
    monkeypatch.setitem(bench.RUNNERS, "optimizer", breaks_after_a_row)
    monkeypatch.setitem(bench.RUNNERS, "dreambooth", hangs)
    monkeypatch.setattr(bench, "SMOKE", bench.dataclasses.replace(bench.SMOKE, budgets_s={**bench.SMOKE.budgets_s, "dreambooth": 1.0}))
    status = bench.main(["--smoke", "--sections", "environment", "optimizer", "dreambooth", "--out", str(tmp_path)])
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert status == 1
    assert sections["environment"]["status"] == "ok"
    assert sections["optimizer"]["status"] == "error" and "RuntimeError: boom" in sections["optimizer"]["error"]
    assert len(sections["optimizer"]["rows"]) == 1  # what was measured before the failure is kept
    assert sections["dreambooth"]["status"] == "timeout" and 0.9 < sections["dreambooth"]["seconds"] < 30
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "**error** after" in markdown and "What finished before that:" in markdown and "**timeout** after" in markdown

    # a run whose time limit is spent skips the sections it has no time for
    monkeypatch.setattr(bench, "SMOKE", bench.dataclasses.replace(bench.SMOKE, budgets_s={**bench.SMOKE.budgets_s, "dreambooth": 60.0}))
    status = bench.main(["--smoke", "--sections", "dreambooth", "llm", "--time_limit", "1.5", "--out", str(tmp_path)])
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert status == 1 and sections["dreambooth"]["status"] == "timeout" and sections["llm"]["status"] == "skipped"


def test_the_wheel_script_parses_and_fetches_constraints_pins():
    """scripts/gpu_check_wheels.sh (run by hand, with network) carries the tested versions of what the GPU image lacks."""
    import re

    script = ROOT / "scripts" / "gpu_check_wheels.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    (names,) = re.findall(r"^packages=\((.*)\)$", script.read_text(), flags=re.M)
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert set(names.split()) == {"diffusers", "peft"} and set(names.split()) <= pinned
