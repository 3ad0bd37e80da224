"""Build script: the Python packages plus the native extension ``rlhf_engine._C``.

The extension is compiled from ``csrc/`` with CMake + pybind11 (+ ninja when present).
It does not link against libtorch: the Python wrappers hand it raw pointers, sizes and
the current CUDA stream, so one build works with any torch version.

Environment variables (read only here, at build time):
  RLHF_ENGINE_CPU_ONLY=1          build the C++ CPU ops only, even if nvcc is found.
  RLHF_ENGINE_CUDA_ARCHS="80;90a" CUDA architectures (CMake list); default sm_80 and sm_90a.
  RLHF_ENGINE_BUILD_TYPE=Release  CMake build type.
  CUDACXX=/path/to/nvcc           which CUDA compiler to use (CMake's own variable).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("RLHF_ENGINE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DRLHF_ENGINE_EXT_SUFFIX={Path(self.get_ext_filename(ext.name)).name.split('.', 1)[1]}",
        ]
        if os.environ.get("RLHF_ENGINE_CPU_ONLY", "0") not in ("", "0"):
            args.append("-DRLHF_ENGINE_CPU_ONLY=ON")
        if "RLHF_ENGINE_CUDA_ARCHS" in os.environ:
            args.append(f"-DRLHF_ENGINE_CUDA_ARCHS={os.environ['RLHF_ENGINE_CUDA_ARCHS']}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", ext.source_dir, "-B", str(build_temp), *args], check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_temp), "--parallel", jobs], check=True)


setup(
    packages=[
        "rlhf_engine",
        "rlhf_engine.algo",
        "rlhf_engine.model",
        "rlhf_engine.generation",
        "rlhf_engine.trainer",
        "rlhf_engine.integrations",
        "rlhf_engine.kernels",
    ],
    package_dir={"rlhf_engine": "rlhf_engine", "rlhf_engine.kernels": "kernels"},
    package_data={"rlhf_engine": ["data/*.txt", "data/*.jsonl", "configs/*.yaml"]},
    ext_modules=[CMakeExtension("rlhf_engine._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
