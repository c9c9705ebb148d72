"""Builds mftk._C (CPU ops from csrc/*.cpp) and, on CUDA builds of torch, csrc/cuda/*.cu.

The objects live in a persistent folder, build/ninja-<python>-torch<version>/, so a reinstall
rebuilds only what changed in csrc/ (ninja), and an editable reinstall with nothing changed links
nothing either. Progress goes to the terminal while the compiler runs (pip hides the build's own
output unless -v).

Switches:
  MFTK_SKIP_CUDA_BUILD=1   never build the CUDA sources.
  MAX_JOBS=k               parallel compile jobs (ninja; default: all cores).
"""

import glob
import os
import shutil
import sys
import sysconfig
import threading
import time

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
HEADERS = sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("csrc/cuda/*.h"))


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
    # -fopenmp: at::parallel_for is a header template; without it the pragma is dropped and the
    # tiled kernels' one parallel region runs on one thread. On Linux libgomp.so.1 resolves to the
    # copy torch already loaded (same soname), so there is one OpenMP runtime. Elsewhere (macOS
    # clang has no -fopenmp) the tiles run on one thread; torch.ops.mftk.parallel_threads() says.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++20", *openmp]
    link = openmp
    with_cuda, why = _want_cuda()
    if with_cuda and cuda_sources:
        return [
            cpp_extension.CUDAExtension(
                "mftk._C",
                cpu_sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                depends=HEADERS,
                define_macros=[("MFTK_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
                extra_link_args=link,
            )
        ]
    print(f"mftk: building the CPU extension only ({why or 'no CUDA sources'})")
    return [
        cpp_extension.CppExtension(
            "mftk._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=HEADERS,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


def _say(msg: str) -> None:
    """A line on the user's terminal (pip captures the build's stdout/stderr), else stderr."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\r{msg}\n")
    except OSError:
        print(msg, file=sys.stderr, flush=True)


class _Progress:
    """Reports every few seconds how many objects of the build are up to date."""

    def __init__(self, objects: list[str], every: float = 10.0):
        self.objects, self.every = objects, every
        self.start = time.time()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _count(self) -> int:
        return sum(os.path.exists(o) and os.path.getmtime(o) >= self.start for o in self.objects)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            k, secs = self._count(), time.time() - self.start
            _say(f"mftk: compiling csrc/: {k}/{len(self.objects)} files done, {secs:.0f} s")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) with a persistent build folder and progress lines."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{sysconfig.get_platform()}-py{sys.version_info[0]}{sys.version_info[1]}"
        import torch

        tag += f"-torch{torch.__version__}"
        self.build_temp = os.path.join(ROOT, "build", f"ninja-{tag}")
        if self.inplace or getattr(self, "editable_mode", False):
            # Editable installs otherwise link into a fresh temp folder every time, so the
            # up-to-date check never sees the last build's library.
            self.build_lib = os.path.join(ROOT, "build", f"lib-{tag}")

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        objects = [
            os.path.join(self.build_temp, os.path.splitext(os.path.relpath(src, ROOT))[0] + ".o")
            for src in ext.sources
        ]
        stale = (
            self.force
            or not os.path.exists(target)
            or any(  # setup.py holds the compile flags
                os.path.getmtime(f) > os.path.getmtime(target)
                for f in [*ext.sources, *ext.depends, os.path.abspath(__file__)]
            )
        )
        if not stale:
            _say(f"mftk: {ext.name} is up to date ({os.path.relpath(target, ROOT)})")
            return
        _say(
            f"mftk: building {ext.name} from {len(ext.sources)} C++ files in "
            f"{os.path.relpath(self.build_temp, ROOT)}/ (ninja, incremental)"
        )
        t0 = time.time()
        with _Progress(objects):
            super().build_extension(ext)
        _say(f"mftk: built {ext.name} in {time.time() - t0:.0f} s")


setup(
    packages=find_packages(include=["mftk", "mftk.*"]) + ["mftk.kernels"],
    package_dir={"mftk.kernels": "kernels"},
    package_data={"mftk": ["configs/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
