"""Builds vsops._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc
is present.

Environment switches (in the manner of flash-attn):
  VSOPS_SKIP_CUDA_BUILD=1   build the CPU kernels only, even where CUDA is available.
  VSOPS_CUDA_ARCHS="80;90"  compute capabilities to compile native code for (default: sm_80 and
                            sm_90); the PTX of the newest is embedded too, so newer GPUs run it.
  VSOPS_CPU_VEC=native|avx2|avx512|none
                            vector instruction set of the CPU kernels. The default, native,
                            takes the widest one the build machine has (like -march=native, the
                            build then needs that instruction set where it runs); set avx2 to
                            build for other x86 machines, none for portable scalar code.
  VSOPS_SANITIZE=1          build the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer
                            (-O1, every report fatal), for .ci/sanitize.sh; CUDA is not built. The
                            module then loads only with libasan preloaded (see that script).
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build).
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec picks its implementation from these macros; they must match the -m flags.
CPU_VEC_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
    "none": [],
}


def _relative(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _native_cpu_vec():
    """The widest instruction set of CPU_VEC_FLAGS this (x86, Linux) build machine has."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "none"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "avx2"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "none"


def _cpu_vec_flags():
    choice = os.environ.get("VSOPS_CPU_VEC", "native")
    if choice == "native":
        choice = _native_cpu_vec()
    if choice not in CPU_VEC_FLAGS:
        raise ValueError(f"VSOPS_CPU_VEC must be native or one of {sorted(CPU_VEC_FLAGS)}, got {choice!r}")
    print(f"vsops: CPU kernels built for {choice}")
    return CPU_VEC_FLAGS[choice]


def _cuda_gencode_flags():
    """nvcc's -gencode flags: native code for each listed arch, and the PTX of the newest one,
    which the driver compiles for GPUs newer than every listed arch (as flash-attn ships).
    .ci/nvcc_check.sh compiles with these same flags."""
    archs = os.environ.get("VSOPS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    archs = sorted({a.strip() for a in archs if a.strip()}, key=lambda a: int(a) if a.isdigit() else -1)
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"VSOPS_CUDA_ARCHS must list compute capabilities such as '80;90', got {archs}")
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = archs[-1]
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


# -O1 keeps the sanitized build quick to compile and its reports readable; -fno-sanitize-recover
# makes every UBSan report abort the process (ASan's always do), so no report can pass unseen.
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1",
]


def _sanitize():
    return os.environ.get("VSOPS_SANITIZE", "0") == "1"


def _build_cuda():
    if os.environ.get("VSOPS_SKIP_CUDA_BUILD", "0") == "1" or _sanitize():
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


def _extension():
    include_dirs = [os.path.join(ROOT, d) for d in ("csrc/include", "csrc", "python_bindings")]
    sources = _relative("csrc/cpu/*.cpp") + ["python_bindings/ops.cpp", "python_bindings/module.cpp"]
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + _cpu_vec_flags()
    link = ["-fopenmp"]
    if _sanitize():
        cxx += SANITIZE_FLAGS  # the later -O1 wins over -O3
        link += SANITIZE_FLAGS
    if _build_cuda():
        sources += _relative("csrc/cuda/*.cu") + ["python_bindings/cuda_ops.cpp"]
        return CUDAExtension(
            "vsops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("VSOPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"] + _cuda_gencode_flags()},
            extra_link_args=link,
        )
    return CppExtension(
        "vsops._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


# Only when run as the build script (as pip and `python setup.py` do), so that .ci/nvcc_check.sh
# can import this file for _cuda_gencode_flags without building anything.
if __name__ == "__main__":
    setup(
        # integrations/ is installed as vsops.integrations.
        packages=find_packages(include=["vsops", "vsops.*"]) + ["vsops.integrations", "vsops.integrations.testing"],
        package_dir={"vsops.integrations": "integrations"},
        package_data={
            "vsops.training": ["configs/*.json"],
            "vsops.demo": [f"{model}/{files}" for model in ("model", "model/backbone", "model_marked", "model_marked/backbone")
                           for files in ("*.json", "*.safetensors")],
            "vsops.eval": ["tasks/*/*.yaml", "tasks/*/*.py", "tasks/*/data/*.jsonl"],
        },
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
