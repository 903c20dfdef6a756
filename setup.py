"""Build script for hmedn_fast's compiled extension ``hmedn_fast._C``.

The C++ sources in ``csrc/`` are always compiled (CPU kernels, op registration). The CUDA sources in
``kernels/`` are added when the installed torch has CUDA and ``nvcc`` is found (or ``HMEDN_FORCE_CUDA=1``).
``HMEDN_NO_EXTENSION=1`` skips the extension entirely (pure-Python install; every op then falls back to
its reference implementation).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("HMEDN_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pragma: no cover - torch is a build requirement
        print("hmedn_fast: torch not importable at build time; building without the extension", file=sys.stderr)
        return [], {}

    root = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("kernels", "*.cu")))
    if not cpp_sources:
        return [], {}

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++17"] + openmp
    want_cuda = os.environ.get("HMEDN_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and (cpp_extension.CUDA_HOME is not None or shutil.which("nvcc"))
    )
    if want_cuda and cu_sources:
        # Without TORCH_CUDA_ARCH_LIST: Ampere and Hopper binaries (sm_90a: kernels/conv3x3.cu's wgmma forward), plus
        # Hopper PTX that newer GPUs compile when loading. Given flags make torch add no arch flags of its own.
        arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_90,code=compute_90"]
        ext = cpp_extension.CUDAExtension(
            "hmedn_fast._C",
            sources=cpp_sources + cu_sources,
            include_dirs=[os.path.join(root, "kernels"), os.path.join(root, "csrc")],
            define_macros=[("HMEDN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *arch]},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "hmedn_fast._C",
            sources=cpp_sources,
            include_dirs=[os.path.join(root, "csrc"), os.path.join(root, "kernels")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
