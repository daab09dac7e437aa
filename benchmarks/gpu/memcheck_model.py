"""Suite stage "memcheck": one small forward and backward of the fused WB-DiT, run by the suite
under ``compute-sanitizer --tool memcheck``, so an out-of-bounds access of any Triton or
C++/CUDA kernel is reported (a stray write can pass every numeric check and still corrupt memory).

The model is small (memcheck slows every kernel down) but keeps the seed's head dim 96, so the
MSSA kernels run the seed's tile configuration, and 203 genes, so the patch embedding pads (21
tokens, no block multiple). fp32, then bf16 autocast as the trainer runs it.
"""

from __future__ import annotations

import os

os.environ["WBDIT_STRICT_FUSED"] = "1"  # a fallback to the reference would check nothing

import torch  # noqa: E402
from common import HAS_CUDA, record, skip  # noqa: E402

from wbdit import ops  # noqa: E402
from wbdit.model import WhiteBoxDiT  # noqa: E402


def main() -> None:
    if not HAS_CUDA:
        skip("fused WB-DiT forward + backward under compute-sanitizer memcheck")
        return
    torch.manual_seed(0)
    model = WhiteBoxDiT(
        n_genes=203, patch_size=10, hidden_size=192, depth=1, num_heads=2, num_classes=3, fused=True
    ).cuda()
    x = torch.randn(3, 203, device="cuda")
    t = torch.randint(0, 1000, (3,), device="cuda")
    y = torch.tensor([0, 2, 3], device="cuda")  # 3 = the null class
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = ((model(x, t, y).float() - x) ** 2).mean()
        loss.backward()
        torch.cuda.synchronize()
        record("memcheck_run", dtype=str(dtype).replace("torch.", ""), loss=loss.item(), implementations=ops.report())


if __name__ == "__main__":
    main()
