"""Builds normops._C: the op schemas, the CPU kernels and, when a CUDA
toolkit and a CUDA build of torch are present, the CUDA kernels.

Environment switches:
  NORMOPS_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU
                         (TORCH_CUDA_ARCH_LIST then says which architectures)
  NORMOPS_NO_CUDA=1      never build them
  DEBUG=1                -O0 -g
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("NORMOPS_NO_CUDA") == "1":
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    if os.environ.get("NORMOPS_FORCE_CUDA") == "1" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True
    return torch.cuda.is_available()


def extension():
    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                     + glob.glob("csrc/cpu/kernels/*.cpp"))
    # OpenMP: at::parallel_for is inlined into our code, and its pragmas need
    # -fopenmp to run in parallel. libgomp.so.1 is the one torch loaded.
    # -fno-trapping-math: the select-based half/bfloat16 conversions compute
    # both arms in float; assuming no FP traps lets GCC vectorise them.
    # -fno-math-errno: nothing reads errno, and a sqrt that may set it stays a
    # scalar call (folding 2048 channels' variances took 10 us).
    cxx = opt + ["-fopenmp", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno",
                 "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(
        name="normops._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if want_cuda() and cuda_sources:
        kwargs["sources"] = sources + cuda_sources
        kwargs["extra_compile_args"]["nvcc"] = opt + ["-lineinfo"]
        kwargs["define_macros"] = [("NORMOPS_WITH_CUDA", "1")]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


setup(
    name="normops",
    version="0.1.0",
    description="Fused normalization kernels for PyTorch (CPU and CUDA)",
    packages=find_packages(include=["normops", "normops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
