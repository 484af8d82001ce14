"""Shared fixtures. Tests build tiny models themselves; nothing is downloaded."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_captioner():
    from pdlm_ros.captioner import Captioner

    return Captioner.load(preset="tiny", seed=0)


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4, what: str = "") -> None:
    """allclose with the max/mean difference in the failure message."""
    diff = (a.float() - b.float()).abs()
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), (
        f"{what} differ: max {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
