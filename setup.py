"""Builds the optional C++ CPU backend (``star_kernels._C``) from csrc/ with ninja.

STAR_KERNELS_BUILD_CPP=1 forces the build (an error if it fails), =0 skips it;
unset, the build is tried when csrc/ has sources and a C++ compiler is found,
and the package installs without it otherwise (the torch backend is used).
Without ninja on PATH (e.g. pip builds this package before installing the
``[test]`` extra's ninja), torch falls back to a slower serial build.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

mode = os.environ.get("STAR_KERNELS_BUILD_CPP", "auto").lower()
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
ext_modules, cmdclass = [], {}


def _put_ninja_on_path():
    """Use the ``ninja`` Python package's binary when no ninja is on PATH."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and os.path.isfile(os.path.join(bin_dir, "ninja")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


if mode not in ("0", "false", "no") and sources:
    have_compiler = shutil.which(os.environ.get("CXX", "c++")) is not None
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        BuildExtension = None
    if BuildExtension is not None and (have_compiler or mode in ("1", "true", "yes")):
        _put_ninja_on_path()
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        ext_modules = [CppExtension(
            "star_kernels._C", sources,
            extra_compile_args=["-O3", *openmp],
            extra_link_args=openmp,
        )]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    elif mode in ("1", "true", "yes"):
        raise RuntimeError("STAR_KERNELS_BUILD_CPP=1 but torch or a C++ compiler is missing")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
