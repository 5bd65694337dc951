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
