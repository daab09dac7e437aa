"""Suite stage "env": the machine and software every later number was measured with."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import numpy
import torch
import triton
from common import HAS_CUDA, record


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main() -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "cpus": os.cpu_count(),
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        ),
        "nvcc": (_run("nvcc", "--version").splitlines() or ["not found"])[-1],
        "compute_sanitizer": shutil.which("compute-sanitizer") or "not found",
        # The twin passes the repo's revision in; the GPU machine gets the tree without .git.
        "git": os.environ.get("WBDIT_GIT") or _run("git", "rev-parse", "--short", "HEAD") or "unknown",
    }
    if HAS_CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            capability=f"sm_{p.major}{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            driver=_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or "unknown",
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(device="none (CPU only)")
    record("env", **info)


if __name__ == "__main__":
    main()
