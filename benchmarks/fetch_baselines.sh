#!/usr/bin/env bash
# Unpacks the pure-Python baselines the GPU machine lacks (it has no internet) into benchmarks/.vendor/
# (git-ignored), so that they travel with the working tree to that machine:
#
#   bash benchmarks/fetch_baselines.sh     # here, with PyPI reachable
#   run(command=..., carry=["benchmarks/.vendor"])   # the device tool; gpu_check.sh puts it on PYTHONPATH
#
# Liger-Kernel 0.8.5 (the version ../shared/BASELINES.md measured): its fused linear cross-entropy is
# the baseline of bench_fused_linear_logprob.py. It is Triton code only (needs torch and triton, both there).
# Also pytest-xdist 3.8.0 + execnet 2.1.2 (pure Python) into .vendor/xdist_site, NOT on PYTHONPATH by default:
# gpu_check.sh adds it for its pytest steps after checking that the machine's pytest loads it, and then runs
# the tests on several workers (the kernel tests are mostly Triton compiles, single-threaded each; 16 cores).
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

python -m pip --disable-pip-version-check -q download --no-deps "pytest-xdist==3.8.0" "execnet==2.1.2" -d "$TMP/xdist"
rm -rf "$VENDOR/xdist_site"
mkdir -p "$VENDOR/xdist_site"
for whl in "$TMP"/xdist/*.whl; do python -m zipfile -e "$whl" "$VENDOR/xdist_site"; done
PYTHONPATH="$PWD/$VENDOR/xdist_site" python -c "import xdist, execnet; print('pytest-xdist', xdist.__version__, 'in benchmarks/$VENDOR/xdist_site')"
