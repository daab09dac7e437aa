"""Build the C++/CUDA extension wbdit._C from csrc/ when torch and a compiler are present.

The package metadata (dependencies, extras, packages: wbdit and the Triton kernels as
wbdit.kernels) lives in pyproject.toml."""

import glob
import os
import shutil

from setuptools import setup

CUDA_ENV = "WBDIT_CUDA"  # "1": CUDA build or fail; "0": CPU only; unset: CUDA when torch and nvcc allow


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else where nvcc really lives.

    torch guesses dirname(dirname(which nvcc)), which is /usr/local when nvcc is a wrapper
    script in /usr/local/bin; a root only counts here if it has bin/nvcc and cuda_runtime.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _nvidia_wheel_includes():
    """Header dirs of the nvidia-* wheels torch depends on (cusparse.h, cublas_v2.h, ...):
    torch's CUDA headers include them, and a toolkit without those libraries lacks them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({os.path.dirname(h) for r in roots for h in glob.glob(os.path.join(r, "*", "include", "cusparse.h"))})


def extension_modules():
    """wbdit._C from csrc/: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

    Returns (ext_modules, cmdclass); both empty when torch is not importable (pure-Python
    install: wbdit.ops then runs the references and says so).
    """
    try:
        import torch
    except ImportError:
        return [], {}
    want = os.environ.get(CUDA_ENV, "").strip()
    cuda_home = _find_cuda_home()
    if want == "1" and (torch.version.cuda is None or cuda_home is None):
        raise RuntimeError(
            f"{CUDA_ENV}=1 but torch {torch.__version__} has no CUDA or no CUDA toolkit (nvcc) was found"
        )
    with_cuda = want != "0" and torch.version.cuda is not None and cuda_home is not None
    if with_cuda:
        # Before cpp_extension is imported: it reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for A100 (sm_80) and H100/H200 (sm_90).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join("csrc", "wbdit.cpp")]
    # No -std: torch adds the standard its headers need. -g0 overrides the -g of Python's own
    # CFLAGS: debug info for torch's templates made the .so 4.3 MB instead of 0.8 MB.
    extra = {"cxx": ["-O3", "-g0"]}
    include_dirs = [os.path.join(here, "csrc")]
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        sources.append(os.path.join("csrc", "wbdit_cuda.cu"))
        extra["nvcc"] = ["-O3"]
        if not os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
            # Searched after the toolkit's own include dir: the wheels also ship cuda_runtime.h,
            # which must not shadow the one that matches this nvcc.
            for inc in _nvidia_wheel_includes():
                extra["cxx"] += ["-idirafter", inc]
                extra["nvcc"] += ["-isystem", inc]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls("wbdit._C", sources, include_dirs=include_dirs, extra_compile_args=extra)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

# Metadata, dependencies and packages: pyproject.toml. Here: only the extension build.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
