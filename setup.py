"""Builds fastcap and its compiled core, fastcap._C.

A CUDAExtension when nvcc and a CUDA build of torch are present (the CUDA sources then
compile even on a machine with no GPU), a CppExtension otherwise. Environment:
  FASTCAP_CPU_ONLY=1   build the CPU kernels only
  FASTCAP_REQUIRE_CUDA=1   fail unless the CUDA sources are built (the GPU check sets it)
  DEBUG=1              -O0 -g
  MAX_JOBS, TORCH_CUDA_ARCH_LIST   as for any torch extension (arch default here: 9.0)
"""
import glob
import os

# torch guesses CUDA_HOME=/usr/local when no GPU is visible, and the link then fails on
# -lcudart; point it at the toolkit before cpp_extension reads it.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _use_cuda() -> bool:
    required = os.environ.get("FASTCAP_REQUIRE_CUDA", "0") == "1"
    if os.environ.get("FASTCAP_CPU_ONLY", "0") == "1":
        if required:
            raise SystemExit("fastcap: FASTCAP_REQUIRE_CUDA=1 and FASTCAP_CPU_ONLY=1 contradict each other")
        return False
    missing = [what for what, ok in (
        ("a CUDA build of torch (torch.version.cuda is None)", torch.version.cuda is not None),
        ("CUDA_HOME", CUDA_HOME is not None),
        (f"nvcc under CUDA_HOME={CUDA_HOME}", CUDA_HOME is not None
         and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))),
    ) if not ok]
    if missing and required:
        # Otherwise the build falls back to the CPU kernels and every CUDA test skips: a green
        # report that proves nothing.
        raise SystemExit("fastcap: FASTCAP_REQUIRE_CUDA=1 but the CUDA sources cannot be built: missing "
                         + "; ".join(missing))
    return not missing


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    use_cuda = _use_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is inline and runs serially in code built without it.
    # -fvisibility=hidden: pybind11 modules hide their symbols.
    extra = {"cxx": opt + ["-fopenmp", "-fvisibility=hidden"]}
    macros = []
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr"]
        macros.append(("FASTCAP_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for Hopper (the H100 we test on) instead of every arch.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    ext = CUDAExtension if use_cuda else CppExtension
    return ext("fastcap._C", sources, define_macros=macros, extra_compile_args=extra,
               extra_link_args=["-fopenmp"], include_dirs=[os.path.join(HERE, "csrc")])


setup(
    name="fastcap",
    version="0.1.0",
    description="Memory-efficient activation capture for PyTorch: compiled hooks into pinned ring buffers.",
    packages=find_packages(include=["fastcap", "fastcap.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "tqdm", "psutil"],
    # Hugging Face datasets as input and the SAELens export; language models need transformers.
    extras_require={"datasets": ["datasets"], "text": ["transformers", "datasets"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["fastcap=fastcap.cli:main"]},
)
