"""Builds the single native extension ``clfast._C``.

CPU kernels are always compiled (OpenMP through ``at::parallel_for``). CUDA kernels are compiled when a GPU
is visible or ``FORCE_CUDA=1`` is set (so a GPU-less machine with nvcc still compiles them), and never when
``CLFAST_CPU_ONLY=1``. ``TORCH_CUDA_ARCH_LIST`` defaults to 8.0, 8.6 and 9.0; ``MAX_JOBS`` is honoured by
torch's ninja build.
"""
import glob
import os
import shutil


def _find_cuda_home():
    """torch takes CUDA_HOME from the nvcc on PATH, which may be a wrapper (/usr/local/bin/nvcc -> /usr/local);
    pick the first candidate that really holds the toolkit's headers."""
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + \
        ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = {}
with open(os.path.join(HERE, "clfast", "_version.py")) as f:
    exec(f.read(), VERSION)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _with_cuda() -> bool:
    if _flag("CLFAST_CPU_ONLY"):
        return False
    if _flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
        return True
    import torch

    return CUDA_HOME is not None and torch.cuda.is_available()


# The torch releases the code supports (requirements.txt pins the one the tests run with).
TORCH_SUPPORTED = ((2, 13), (2, 15))


def _torch_requirement() -> str:
    """The extension is compiled against the torch installed at build time and loads only with that release (with
    another one clfast falls back to its reference ops), so a build requires that release; a torch outside the
    supported range gets the supported range."""
    import torch

    (lo, hi), built = TORCH_SUPPORTED, tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if lo <= built < hi:
        return f"torch>={built[0]}.{built[1]},<{built[0]}.{built[1] + 1}"
    return f"torch>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    # csrc/ops.cpp (the schemas) and, per op family, csrc/<family>/*.cpp (front, CPU launchers) and *.cu (CUDA).
    sources = rel("csrc/*.cpp") + rel("csrc/*/*.cpp")
    # -O3 for auto-vectorised loops; no -march=native so a wheel runs on any x86-64: the hot loops are compiled
    # for AVX-512, AVX2 and baseline x86-64 and picked at load time (csrc/common/vectorize.h). -ffp-contract=off:
    # no clone fuses a multiply and an add, so every clone rounds like the baseline.
    # -fno-math-errno and -fno-trapping-math let sqrt and branchy element-wise code vectorise; the values are
    # unchanged (errno is never set, FP exceptions are never observed).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    ldflags = ["-fopenmp", "-ldl"]  # -ldl: dladdr/dlopen (csrc/common/blas.h) on glibc < 2.34
    if not _with_cuda():
        return CppExtension("clfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
    # No --use_fast_math: divisions and square roots must round like the CPU reference.
    nvcc = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "clfast._C",
        sources + rel("csrc/*/*.cu"),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=ldflags,
    )


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    README = f.read()

setup(
    name="clfast",
    version=VERSION["__version__"],
    description="Fused C++/CUDA kernels for continual learning (SI, EWC, replay, CBP, DAN) on PyTorch",
    long_description=README,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["clfast", "clfast.*"]),
    python_requires=">=3.10",
    install_requires=[_torch_requirement(), "nngeometry>=0.4,<0.5"],
    extras_require={
        "avalanche": ["avalanche-lib>=0.6,<0.7"],
        "experiments": ["continuum>=1.2.7,<1.3", "six", "numpy", "matplotlib"],  # continuum imports six undeclared
    },
    entry_points={"console_scripts": ["clfast = clfast.experiments.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
