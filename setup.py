"""Build onepass: the Python package, the Triton kernels and the compiled module ``onepass._C``.

``onepass._C`` is built by CMake (``CMakeLists.txt``) with pybind11.  The CPU kernels are always
built; the CUDA kernels are built when a CUDA compiler is found.  ``ONEPASS_CUDA=1`` makes CUDA
mandatory (a compile error fails the build), ``ONEPASS_CUDA=0`` turns it off, unset means "auto".
``ONEPASS_CUDA_ARCHS`` overrides the CUDA architectures (default ``80;90``).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("ONEPASS_CUDA", "auto").lower()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DONEPASS_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("ONEPASS_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['ONEPASS_CUDA_ARCHS']}")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


def _subpackages(root: str, prefix: str) -> list[str]:
    """``prefix`` and every package below ``root`` (a directory holding ``__init__.py``)."""
    base = ROOT / root
    return [prefix] + sorted(prefix + "." + ".".join(p.parent.relative_to(base).parts)
                             for p in base.rglob("__init__.py") if p.parent != base)


TRAIN = ["transformers>=4.56", "tokenizers", "datasets", "omegaconf", "tqdm", "safetensors", "matplotlib"]
BENCH = ["matplotlib", "rich", "psutil"]

setup(
    name="onepass",
    version="0.1.0",
    description="Fused one-pass-over-the-vocabulary kernels for RL and distillation post-training",
    package_dir={"onepass": "python/onepass", "onepass.triton_kernels": "triton_kernels"},
    packages=_subpackages("python/onepass", "onepass") + ["onepass.triton_kernels"],
    ext_modules=[CMakeExtension("onepass._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "train": TRAIN,                        # onepass-train: configs, tiny models, data, progress, plots
        "bench": BENCH,                        # python -m onepass.bench: progress bar, tables, plot
        "integrations": ["trl>=1.16"],
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "pot", "trl>=1.16", "peft", *TRAIN, *BENCH],
        "peers": ["liger-kernel", "cut-cross-entropy", "pot", "trl>=1.16"],
    },
    entry_points={"console_scripts": ["onepass-train=onepass.train.cli:main"]},
    zip_safe=False,
)
