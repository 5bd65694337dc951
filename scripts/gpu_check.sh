#!/usr/bin/env bash
# The GPU check in one call: install the carried wheels (no network needed), run
# benchmarks/gpu_check.py under a hard time limit, and leave gpu_check.md, gpu_check.json and
# gpu_check.log in $OUT.
#
#   bash scripts/gpu_check.sh [gpu_check.py arguments]     e.g. --sections optimizer dreambooth
#
# Written for the device machine (docs/gpu.md): Python 3.12 with its own torch (CUDA), transformers,
# accelerate, safetensors and pillow, but no diffusers and no network. scripts/gpu_check_wheels.sh
# fills .whl/ beforehand (with network); here those wheels are installed with --no-index --no-deps
# into a folder on PYTHONPATH, and the project runs from this checkout through PYTHONPATH (nothing
# is built or installed). Elsewhere it works the same; without .whl/ it uses what Python has.
#
# Environment: OUT (default ./gpu-check), PYTHON (default python3), GPU_CHECK_SITE (default
# /tmp/gpu_check_site), GPU_CHECK_TIMEOUT (seconds, default 450: the hard stop; gpu_check.py's own
# --time_limit, 420 s by default, skips or stops sections before it). Exit status: gpu_check.py's
# (0: every section ok, 1: some section failed or was cut, 124/137: the hard stop), 3: install failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-$PWD/gpu-check}"
python="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
mkdir -p "$out"
: >"$out/gpu_check.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing $(ls .whl/*.whl | wc -l) carried wheel(s) into $site: $(cd .whl && echo *.whl)"
    if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            >>"$out/gpu_check.log" 2>&1; then
        cat "$out/gpu_check.log" >&2
        echo "gpu_check.sh: installing the carried wheels failed (above)" >&2
        exit 3
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Everything the run prints (progress bars, warnings, tracebacks) goes to the log; the tables
# follow at the end, so that a short tail of this command's output holds them.
echo "gpu_check.sh: running benchmarks/gpu_check.py $*; log in $out/gpu_check.log"
timeout --kill-after=30 "${GPU_CHECK_TIMEOUT:-450}" "$python" benchmarks/gpu_check.py --out "$out" "$@" >>"$out/gpu_check.log" 2>&1
status=$?
[[ -f "$out/gpu_check.md" ]] && cat "$out/gpu_check.md"
grep -h "^gpu_check: " "$out/gpu_check.log" | tail -n 3
echo "gpu_check.sh: exit status $status; files in $out: $(cd "$out" && echo *)"
exit "$status"
