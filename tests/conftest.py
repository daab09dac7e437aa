"""Test-wide settings: Triton kernels run through the interpreter when no GPU is present;
tiny tensors run on one thread that waits passively (see wbdit/__init__.py)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402

# Must be set before any Triton kernel is decorated: it picks the interpreter at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# The tests use tiny tensors: one thread avoids OpenMP start-up and spin-waits, which made a
# tiny training step ~35x slower on a busy 2-core machine.
torch.set_num_threads(1)
