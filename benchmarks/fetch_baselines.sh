#!/usr/bin/env bash
# Unpacks the pure-Python baselines the GPU machine lacks (it has no internet) into benchmarks/.vendor/
# (git-ignored), so that they travel with the working tree to that machine:
#
#   bash benchmarks/fetch_baselines.sh     # here, with PyPI reachable
#   run(command=..., carry=["benchmarks/.vendor"])   # the device tool; gpu_check.sh puts it on PYTHONPATH
#
# Liger-Kernel 0.8.5 (the version ../shared/BASELINES.md measured): its fused linear cross-entropy is
# the baseline of bench_fused_linear_logprob.py. It is Triton code only (needs torch and triton, both there).
set -euo pipefail
cd "$(dirname "$0")"
VENDOR=.vendor
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python -m pip --disable-pip-version-check -q download --no-deps "liger-kernel==0.8.5" -d "$TMP"
rm -rf "$VENDOR/liger_kernel" "$VENDOR"/liger_kernel-*.dist-info
mkdir -p "$VENDOR"
python -m zipfile -e "$TMP"/liger_kernel-0.8.5-py3-none-any.whl "$VENDOR"
PYTHONPATH="$PWD/$VENDOR" python -c "import liger_kernel.ops.fused_linear_cross_entropy; print('liger_kernel 0.8.5 in benchmarks/$VENDOR')"
