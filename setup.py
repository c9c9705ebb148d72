"""Builds mftk._C (CPU ops from csrc/*.cpp) and, on CUDA builds of torch, csrc/cuda/*.cu.

Switches:
  MFTK_SKIP_CUDA_BUILD=1   never build the CUDA sources.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> tuple[bool, str]:
    if os.environ.get("MFTK_SKIP_CUDA_BUILD", "0") == "1":
        return False, "MFTK_SKIP_CUDA_BUILD=1"
    import torch

    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found"
    return True, ""


def _extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    with_cuda, why = _want_cuda()
    if with_cuda and cuda_sources:
        return [
            cpp_extension.CUDAExtension(
                "mftk._C",
                cpu_sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=[("MFTK_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            )
        ]
    print(f"mftk: building the CPU extension only ({why or 'no CUDA sources'})")
    return [
        cpp_extension.CppExtension(
            "mftk._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
        )
    ]


setup(
    packages=find_packages(include=["mftk", "mftk.*"]) + ["mftk.kernels"],
    package_dir={"mftk.kernels": "kernels"},
    package_data={"mftk": ["configs/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
