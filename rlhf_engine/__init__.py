"""rlhf_engine: a compact PPO RLHF engine for PyTorch with hand-written Triton and CUDA kernels."""
from .config import EngineConfig

__version__ = "0.1.0"


def __getattr__(name):  # Engine pulls in the model stack: import it on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'rlhf_engine' has no attribute {name!r}")


__all__ = ["Engine", "EngineConfig", "__version__"]
