#!/usr/bin/env bash
# Run a benchmark on the GPU machine from the repo root, without installing the package:
# blasst_kernels is the kernels/ folder under its package name.
#   bash benchmarks/gpu/run_bench.sh benchmarks/bench_kernels.py --quick
set -euo pipefail
mkdir -p /tmp/blasst_pkgs
ln -sfn "$PWD/kernels" /tmp/blasst_pkgs/blasst_kernels
ln -sfn "$PWD/blasst_sglang" /tmp/blasst_pkgs/blasst_sglang
export PYTHONPATH="/tmp/blasst_pkgs:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
python3 "$@"
