#!/usr/bin/env bash
# Put into .whl/ the wheels that scripts/gpu_check.sh installs on the GPU machine (docs/gpu.md).
#
#   bash scripts/gpu_check_wheels.sh
#
# That machine has Python 3.12 with its own torch (a CUDA build), transformers, accelerate,
# safetensors, pillow, numpy, huggingface_hub, tokenizers, requests, regex, filelock, ... but no
# diffusers and no network. What it lacks travels as wheels: diffusers (its other needs are all
# there), and peft at our tested version (the image's peft may be older than our floor). Both are
# pure Python; the versions are constraints.txt's pins (the tested set), downloaded for CPython 3.12
# on x86-64 here, where there is network. .whl/ is git-ignored (never committed); a device call
# names it in `carry`. The folder is emptied first: two versions of one package stop the install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
packages=(diffusers peft)

pins=()
for name in "${packages[@]}"; do
    pin="$(grep -i "^${name}==" constraints.txt)" || { echo "gpu_check_wheels: no ${name}== pin in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
git check-ignore -q .whl/x.whl || { echo "gpu_check_wheels: .whl/ is not git-ignored; add /.whl/ to .gitignore" >&2; exit 1; }
rm -rf .whl
mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
for wheel in .whl/*.whl; do
    case "$wheel" in *-none-any.whl) ;; *) echo "gpu_check_wheels: $wheel is not pure Python; check it runs there" >&2 ;; esac
done
ls -l .whl
echo "gpu_check_wheels: $(du -sh .whl | cut -f1) in .whl (the device call carries it: carry [\".whl\"])"
