"""The Triton kernel's several-frame form (one launch, each region reading its own frame's prefix) against the
dense mask with frame ids, in Triton's interpreter on the CPU (a child process, as in test_triton_attention)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdlm_ros.model.attention import ATTENTION_IMPLS, region_attention
from pdlm_ros.runtime import triton_attention
from test.conftest import assert_close
from test.model.test_attention import multi_frame_reference

pytestmark = pytest.mark.skipif(not triton_attention.available(), reason="triton is not installed")

# (prefix lengths, frame of every region, H, S, D, dtype): one frame, frames in order, interleaved, a prefix of one
# token, a head dim that is not a power of two (40), a block longer than one query tile (70)
CASES = [
    ((7,), (0, 0), 2, 5, 8, torch.float32),
    ((33, 5, 12), (0, 0, 1, 2, 2, 2), 2, 17, 40, torch.float32),
    ((1, 64), (1, 0, 1, 0), 1, 9, 16, torch.float32),
    ((131, 20), (0, 1), 2, 70, 16, torch.float32),
    ((48, 30, 5, 9), (3, 2, 1, 0), 2, 48, 40, torch.float16),
]

CHILD = """
import sys, torch
from pdlm_ros.runtime.triton_attention import region_attention_multi_triton
cases = torch.load(sys.argv[1])
torch.save([region_attention_multi_triton(*c) for c in cases], sys.argv[2])
"""


def make_inputs(case, seed):
    lengths, frame_of, h, s, d, dtype = case
    g = torch.Generator().manual_seed(seed)
    n = len(frame_of)
    q, k, v = (torch.randn(n, h, s, d, generator=g).to(dtype) for _ in range(3))
    prefixes = [tuple(torch.randn(h, p, d, generator=g).to(dtype) for _ in range(2)) for p in lengths]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    pk = torch.cat([p[0] for p in prefixes], dim=1)
    pv = torch.cat([p[1] for p in prefixes], dim=1)
    return (q, k, v, pk, pv, torch.tensor(frame_of), offsets), prefixes


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_multi")
    made = [make_inputs(c, i) for i, c in enumerate(CASES)]
    torch.save([args for args, _ in made], tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "in.pt"), str(tmp / "out.pt")], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return made, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"frames{len(c[0])}-n{len(c[1])}-s{c[3]}-{str(c[5])[6:]}"
                                                          for c in CASES])
def test_multi_kernel_matches_the_dense_mask_with_frame_ids(interpreted, index):
    made, outputs = interpreted
    (q, k, v, pk, pv, frame_of, offsets), prefixes = made[index]
    out = outputs[index]
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    atol = 1e-5 if out.dtype == torch.float32 else 2e-3
    ref = multi_frame_reference(q.float(), k.float(), v.float(), [(a.float(), b.float()) for a, b in prefixes],
                                frame_of.tolist())
    assert_close(out, ref, atol=atol, rtol=atol, what=f"multi-prefix triton, case {CASES[index]}")
    # the PyTorch path (one call per frame's run of regions) agrees on the same inputs
    torch_out = region_attention(q.float(), k.float(), v.float(), pk.float(), pv.float(), impl="shared_prefix",
                                 prefix_index=frame_of, prefix_offsets=offsets)
    assert_close(out, torch_out, atol=atol, rtol=atol, what="multi-prefix triton vs shared_prefix")


def test_one_frame_stacked_is_the_one_prefix_kernel(interpreted):
    """A stack of one frame reads the whole prefix: the same numbers as the plain kernel's reference."""
    made, outputs = interpreted
    (q, k, v, pk, pv, _, _), _ = made[0]
    assert_close(outputs[0], ATTENTION_IMPLS["shared_prefix"](q, k, v, pk, pv), atol=1e-5, what="one frame")


def test_bad_index_shapes_are_named_before_any_launch():
    x = torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match=r"prefix_index must be \(2,\)"):
        triton_attention.region_attention_multi_triton(x, x, x, x[0], x[0], torch.tensor([0]), torch.tensor([0, 3]))
