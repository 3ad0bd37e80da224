"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time, and nowhere in
the library itself. Tests marked ``gpu`` are skipped when CUDA is not available.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
# The tests use small tensors: one intra-op thread is faster for them, and avoids OpenMP
# threads spinning against each other when the machine's two cores are shared.
if not HAS_CUDA:
    torch.set_num_threads(1)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device Triton tests run on: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def record_value(request):
    """record_value(what, value): a measured number worth keeping from a (GPU) test run, e.g. the bf16 error
    ratio against PyTorch. Appended as "test id | what | value" to ``$OUT/measured.txt`` when OUT is set
    (benchmarks/gpu_check.sh sets it and copies the file into its summary); a no-op otherwise."""
    def record(what: str, value) -> None:
        out = os.environ.get("OUT")
        if out:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            with open(os.path.join(out, "measured.txt"), "a") as f:
                f.write(f"{request.node.nodeid} | {what} | {text}\n")
    return record


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
