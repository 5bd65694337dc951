#!/usr/bin/env bash
# Run the test suite against the lowest versions pyproject.toml admits for the direct dependencies.
#
#   bash scripts/check_floors.sh [extra pytest args]
#
# Reads [project] dependencies and the `test` extra from pyproject.toml, turns every lower bound
# `name>=X` into the pin `name==X` (torch excepted: it stays at the tested torch==2.13.0, the only
# build this project's machines install), and installs the project with those pins as constraints
# in a scratch venv. Indirect dependencies resolve to their newest releases compatible with the
# pins (the same idea as `uv pip install --resolution lowest-direct`). Prints the pins and the
# resolved versions, runs `python -m pytest -q [args]` from the repository root and exits with
# pytest's status. The venv is removed on exit.
#
# A floor that fails here is not an honest floor: raise it in pyproject.toml and run again.
#
# Environment knobs:
#   PYTHON=python3.11     interpreter for the venv (default python3; needs 3.11+ for tomllib)
#   TORCH_PIP_ARGS="..."  extra pip arguments for the torch install only (e.g. an --index-url
#                         of a CPU wheel index, where the default index would bring a CUDA build)
#   FLOOR_OVERRIDES="diffusers==0.35.0 ..."  replace pins (to try a candidate floor before
#                         editing pyproject.toml)
#   KEEP_VENV=1           keep the temp dir and print its path
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/adaprelora-floors.XXXXXX")"
cleanup() {
    if [[ "${KEEP_VENV:-0}" == 1 ]]; then echo "check_floors: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip's output goes to a log, shown only when a step fails (keeps the report readable).
quiet_pip() {
    if ! pip "$@" >"$work/pip.log" 2>&1; then
        cat "$work/pip.log" >&2
        echo "check_floors: pip $* failed" >&2
        return 1
    fi
}

# Pins from pyproject.toml's lower bounds.
"$python" - "$repo/pyproject.toml" "${FLOOR_OVERRIDES:-}" >"$work/floors.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
overrides = {}
for pin in sys.argv[2].split():
    name, _, ver = pin.partition("==")
    overrides[re.sub(r"[-_.]+", "-", name).lower()] = ver
pins = {}
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)", req)
    name, spec = re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(3)
    floor = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
    if name == "torch":
        continue  # tested at torch==2.13.0 only (see the header)
    if not floor:
        sys.exit(f"check_floors: {req!r} has no lower bound (>=) to test")
    pins[name] = floor[0]
for name, ver in overrides.items():
    pins[name] = ver
for name, ver in pins.items():
    print(f"{name}=={ver}")
EOF
echo "torch==2.13.0" >>"$work/floors.txt"

echo "== pins (lowest admitted versions of the direct dependencies)"
sed 's/^/  /' "$work/floors.txt"

echo "== scratch venv in $work/venv ($("$python" --version))"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
# shellcheck disable=SC2086
quiet_pip install ${TORCH_PIP_ARGS:-} "torch==2.13.0"
quiet_pip install -c "$work/floors.txt" -e "$repo[test]"

echo "== resolved versions"
python "$repo/scripts/print_versions.py"
pip check || echo "check_floors: pip check reports conflicts (above); running the tests anyway"

echo "== python -m pytest -q $*"
cd "$repo"
# A private temp dir and Hugging Face home: no cached hub files or pytest temp dirs leak in.
mkdir -p "$work/tmp" "$work/hf-home"
status=0
TMPDIR="$work/tmp" HF_HOME="$work/hf-home" python -m pytest -q "$@" || status=$?
echo "check_floors: pytest exited with $status"
exit "$status"
