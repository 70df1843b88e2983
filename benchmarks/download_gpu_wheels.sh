#!/usr/bin/env bash
# Download the wheels listed in benchmarks/gpu_wheels.txt (CPython 3.12, manylinux x86-64) into a folder, on a
# machine that reaches the package index, and check their sha256 against the list.
#
#     bash benchmarks/download_gpu_wheels.sh [FOLDER]        (default .whl, which git ignores)
#
# Then, on the GPU machine, from the repository root: bash benchmarks/gpu_check.sh FOLDER
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
list=benchmarks/gpu_wheels.txt
mkdir -p "$dest"
# name-version-... .whl -> name==version (wheel file names use '_' for '-' in the project name)
requirements=$(grep -v '^#' "$list" | awk 'NF == 2 {split($2, part, "-"); print part[1] "==" part[2]}')
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" $requirements
grep -v '^#' "$list" | (cd "$dest" && sha256sum --check --strict)
echo "downloaded $(grep -vc '^#' "$list") wheels into $dest ($(du -sh "$dest" | cut -f1));" \
    "copy the folder to the GPU machine"
