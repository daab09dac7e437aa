"""Test-wide settings: Triton kernels run through the interpreter when no GPU is present;
tiny tensors run on one thread that waits passively (see wbdit/__init__.py)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import pytest  # noqa: E402
import torch  # noqa: E402

# Must be set before any Triton kernel is decorated: it picks the interpreter at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# The tests use tiny tensors: one thread avoids OpenMP start-up and spin-waits, which made a
# tiny training step ~35x slower on a busy 2-core machine.
torch.set_num_threads(1)


# The modules that test Triton kernels on CPU tensors through the interpreter. Everywhere else
# the fast paths (fused=True, the default of train, sample and the CLI) take the CPU
# implementations: the interpreter runs a tiny training step ~300x slower (1.3 s against 3.4 ms
# for hidden 32) and is not what those tests are about.
TRITON_ON_CPU = {
    "test_extension",
    "test_fused_model",
    "test_ista",
    "test_kernels_aot",
    "test_model",
    "test_mssa",
    "test_tuning",
}


@pytest.fixture(autouse=True, scope="module")
def _cpu_fast_paths_outside_kernel_tests(request):
    """TRITON_INTERPRET=0 at dispatch time (ops.triton_interpreting) outside TRITON_ON_CPU;
    module-scoped so that module-scoped fixtures which train see it too."""
    if torch.cuda.is_available() or request.module.__name__.rpartition(".")[2] in TRITON_ON_CPU:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
