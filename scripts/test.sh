#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite. Without a GPU, Triton kernels run under the
# interpreter and tests marked `gpu` are skipped (benchmarks/gpu_check.sh runs them on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m pytest -q tests "$@"
