"""The README's promises: its test command is what CI runs, and its commands exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- (run|test) command -->\s*```(?:bash|sh)?\n(.*?)\n```", text, flags=re.S)
    return {kind: body.strip() for kind, body in blocks}


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert set(commands) == {"run", "test"}
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands["test"] in ci_lines


def test_readme_run_command_points_at_existing_files():
    run = readme_commands()["run"]
    scripts = re.findall(r"python (\S+\.py)", run)
    assert scripts and all((ROOT / s).is_file() for s in scripts)


def test_readme_speed_table_is_the_saved_benchmark_run():
    """The README's step-cost figures are those of benchmarks/results/optimizer_step.json, which
    `python benchmarks/optimizer_step.py --render` reprints (and the command re-measures)."""
    import json

    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (B = 0|trained B) \| ([\d.]+) \[([\d.]+)-([\d.]+)\] \| ([\d.]+) \|$", text, flags=re.M)
    assert len(rows) == 4
    saved = json.loads((ROOT / "benchmarks" / "results" / "optimizer_step.json").read_text())
    by = {(r["rank"], r["optimizer"], r["start"]): r for r in saved["results"]}
    for rank, start, ratio, low, high, state in rows:
        row = by[(int(rank), "adaprelora", "b0" if start == "B = 0" else "trained")]
        adamw = by[(int(rank), "adamw", row["start"])]
        assert (ratio, low, high) == tuple(f"{row[k]:.2f}" for k in ("ratio", "ratio_min", "ratio_max"))
        assert state == f"{row['state_bytes'] / adamw['state_bytes']:.3f}"
