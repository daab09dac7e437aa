"""Test-wide settings: Triton kernels run through the interpreter when no GPU is present."""
import os

import torch

# Must be set before any Triton kernel is decorated: it picks the interpreter at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# The tests use tiny tensors: one thread avoids OpenMP spin-waits, which made a tiny training
# step ~35x slower on a busy 2-core machine.
torch.set_num_threads(1)
