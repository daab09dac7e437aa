"""Tolerance shared by the kernel tests: relative to the expected tensor's largest magnitude."""
import torch


def assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the expected tensor's largest magnitude; NaN or inf never passes."""
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rel, atol=rel * max(scale, 1e-30))
