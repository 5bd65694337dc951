#!/usr/bin/env bash
# Run the test suite against the newest releases of every dependency.
#
#   bash scripts/check_latest.sh [extra pytest args]
#
# Creates a scratch venv in a temp dir, installs torch==2.13.0 (the tested build; the only one
# pinned), then the project with its test extra and no constraints file, so every other
# dependency resolves to its newest release that pyproject.toml admits. Prints the resolved
# versions of the key packages, runs `python -m pytest -q [args]` from the repository root and
# exits with pytest's status. The venv is removed on exit. Nothing outside the temp dir is
# written except what `pip install -e` writes into the checkout (*.egg-info, ignored by git).
#
# Environment knobs:
#   PYTHON=python3.11     interpreter for the venv (default python3)
#   TORCH_PIP_ARGS="..."  extra pip arguments for the torch install only (e.g. an --index-url
#                         of a CPU wheel index, where the default index would bring a CUDA build)
#   UNCAPPED=1            ignore pyproject's upper bounds (`<`, `<=`): install the direct
#                         dependencies newest-first without them, then the project with --no-deps.
#                         This is the check for lifting a cap such as transformers<5.24.
#   FREEZE_TO=path        also write `pip freeze` of the venv there (candidate constraints.txt)
#   KEEP_VENV=1           keep the temp dir and print its path
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/adaprelora-latest.XXXXXX")"
cleanup() {
    if [[ "${KEEP_VENV:-0}" == 1 ]]; then echo "check_latest: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

export PIP_DISABLE_PIP_VERSION_CHECK=1
# Keep torch at the tested build whatever a newer dependency might ask for: a resolver that
# wanted another torch would otherwise pull a multi-GB CUDA build instead of failing fast.
echo "torch==2.13.0" > "$work/torch-pin.txt"

echo "== scratch venv in $work/venv ($("$python" --version))"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
# pip's output goes to a log, shown only when a step fails (keeps the report readable).
quiet_pip() {
    if ! pip "$@" >"$work/pip.log" 2>&1; then
        cat "$work/pip.log" >&2
        echo "check_latest: pip $* failed" >&2
        return 1
    fi
}
# shellcheck disable=SC2086
quiet_pip install ${TORCH_PIP_ARGS:-} "torch==2.13.0"
if [[ "${UNCAPPED:-0}" == 1 ]]; then
    # [project] dependencies and the test extra, with every `<` / `<=` clause dropped.
    "$python" - "$repo/pyproject.toml" >"$work/uncapped.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    req, _, marker = req.partition(";")
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)\s*(.*)", req)
    spec = ",".join(c.strip() for c in m.group(2).split(",") if c.strip() and not c.strip().startswith("<"))
    print(m.group(1) + spec + (";" + marker if marker else ""))
EOF
    echo "== UNCAPPED=1: direct dependencies without pyproject's upper bounds:" $(cat "$work/uncapped.txt")
    quiet_pip install -c "$work/torch-pin.txt" -r "$work/uncapped.txt"
    quiet_pip install --no-deps -e "$repo"
    what="newest releases, pyproject's upper bounds ignored"
else
    quiet_pip install -c "$work/torch-pin.txt" -e "$repo[test]"
    what="newest releases admitted by pyproject.toml"
fi

echo "== resolved versions ($what)"
python "$repo/scripts/print_versions.py"
pip check || echo "check_latest: pip check reports conflicts (above); running the tests anyway"
if [[ -n "${FREEZE_TO:-}" ]]; then
    # torch's local label (+cpu) is dropped so the file also fits a machine with a CUDA build.
    pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' > "$FREEZE_TO"
    echo "== pip freeze written to $FREEZE_TO"
fi

echo "== python -m pytest -q $*"
cd "$repo"
# A private temp dir and Hugging Face home: no cached hub files or pytest temp dirs leak in.
mkdir -p "$work/tmp" "$work/hf-home"
status=0
TMPDIR="$work/tmp" HF_HOME="$work/hf-home" python -m pytest -q "$@" || status=$?
echo "check_latest: pytest exited with $status"
exit "$status"
